"""
Image-to-image translation with flow matching (handout section 3.1): Fashion-MNIST -> MNIST.

mnist.py's run (the same U-Net, optimiser, settings and loop); only x0 changes: instead of
Gaussian noise, the flow starts from a Fashion-MNIST garment plus Gaussian noise of standard
deviation --sigma (0.3; translate.py's own setting) and carries it to an MNIST digit. Some
defaults differ, each for the reason test_fm.py's DIFFERENCES gives: 100 epochs (the
handout's "about 100"), batches of 64, the linear schedule, t ~ U(0, 1) (measured), and
each batch's garments re-paired with its digits by optimal transport (measured; --pairing
random draws them independently, as the handout does, so that nothing in the training tells
the flow which digit a garment should become).

    python translate.py                                   # 100 epochs, OUT = out/translate-linear
    python translate.py --limit 2000 --epochs 2           # a quick look
    python translate.py --out out/translate-linear --resume --epochs 150
    python translate.py --out out/translate-linear --sample 16   # the first 16 test garments

After every epoch: OUT/epochNNN.png (16 fixed Fashion-MNIST test images on top, their
translations below), OUT/epochNNN.pt (the sampling weights) and OUT/ckpt.pt. --sample N
writes OUT/samples.pt (N, 1, 28, 28) in [0, 1] and OUT/samples.png (sources and results in
alternate rows); from a --conditional run also OUT/samples-labels.pt, the digits asked for,
and OUT/digits.png, the first 8 garments turned into each digit (with --digit D:
OUT/strip.png, the first 8 turned into D, a row per guidance W).
"""
import argparse
import copy
import math
import os
import sys
import time

import torch

# the lesson: the handout's maths, and our recipe's moving average (common.py's first part)
from common import SCHEDULES, fm_loss, get_schedule, make_unet, update_ema
# the chapters: t (README, section 3), samplers (appendix D), OT (4), labels and guidance (6)
from common import (GRIDS, GUIDANCE, GUIDANCE_SHAPE, GUIDED_NFE, SHAPES, SOLVERS,
                    STRIP, T_DISTS, draw_t, drop_labels, ot_pairing, plan, time_grid)
# plumbing, which a learner can skip
from common import (Help, atomic_save, autocast, blur, check_guidance_flags, check_loss,
                    check_memory, check_weights, decay, die, finite_float, generate, guidance,
                    interrupted, labels_to_ask, learning_rate, load_images, load_model, make_dir,
                    nfe, non_negative_float, pick_device, pick_dtype, positive_float, positive_int,
                    probability, progress, restore_state, resume, save_flow, save_grid,
                    step_memory, to_unit)

# -----------------------------------------------------------------------------
# settings: mnist.py's block; test_fm.py's DIFFERENCES lists the defaults in which the two
# differ, and why
parser = argparse.ArgumentParser(
    description="Image-to-image translation with flow matching: Fashion-MNIST -> MNIST.",
    formatter_class=Help)
parser.error = die  # argparse's errors in one line, without its usage block
add = parser.add_argument
# the recipe
add("--schedule", default="linear", choices=list(SCHEDULES), help="the path from x0 to x1 (Eq. 5)")
add("--epochs", type=positive_int, default=100, help="passes over the training set")
add("--batch-size", type=positive_int, default=64, help="images per optimiser step")
add("--lr", type=positive_float, default=1e-3, help="Adam's learning rate")
add("--t-dist", default="uniform", choices=list(T_DISTS), help="how t is drawn (draw_t)")
add("--t-mean", type=finite_float, default=-0.5, help="logit-normal t: the normal's mean")
add("--ema", type=decay, default=0.999, metavar="D", help="the weights' moving average (0: none)")
add("--warmup", type=positive_int, metavar="N", help="the learning rate rises to --lr over N steps")
add("--cooldown", type=positive_int, metavar="N", help="the last N epochs' learning rate falls "
    "linearly towards 0; the epochs before are a run's without it (common.learning_rate)")
add("--clip", type=positive_float, help="clip the norm of the gradient to this")
add("--seed", type=int, default=0, help="seeds the training and --sample's noise (--sigma)")
# the run
add("--data", default="data", help="torchvision's data folder (MNIST/raw/, FashionMNIST/raw/)")
add("--out", help="output folder (default: out/translate-SCHEDULE)")
add("--limit", type=positive_int, help="train on the first N images of each set (quick runs)")
add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 "
    "autocast on a CPU with native bf16 (AVX512-BF16 or AMX), else float32 (README, appendix E)")
add("--resume", action="store_true", help="continue OUT/ckpt.pt with its settings, but --epochs, "
    "--data, --device, --dtype, --nfe, --guidance, --guidance-shape as given here (--cooldown "
    "where given)")
# sampling: the pictures of every epoch, and --sample
add("--sample", type=positive_int, metavar="N", help="no training: translate N test garments")
add("--raw", action="store_true", help="with --sample: the trained weights, not their average")
add("--nfe", type=positive_int, help="network evaluations per image, by the sampler measured best "
    f"for them on mnist.py's models (default: 20; {GUIDED_NFE} guided, two per solver evaluation)")
add("--solver", choices=list(SOLVERS), help="instead of --nfe's: euler (1 network evaluation per "
    "step), heun or midpoint (2), heun-euler (2, the last step 1)")
add("--steps", type=positive_int, help="instead of --nfe's: solver steps (Eq. 7 for Euler)")
add("--grid", choices=list(GRIDS), help="instead of --nfe's: the steps' times (uniform, early: "
    "shorter steps first, edm: Karras et al.)")
# the handout's recipe, with the batch size and Euler steps its text leaves open (README)
HANDOUT = {"t_dist": "uniform", "batch_size": 128, "ema": 0.0, "solver": "euler", "steps": 100,
           "grid": "uniform", "pairing": "random", "sigma": 0.0}  # random pairs, bare garments
add("--handout", action="store_true", help="the handout's recipe as we run it: " + " ".join(
    f"--{k.replace('_', '-')} {v}" for k, v in HANDOUT.items()) + "; a setting given wins")
# the chapters: OT pairs and noisy garments (README, section 4), labels and guidance (section 6)
add("--pairing", default="ot", choices=["random", "ot"], help="garments and digits paired "
    "independently, or re-paired in each batch by optimal transport (--conditional: by class)")
add("--sigma", type=non_negative_float, default=0.3, help="x0 = garment + sigma * noise, in "
    "training and sampling: a density around each garment (--sample, --resume: the run's own)")
add("--conditional", action="store_true", help="learn each digit's class too (ten one-hot maps, "
    "a learned shift at each later block), 'no label' with probability --label-drop")
add("--label-drop", type=probability, default=0.1, metavar="P", help="how often a label is dropped")
add("--guidance", type=non_negative_float, metavar="W", help="a conditional model's field "
    f"v_u + W(t) (v_c - v_u); W = 1: v_c; another W (a constant 0 aside) takes two (default: "
    f"{GUIDANCE:g})")
add("--guidance-shape", choices=SHAPES, help="W(t) = 1 + (W - 1) t (ramp: v_c at t = 0, W at "
    f"t = 1) or W (constant) (default: {GUIDANCE_SHAPE})")
add("--digit", type=int, choices=range(10), help="--sample: as this digit (default: each in turn)")

def main(argv=None):
    args = parser.parse_args(argv)
    if args.handout:  # HANDOUT's settings become the defaults; a setting given still wins
        args = parser.parse_args(argv, argparse.Namespace(**HANDOUT))
    args.out = args.out or f"out/translate-{args.schedule}"
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)  # bf16 autocast only where the CPU has it
    if args.sample:  # no training: translate with a trained run
        return draw(args, ckpt_path, device, dtype)
    check_guidance_flags(args)  # --digit is for --sample, --guidance for a conditional model

    if args.cooldown and args.cooldown > args.epochs:
        die(f"--cooldown {args.cooldown} is longer than the run's --epochs {args.epochs}")

    # -------------------------------------------------------------------------
    # set-up: a fresh U-Net, or with --resume the one in OUT/ckpt.pt and its settings
    torch.manual_seed(args.seed)
    model, ckpt = make_unet(args.conditional), None
    if args.resume:
        ckpt, args, model = resume(ckpt_path, args, "translate.py")
    elif os.path.exists(ckpt_path):
        die(f"{ckpt_path} exists: add --resume to continue that run, or choose another --out")
    make_dir(args.out)

    # -------------------------------------------------------------------------
    # data: x1 ~ mu_1 the digits and their classes (N,), x0 ~ mu_0 the garments, each
    # (N, 1, 28, 28) in [-1, 1]
    x1_all, y_all = (a[: args.limit].to(device) for a in load_images("MNIST", args.data,
                                                                      labels=True))
    x0_all = load_images("FashionMNIST", args.data)[: args.limit].to(device)
    N = len(x1_all)
    need = step_memory(model, min(args.batch_size, N))  # a step's activations, gradients
    check_memory(need, f"--batch-size {args.batch_size}", device)  # refused now, if too many
    fixed = load_images("FashionMNIST", args.data, train=False)[:16]  # the same, every epoch
    fixed_y = torch.arange(16) % 10 if args.conditional else None  # conditional: 0, 1, ..., 9, 0

    # -------------------------------------------------------------------------
    # model, optimiser and the weights' moving average; channels_last: the fast conv kernels'
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    start = restore_state(ckpt, opt, ema, device) if ckpt else 0  # epochs done
    schedule = get_schedule(args.schedule)
    print(f"device {device}, dtype {str(dtype)[6:]}, schedule {args.schedule}, seed {args.seed}, "
          f"{N} training images, {sum(p.numel() for p in model.parameters())} parameters")
    # the sampler of the pictures: --nfe's (a conditional model's guided by --guidance)
    w, shape, per, budget = guidance(args, args.conditional, ckpt_path, "translate.py")
    solver, n_steps, grid = plan(budget, args.schedule, args.solver, args.steps, args.grid)
    ts = time_grid(grid, n_steps, args.schedule)
    print(f"pictures: {solver}, {n_steps} steps on the {grid} grid "
          f"({nfe(solver, n_steps) * per} network evaluations)")

    # -------------------------------------------------------------------------
    # the training loop: mnist.py's, with a garment in place of the noise
    batches = math.ceil(N / args.batch_size)  # optimiser steps per epoch
    n, saved = start * batches, start  # optimiser steps so far; the epoch in OUT/ckpt.pt
    try:
        for epoch in range(start, args.epochs):
            t0, total = time.time(), 0.0
            for step, idx in enumerate(torch.randperm(N).split(args.batch_size), 1):
                x1 = x1_all[idx.to(device)]  # (B, 1, 28, 28), digits
                # x0: a garment drawn independently of the digit x1 (random pairing)
                x0 = x0_all[torch.randint(len(x0_all), (len(x1),)).to(device)]
                if args.sigma:               # the source a density: each garment plus noise
                    x0 = x0 + args.sigma * torch.randn_like(x0)
                y = y_all[idx.to(device)] if args.conditional else None  # section 6: classes
                if args.pairing == "ot":     # section 4: re-paired, least total distance
                    x0 = x0[ot_pairing(x0, x1, y)]
                net = model
                if args.conditional:         # section 6: the class, or "no label" (--label-drop)
                    y = drop_labels(y, args.label_drop)
                    net = lambda xt, t: model(xt, t, y)
                t = draw_t(len(x1), args.t_dist, args.t_mean, device)  # each sample's time
                with autocast(device, dtype):
                    loss = fm_loss(net, x0, x1, schedule, t)            # Eq. 4
                total += loss.item() * len(idx)
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
            print(f"epoch {epoch + 1:3d}/{args.epochs} | loss {total / N:.4f} | "
                  f"{N / dt:5.0f} img/s | {dt:6.1f} s", flush=True)

            # outputs: the fixed garments and their translations, then the checkpoint (never
            # with non-finite weights) and the sampling weights alone
            sampler = ema if ema is not None else model
            check_weights([model, sampler], epoch + 1, args.lr)
            x = generate(sampler, blur(fixed, args.sigma), n_steps, device, dtype, solver, ts,
                         y=fixed_y, w=w, shape=shape)
            save_pairs(fixed, x, os.path.join(args.out, f"epoch{epoch + 1:03d}.png"))
            atomic_save({
                "script": "translate.py", "model": model.state_dict(),
                "optimizer": opt.state_dict(), "config": vars(args),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "epoch": epoch + 1, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            }, ckpt_path)
            saved = epoch + 1
            atomic_save({"script": "translate.py", "ema" if ema is not None else "model":
                         sampler.state_dict(), "config": vars(args), "epoch": epoch + 1},
                        os.path.join(args.out, f"epoch{epoch + 1:03d}.pt"))
    except KeyboardInterrupt:  # Ctrl-C: one line, where the run stands and how to go on; exit 130
        interrupted("translate.py", args, epoch + 1, saved, ckpt_path)

# -----------------------------------------------------------------------------
# --sample: no training, the test garments translated by a trained run

def save_pairs(x0, x, path, width=16):
    """A PNG with rows of `width`: sources (x0, in [-1, 1]) above their results (x, in [0, 1])."""
    width, rows = min(width, len(x)), []
    for i in range(0, len(x), width):
        src, res = to_unit(x0[i:i + width]).cpu(), x[i:i + width]
        pad = torch.zeros(width - len(src), *src.shape[1:])  # a short last row, filled with black
        rows += [src, pad, res, pad]
    save_grid(torch.cat(rows), path, nrow=width)

def draw(args, ckpt_path, device, dtype):
    """--sample N, no training: the first N Fashion-MNIST test images translated with the
    weights of OUT/ckpt.pt: OUT/samples.pt (N, 1, 28, 28) in [0, 1], samples.png (sources
    above their translations), flow.png and flow.gif. A conditional model turns each garment
    into --digit, or 0, 1, ..., 9 in turn, guided by --guidance and --guidance-shape; the
    labels asked for go into OUT/samples-labels.pt (N,), and OUT/strip.png (--digit: the
    first 8 garments, a row per W) or OUT/digits.png (each of them turned into every digit)."""
    model, config = load_model(ckpt_path, device, args.raw, script="translate.py")
    schedule = config.get("schedule", "cosine")  # the one the weights were trained for
    w, shape, per, budget = guidance(args, config.get("conditional"), ckpt_path, "translate.py")
    y = labels_to_ask(args, args.sample) if config.get("conditional") else None
    solver, n_steps, grid = plan(budget, schedule, args.solver, args.steps, args.grid)
    ts = time_grid(grid, n_steps, schedule)
    garments = load_images("FashionMNIST", args.data, train=False)
    if args.sample > len(garments):
        die(f"--sample {args.sample}: Fashion-MNIST has only {len(garments)} test images")
    x0 = garments[: args.sample]
    sigma = config.get("sigma", 0.0)
    start = blur(x0, sigma, args.seed)  # with --sigma: the garments + the noise of --seed
    t0 = time.time()
    x, path = generate(model, start, n_steps, device, dtype, solver, ts, keep=64, y=y, w=w,
                       shape=shape)
    dt = time.time() - t0
    print(f"{len(x)} images, {solver}, {n_steps} steps on the {grid} grid "
          f"({nfe(solver, n_steps) * per} network evaluations each"
          f"{f', two per solver evaluation: guidance {w:g}, {shape}' if per == 2 else ''}): "
          f"{dt:.1f} s ({len(x) / dt:.1f} img/s)")
    atomic_save(x, os.path.join(args.out, "samples.pt"))  # (N, 1, 28, 28) in [0, 1]
    save_pairs(x0[:128], x[:128], os.path.join(args.out, "samples.png"))
    save_flow(path, ts, args.out)  # the first 64 on their way from t = 0 to 1
    print(f"wrote {args.out}/samples.pt, samples.png, flow.png and flow.gif")
    if y is not None:
        atomic_save(y, os.path.join(args.out, "samples-labels.pt"))  # the digits asked for
        print(f"wrote {args.out}/samples-labels.pt")
    if y is None:
        return
    garments = garments[:8]
    first8 = blur(garments, sigma, args.seed)
    if args.digit is not None:  # the same 8 garments under several W, a row each
        strip = [generate(model, first8, n_steps, device, dtype, solver, ts, y=y[:1].repeat(8),
                          w=v, shape=shape) for v in STRIP[shape]]
        save_grid(torch.cat(strip), os.path.join(args.out, "strip.png"), nrow=8)
        print(f"wrote {args.out}/strip.png (rows: guidance {', '.join(map(str, STRIP[shape]))}, "
              f"{shape})")
    else:  # each of the 8 garments, then it turned into 0, 1, ..., 9: a row per garment
        each = torch.stack([generate(model, first8, n_steps, device, dtype, solver, ts,
                                     y=torch.full((8,), d), w=w, shape=shape)
                            for d in range(10)], dim=1)  # (8, 10, 1, 28, 28)
        save_grid(torch.cat([to_unit(garments)[:, None], each], dim=1).flatten(0, 1),
                  os.path.join(args.out, "digits.png"), nrow=11)
        print(f"wrote {args.out}/digits.png (a row per garment: it, then it as 0, 1, ..., 9)")

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, exit status 130 (files: common.atomic_write)
        print(f"{os.path.basename(__file__)}: interrupted", file=sys.stderr)
        raise SystemExit(130)
