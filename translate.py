"""
Image-to-image translation with flow matching (handout section 3.1): Fashion-MNIST -> MNIST.

The same U-Net, optimiser and settings as mnist.py; only x0 changes: instead of Gaussian
noise, the flow starts from a Fashion-MNIST image and carries it to an MNIST digit.
Garments and digits are paired at random (drawn independently), so nothing in the
training tells the flow which digit a garment should become.

    python translate.py                                   # 100 epochs, OUT = out/translate-cosine
    python translate.py --limit 2000 --epochs 2           # a quick look
    python translate.py --out out/translate-cosine --resume --epochs 150
    python translate.py --out out/translate-cosine --sample 16   # the first 16 Fashion-MNIST test images

After every epoch: OUT/epochNNN.png (16 fixed Fashion-MNIST test images on top, their
translations below) and OUT/ckpt.pt. --sample N writes OUT/samples.pt (N, 1, 28, 28) in [0, 1]
and OUT/samples.png (sources and results in alternate rows).
"""
import os

import torch
from torchvision.utils import save_image

from common import (atomic_save, die, generate, image_parser, load_images, load_model, pick_device,
                    pick_dtype, start_run, to_unit, train)

parser = image_parser("Image-to-image translation with flow matching: Fashion-MNIST -> MNIST.", epochs=100)

def save_pairs(x0, x, path, width=16):
    """A PNG with rows of `width`: sources (x0, in [-1, 1]) above their results (x, in [0, 1])."""
    width, rows = min(width, len(x)), []
    for i in range(0, len(x), width):
        src, res = to_unit(x0[i:i + width]).cpu(), x[i:i + width]
        pad = torch.zeros(width - len(src), *src.shape[1:])  # a short last row, filled with black
        rows += [src, pad, res, pad]
    save_image(torch.cat(rows), path, nrow=width)

def main(argv=None):
    args = parser.parse_args(argv)
    args.out = args.out or f"out/translate-{args.schedule}"
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    if args.sample:  # no training: translate the first N Fashion-MNIST test images
        model = load_model(args.out, device, args.raw)
        x0 = load_images("FashionMNIST", args.data, train=False)
        if args.sample > len(x0):
            die(f"--sample {args.sample}: Fashion-MNIST has only {len(x0)} test images")
        x0 = x0[: args.sample]
        x = generate(model, x0, args.steps, device, dtype, args.solver, quiet=False)
        atomic_save(x, os.path.join(args.out, "samples.pt"))  # (N, 1, 28, 28) in [0, 1]
        save_pairs(x0[:128], x[:128], os.path.join(args.out, "samples.png"))
        print(f"wrote {args.out}/samples.pt and {args.out}/samples.png")
        return

    args, model, ckpt = start_run(args)  # a fresh U-Net, or --resume
    x1_all = load_images("MNIST", args.data)[: args.limit].to(device)          # x1 ~ mu_1, digits
    x0_all = load_images("FashionMNIST", args.data)[: args.limit].to(device)   # x0 ~ mu_0, garments
    fixed = load_images("FashionMNIST", args.data, train=False)[:16]           # for the pictures

    def draw_x0(x1):  # a garment drawn independently of the digit x1: random pairing
        return x0_all[torch.randint(len(x0_all), (len(x1),)).to(x0_all.device)]

    def picture(model, epoch):
        x = generate(model, fixed, args.steps, device, dtype, args.solver)
        save_pairs(fixed, x, os.path.join(args.out, f"epoch{epoch:03d}.png"))

    train(args, model, ckpt, device, dtype, x1_all, draw_x0=draw_x0, picture=picture)

if __name__ == "__main__":
    main()
