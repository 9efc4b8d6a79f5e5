"""
Mean flows (Geng et al. 2025; README, section 7): one network evaluation per image, from
scratch, with no teacher.

The network learns u(x, s, e), the average velocity of the flow from x at time s to time e:
x_e = x_s + (e - s) u(x_s, s, e). At e = s it is the flow's own velocity, what mnist.py
learns on the same schedule; for e > s its target is v + (e - s) du/ds (common.py, "mean
flows"), whose total derivative along the path takes one Jacobian-vector product. Sampling
jumps from t = 0 to 1 in --nfe steps of u, one network evaluation each.

    python meanflow.py                                   # 20 epochs: out/mnist-meanflow
    python meanflow.py --limit 2000 --epochs 2           # a quick look
    python meanflow.py --out out/mnist-meanflow --resume --epochs 30
    python meanflow.py --out out/mnist-meanflow --sample 64 --nfe 1   # one evaluation each
    python meanflow.py --out weights/mnist-meanflow --sample 64       # the kept weights

After every epoch: OUT/epochNNN.png (64 digits from fixed noise, --nfe steps), OUT/epochNNN.pt
(the sampling weights) and OUT/ckpt.pt, as mnist.py writes them; --sample N writes
OUT/samples.pt (N, 1, 28, 28) in [0, 1] and samples.png. Training runs in float32 (the
forward-mode product is not taken under bf16 autocast).
"""
import argparse
import copy
import math
import os
import sys
import time

import torch

# the lesson: the handout's maths, and our recipe's moving average (common.py's first part)
from common import SCHEDULES, get_schedule, update_ema
# the chapter: mean flows (README, section 7)
from common import MeanFlowUNet, draw_interval, mean_flow_loss
# plumbing, which a learner can skip
from common import (Help, atomic_save, check_loss, check_memory, check_weights, decay, die,
                    finite_float, fixed_noise, generate_mean, interrupted, learning_rate,
                    load_images, load_model, make_dir, pick_device, positive_float, positive_int,
                    probability, progress, restore_state, resume, save_grid, step_memory)

# -----------------------------------------------------------------------------
# settings: mnist.py's recipe, with the intervals of mean flows
parser = argparse.ArgumentParser(description="Mean flows: the average velocity over an "
                                 "interval, for one-step sampling.", formatter_class=Help)
parser.error = die  # argparse's errors in one line, without its usage block
add = parser.add_argument
# the recipe
add("--schedule", default="linear", choices=list(SCHEDULES), help="the path from x0 to x1 (Eq. 5)")
add("--epochs", type=positive_int, default=20, help="passes over the training set")
add("--batch-size", type=positive_int, default=32, help="images per optimiser step")
add("--lr", type=positive_float, default=1e-3, help="Adam's learning rate")
add("--ratio", type=probability, default=0.25, help="the share of intervals with e > s (the "
    "rest: e = s, plain flow matching)")
add("--t-mean", type=finite_float, default=0.4, help="the logit-normal times' mean (the paper's "
    "-0.4 in its reversed time)")
add("--t-std", type=positive_float, default=1.0, help="the logit-normal times' deviation")
add("--norm-p", type=finite_float, default=1.0, help="each image's error weighted by 1 / (error "
    "+ 1e-3)^p (0: plain squared error)")
add("--ema", type=decay, default=0.999, metavar="D", help="the weights' moving average (0: none)")
add("--warmup", type=positive_int, metavar="N", help="the learning rate rises to --lr over N steps")
add("--cooldown", type=positive_int, metavar="N", help="the last N epochs' learning rate falls "
    "linearly towards 0; the epochs before are a run's without it (common.learning_rate)")
add("--clip", type=positive_float, help="clip the norm of the gradient to this")
add("--seed", type=int, default=0, help="seeds the training and the fixed sampling noise")
# the run
add("--data", default="data", help="torchvision's data folder (MNIST/raw/ below it)")
add("--out", default="out/mnist-meanflow", help="output folder")
add("--limit", type=positive_int, help="train on the first N images only (quick runs)")
add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
add("--resume", action="store_true", help="continue OUT/ckpt.pt with its settings, but --epochs, "
    "--data, --device and --nfe as given here (--cooldown where given)")
# sampling: the pictures of every epoch, and --sample
add("--sample", type=positive_int, metavar="N", help="no training: N digits into OUT/samples.pt")
add("--raw", action="store_true", help="with --sample: the trained weights, not their average")
add("--nfe", type=positive_int, default=1, help="network evaluations per image: jumps of u")

def main(argv=None):
    args = parser.parse_args(argv)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    device = pick_device(args.device)
    if args.sample:  # no training: draw from a trained run
        return draw(args, ckpt_path, device)

    if args.cooldown and args.cooldown > args.epochs:
        die(f"--cooldown {args.cooldown} is longer than the run's --epochs {args.epochs}")

    # -------------------------------------------------------------------------
    # set-up: a fresh network, or with --resume the one in OUT/ckpt.pt and its settings
    torch.manual_seed(args.seed)
    model, ckpt = MeanFlowUNet(), None
    if args.resume:
        ckpt, args, model = resume(ckpt_path, args, "meanflow.py")
    elif os.path.exists(ckpt_path):
        die(f"{ckpt_path} exists: add --resume to continue that run, or choose another --out")
    make_dir(args.out)

    # -------------------------------------------------------------------------
    # data: x1 ~ mu_1, all training digits (N, 1, 28, 28) in [-1, 1]
    x1_all = load_images("MNIST", args.data)[: args.limit].to(device)
    N = len(x1_all)
    need = 2 * step_memory(model.unet, min(args.batch_size, N), 2)  # the product's: twice
    check_memory(need, f"--batch-size {args.batch_size}", device)  # refused now, if too many
    fixed = fixed_noise(64, args.seed)  # the same noise every epoch, so the grids compare

    # -------------------------------------------------------------------------
    # model, optimiser and the weights' moving average; channels_last: the fast conv kernels'
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    start = restore_state(ckpt, opt, ema, device) if ckpt else 0  # epochs done
    schedule = get_schedule(args.schedule)
    print(f"device {device}, dtype float32, schedule {args.schedule}, seed {args.seed}, {N} "
          f"training images, {sum(p.numel() for p in model.parameters())} parameters; "
          f"pictures: {args.nfe} network evaluation{'s' * (args.nfe > 1)}")

    # -------------------------------------------------------------------------
    # the training loop: mnist.py's, with an interval (s, e) in place of one time t
    batches = math.ceil(N / args.batch_size)  # optimiser steps per epoch
    n, saved = start * batches, start  # optimiser steps so far; the epoch in OUT/ckpt.pt
    try:
        for epoch in range(start, args.epochs):
            t0, total, total_mse = time.time(), 0.0, 0.0
            for step, idx in enumerate(torch.randperm(N).split(args.batch_size), 1):
                x1 = x1_all[idx.to(device)]  # (B, 1, 28, 28), digits
                x0 = torch.randn_like(x1)    # x0 ~ mu_0 = N(0, I), fresh noise for every batch
                s, e = draw_interval(len(x1), args.ratio, args.t_mean, args.t_std, device)
                loss, mse = mean_flow_loss(model, x0, x1, schedule, s, e, args.norm_p)
                total += loss.item() * len(idx)
                total_mse += mse.item() * len(idx)
                check_loss(total, loss, step, epoch + 1, args.lr)  # before it can spoil the weights
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if args.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                if args.warmup or args.cooldown:  # from the step count: a resumed run is exact
                    opt.param_groups[0]["lr"] = learning_rate(n, args.lr, args.warmup,
                                                              args.cooldown, args.epochs, batches)
                opt.step()
                n += 1
                if ema is not None:  # the decay warms up as (1 + n) / (10 + n): early weights fade
                    update_ema(ema, model, min(args.ema, (1 + n) / (10 + n)))
                progress(epoch + 1, args.epochs, step, batches, step * args.batch_size, total, t0)
            dt = time.time() - t0
            print(f"epoch {epoch + 1:3d}/{args.epochs} | loss {total / N:.4f} | mse "
                  f"{total_mse / N:.4f} | {N / dt:5.0f} img/s | {dt:6.1f} s", flush=True)

            # outputs: the grid of this epoch from the fixed noise, the checkpoint (never with
            # non-finite weights) and the sampling weights alone, as in mnist.py
            sampler = ema if ema is not None else model
            check_weights([model, sampler], epoch + 1, args.lr)
            x = generate_mean(sampler, fixed, args.nfe, device)
            save_grid(x, os.path.join(args.out, f"epoch{epoch + 1:03d}.png"), nrow=8)
            atomic_save({
                "script": "meanflow.py", "model": model.state_dict(),
                "optimizer": opt.state_dict(), "config": vars(args),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "epoch": epoch + 1, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            }, ckpt_path)
            saved = epoch + 1
            atomic_save({"script": "meanflow.py", "ema" if ema is not None else "model":
                         sampler.state_dict(), "config": vars(args), "epoch": epoch + 1},
                        os.path.join(args.out, f"epoch{epoch + 1:03d}.pt"))
    except KeyboardInterrupt:  # Ctrl-C: one line, where the run stands and how to go on; exit 130
        interrupted("meanflow.py", args, epoch + 1, saved, ckpt_path)

# -----------------------------------------------------------------------------
# --sample: no training, digits from a trained run

def draw(args, ckpt_path, device):
    """--sample N: N digits from N noise images fixed by --seed, each in --nfe jumps of the
    weights of OUT/ckpt.pt: OUT/samples.pt (N, 1, 28, 28) in [0, 1] and samples.png."""
    model, _ = load_model(ckpt_path, device, args.raw, script="meanflow.py")
    check_memory(2 * args.sample * 28 * 28 * 4, f"--sample {args.sample}")  # noise and digits
    t0 = time.time()
    x = generate_mean(model, fixed_noise(args.sample, args.seed), args.nfe, device)
    dt = time.time() - t0
    print(f"{len(x)} images, {args.nfe} network evaluation{'s' * (args.nfe > 1)} each: "
          f"{dt:.1f} s ({len(x) / dt:.1f} img/s)")
    atomic_save(x, os.path.join(args.out, "samples.pt"))  # (N, 1, 28, 28) in [0, 1]
    save_grid(x[:256], os.path.join(args.out, "samples.png"), nrow=16)
    print(f"wrote {args.out}/samples.pt and samples.png")

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, exit status 130 (files: common.atomic_write)
        print(f"{os.path.basename(__file__)}: interrupted", file=sys.stderr)
        raise SystemExit(130)
