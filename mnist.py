"""
Flow matching on MNIST with the handout's small U-Net (section 3): noise -> digits.

Train; after every epoch it writes an 8x8 grid of samples from the same fixed noise
(OUT/epoch001.png, ...) and a checkpoint OUT/ckpt.pt:
    python mnist.py --schedule cosine --epochs 20        # OUT = out/mnist-cosine
    python mnist.py --limit 2000 --epochs 2              # a two-minute look on a laptop CPU
Continue an interrupted run, or draw samples from a trained one:
    python mnist.py --out out/mnist-cosine --resume --epochs 30
    python mnist.py --out out/mnist-cosine --sample 64   # OUT/samples.pt (64, 1, 28, 28) in [0, 1], OUT/samples.png
"""
import argparse
import os
import time

import torch
from torchvision.utils import save_image

from common import (SCHEDULES, UNet, atomic_save, autocast, die, euler, fm_loss, get_schedule,
                    load_checkpoint, load_images, one_line_errors, pick_device, pick_dtype,
                    positive_int, restore, seed_everything, to_unit)

# -----------------------------------------------------------------------------
# settings; the defaults are the recommended run
parser = one_line_errors(argparse.ArgumentParser(description="Flow matching on MNIST."))
parser.add_argument("--schedule", default="cosine", choices=list(SCHEDULES), help="the path from noise to data (Eq. 5)")
parser.add_argument("--epochs", type=positive_int, default=20, help="passes over the training set")
parser.add_argument("--batch-size", type=positive_int, default=128, help="images per optimiser step")
parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
parser.add_argument("--steps", type=positive_int, default=100, help="Euler steps when sampling (Eq. 7)")
parser.add_argument("--seed", type=int, default=0, help="seeds the training and the fixed sampling noise")
parser.add_argument("--limit", type=positive_int, default=None, help="train on the first N images only (quick runs)")
parser.add_argument("--data", default="data", help="torchvision's data folder (MNIST/raw/ below it)")
parser.add_argument("--out", default=None, help="output folder (default: out/mnist-SCHEDULE)")
parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bf16 autocast only where the hardware computes bf16 natively")
parser.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt (its settings, new --epochs)")
parser.add_argument("--sample", type=positive_int, default=None, metavar="N",
                    help="no training: load OUT/ckpt.pt and write N samples to OUT/samples.pt and .png")

def main(argv=None):
    args = parser.parse_args(argv)
    args.out = args.out or f"out/mnist-{args.schedule}"
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.sample:
        return sample(args, ckpt_path, device, dtype)

    # -------------------------------------------------------------------------
    # set-up: a fresh run, or the state of the last finished epoch of an earlier one
    seed_everything(args.seed)
    model, ckpt = UNet(), None
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        restore(model, ckpt, ckpt_path)
        keep = {k: getattr(args, k) for k in ("epochs", "device", "dtype", "resume")}
        args = argparse.Namespace(**{**ckpt["config"], **keep})
    elif os.path.exists(ckpt_path):
        die(f"{ckpt_path} exists: add --resume to continue that run, or choose another --out")
    os.makedirs(args.out, exist_ok=True)
    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, schedule {args.schedule}, seed {args.seed}")
    schedule = get_schedule(args.schedule)

    # data: the whole training set as one tensor on the device, x1 ~ mu_1
    x1_all = load_images("MNIST", args.data)[: args.limit].to(device)  # (N, 1, 28, 28) in [-1, 1]
    N = len(x1_all)

    # model and optimiser. channels_last: the layout the fast conv kernels want
    # (on this CPU +4% in fp32, and what bf16 kernels need)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = 0
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda" and ckpt["cuda_rng"]:
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        start = ckpt["epoch"]
        print(f"resuming {ckpt_path} after epoch {start}")
    print(f"{N} training images, {sum(p.numel() for p in model.parameters())} parameters")
    # the same noise every epoch, from its own generator, so the grids can be compared
    noise = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed)).to(device)

    # -------------------------------------------------------------------------
    # training loop
    for epoch in range(start, args.epochs):
        t0 = time.time()
        total = torch.zeros((), device=device)
        for idx in torch.randperm(N).split(args.batch_size):
            x1 = x1_all[idx.to(device)]
            x0 = torch.randn_like(x1)  # x0 ~ mu_0 = N(0, I)
            with autocast(device, dtype):
                loss = fm_loss(model, x0, x1, schedule)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        dt = time.time() - t0
        print(f"epoch {epoch + 1:3d}/{args.epochs} | loss {total.item() / N:.4f} | "
              f"{N / dt:5.0f} img/s | {dt:6.1f} s", flush=True)

        # outputs: a sample grid, then the checkpoint (written atomically)
        with autocast(device, dtype):
            x = euler(model, noise, args.steps)
        save_image(to_unit(x), os.path.join(args.out, f"epoch{epoch + 1:03d}.png"), nrow=8)
        atomic_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "config": vars(args),
            "epoch": epoch + 1, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        }, ckpt_path)

@torch.no_grad()
def sample(args, ckpt_path, device, dtype):
    """Draw args.sample images from the model in ckpt_path with the Euler sampler."""
    model = restore(UNet(), load_checkpoint(ckpt_path), ckpt_path).to(device)
    g = torch.Generator().manual_seed(args.seed)
    xs = []
    for n in torch.arange(args.sample).split(500):  # in chunks, to bound the memory
        with autocast(device, dtype):
            xs.append(to_unit(euler(model, torch.randn(len(n), 1, 28, 28, generator=g).to(device), args.steps)).cpu())
    x = torch.cat(xs)  # (N, 1, 28, 28) in [0, 1]
    atomic_save(x, os.path.join(args.out, "samples.pt"))
    save_image(x[:256], os.path.join(args.out, "samples.png"), nrow=min(16, int(len(x) ** 0.5 + 0.999)))
    print(f"wrote {len(x)} samples ({args.steps} Euler steps) to {args.out}/samples.pt and samples.png")

if __name__ == "__main__":
    main()
