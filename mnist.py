"""
Flow matching on MNIST with the handout's small U-Net (section 3): noise -> digits.

Train; after every epoch it writes an 8x8 grid of samples from the same fixed noise
(OUT/epoch001.png, ...) and a checkpoint OUT/ckpt.pt:
    python mnist.py --schedule cosine --epochs 20        # OUT = out/mnist-cosine
    python mnist.py --limit 2000 --epochs 2              # a one-minute look on a laptop CPU
Continue an interrupted run, or draw samples from a trained one:
    python mnist.py --out out/mnist-cosine --resume --epochs 30
    python mnist.py --out out/mnist-cosine --sample 64   # OUT/samples.pt (64, 1, 28, 28) in [0, 1], OUT/samples.png

The training loop, the checkpoints and the sampler are in common.py (shared with translate.py).
"""
import os

import torch
from torchvision.utils import save_image

from common import (atomic_save, fixed_noise, generate, image_parser, load_images, load_model,
                    pick_device, pick_dtype, start_run, train)

parser = image_parser("Flow matching on MNIST: noise -> digits.", epochs=20)

def main(argv=None):
    args = parser.parse_args(argv)
    args.out = args.out or f"out/mnist-{args.schedule}"
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    noise = lambda n: fixed_noise(n, args.seed)

    if args.sample:  # no training: N digits from N fresh noise images
        model = load_model(args.out, device, args.raw)
        x = generate(model, noise(args.sample), args.steps, device, dtype, args.solver, quiet=False)
        atomic_save(x, os.path.join(args.out, "samples.pt"))  # (N, 1, 28, 28) in [0, 1]
        save_image(x[:256], os.path.join(args.out, "samples.png"), nrow=16)
        print(f"wrote {args.out}/samples.pt and {args.out}/samples.png")
        return

    args, model, ckpt = start_run(args)  # a fresh U-Net, or --resume
    x1_all = load_images("MNIST", args.data)[: args.limit].to(device)  # x1 ~ mu_1: (N, 1, 28, 28) in [-1, 1]
    fixed = noise(64)  # the same noise every epoch, so the grids can be compared

    def picture(model, epoch):
        x = generate(model, fixed, args.steps, device, dtype, args.solver)
        save_image(x, os.path.join(args.out, f"epoch{epoch:03d}.png"), nrow=8)

    # x0 ~ mu_0 = N(0, I): fresh noise for every batch
    train(args, model, ckpt, device, dtype, x1_all, draw_x0=torch.randn_like, picture=picture)

if __name__ == "__main__":
    main()
