"""
Flow matching on MNIST with the handout's small U-Net (section 3): noise -> digits.

Train; after every epoch it writes a grid of samples from the same fixed noise (8x8; 8 of
each digit with --conditional) (OUT/epoch001.png, ...), the sampling weights
(OUT/epoch001.pt, ...) and a checkpoint OUT/ckpt.pt:
    python mnist.py --schedule cosine --epochs 20        # OUT = out/mnist-cosine
    python mnist.py --limit 2000 --epochs 2              # a one-minute look on a laptop CPU
Continue an interrupted run, or draw samples from a trained one:
    python mnist.py --out out/mnist-cosine --resume --epochs 30
    python mnist.py --out out/mnist-cosine --sample 64   # OUT/samples.pt (64, 1, 28, 28), .png

The maths (fm_loss, the samplers, the U-Net) is in common.py; the run is all here. Reflow
(from a trained model's samples) is reflow.py, mean flows (one step, no teacher) meanflow.py.
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
# the chapters: t (README, section 3), samplers (appendix D), OT (4), labels (6), dequantising
# and importance sampling (8)
from common import (GRIDS, GUIDANCE, GUIDANCE_SHAPE, GUIDED_NFE, SHAPES, SOLVERS,
                    STRIP, T_DISTS, ImportanceT, dequantize, draw_t, drop_labels, ot_pairing, plan,
                    time_grid)
# plumbing, which a learner can skip
from common import (Help, atomic_save, autocast, check_guidance_flags, check_loss, check_memory,
                    check_weights, decay, die, finite_float, fixed_noise, generate, guidance,
                    interrupted, labels_to_ask, learning_rate, load_images, load_model, make_dir,
                    nfe, non_negative_float, pick_device, pick_dtype, positive_float, positive_int,
                    probability, progress, restore_state, resume, save_flow, save_grid,
                    step_memory)

# -----------------------------------------------------------------------------
# settings: the defaults are the recommended run (README, appendix A). translate.py has the
# same block; test_fm.py's DIFFERENCES lists the defaults in which the two differ, and why.
parser = argparse.ArgumentParser(description="Flow matching on MNIST: noise -> digits.",
                                 formatter_class=Help)
parser.error = die  # argparse's errors in one line, without its usage block
add = parser.add_argument
# the recipe
add("--schedule", default="cosine", choices=list(SCHEDULES), help="the path from x0 to x1 (Eq. 5)")
add("--epochs", type=positive_int, default=20, help="passes over the training set")
add("--batch-size", type=positive_int, default=32, help="images per optimiser step")
add("--lr", type=positive_float, default=1e-3, help="Adam's learning rate")
add("--t-dist", default="logit-normal", choices=list(T_DISTS), help="how t is drawn (draw_t)")
add("--t-mean", type=finite_float, default=-0.5, help="logit-normal t: the normal's mean")
add("--ema", type=decay, default=0.999, metavar="D", help="the weights' moving average (0: none)")
add("--warmup", type=positive_int, metavar="N", help="the learning rate rises to --lr over N steps")
add("--cooldown", type=positive_int, metavar="N", help="the last N epochs' learning rate falls "
    "linearly towards 0; the epochs before are a run's without it (common.learning_rate)")
add("--clip", type=positive_float, help="clip the norm of the gradient to this")
add("--seed", type=int, default=0, help="seeds the training and the fixed sampling noise")
# the run
add("--data", default="data", help="torchvision's data folder (MNIST/raw/ below it)")
add("--out", help="output folder (default: out/mnist-SCHEDULE)")
add("--limit", type=positive_int, help="train on the first N images only (quick runs)")
add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 "
    "autocast on a CPU with native bf16 (AVX512-BF16 or AMX), else float32 (README, appendix E)")
add("--resume", action="store_true", help="continue OUT/ckpt.pt with its settings, but --epochs, "
    "--data, --device, --dtype, --nfe, --guidance, --guidance-shape as given here (--cooldown "
    "where given)")
# sampling: the pictures of every epoch, and --sample
add("--sample", type=positive_int, metavar="N", help="no training: N digits into OUT/samples.pt")
add("--raw", action="store_true", help="with --sample: the trained weights, not their average")
add("--nfe", type=positive_int, help="network evaluations per image, by the sampler measured best "
    f"for them (default: 20; {GUIDED_NFE} guided, two per solver evaluation)")
add("--solver", choices=list(SOLVERS), help="instead of --nfe's: euler (1 network evaluation per "
    "step), heun or midpoint (2), heun-euler (2, the last step 1)")
add("--steps", type=positive_int, help="instead of --nfe's: solver steps (Eq. 7 for Euler)")
add("--grid", choices=list(GRIDS), help="instead of --nfe's: the steps' times (uniform, early: "
    "shorter steps first, edm: Karras et al.)")
# the handout's recipe, with the batch size and Euler steps its text leaves open (README)
HANDOUT = {"t_dist": "uniform", "batch_size": 128, "ema": 0.0, "solver": "euler", "steps": 100,
           "grid": "uniform"}
add("--handout", action="store_true", help="the handout's recipe as we run it: " + " ".join(
    f"--{k.replace('_', '-')} {v}" for k, v in HANDOUT.items()) + "; a setting given wins")
# the chapters: OT pairs (README, section 4), dequantising, Blend, width (8), labels, guidance (6)
add("--pairing", default="random", choices=["random", "ot"], help="noise and digits paired "
    "independently, or re-paired in each batch by optimal transport (--conditional: by class)")
add("--dequantize", action="store_true", help="each digit's pixels moved uniformly within their "
    "grey level's bin, afresh every batch")
add("--predict", default="v", choices=["v", "blend"], help="what the U-Net's output is: the "
    "velocity v, or beta_t x1 + (1 - beta_t) v, the digit near the data (section 8's Blend; "
    "always float32)")
add("--importance", action="store_true", help="instead of --t-dist (with --schedule linear): t "
    "for the diffusion bound of the likelihood, drawn in proportion to the root mean square of "
    "its weighted terms, each loss weighted (section 8's ImportanceT)")
add("--width", type=positive_int, default=32, help="the U-Net's channels in its first and last "
    "blocks, twice as many in the middle (the handout's: 32; section 8)")
add("--conditional", action="store_true", help="learn each digit's class too (ten one-hot maps, "
    "a learned shift at each later block), 'no label' with probability --label-drop")
add("--label-drop", type=probability, default=0.1, metavar="P", help="how often a label is dropped")
add("--guidance", type=non_negative_float, metavar="W", help="a conditional model's field "
    f"v_u + W(t) (v_c - v_u); W = 1: v_c; another W (a constant 0 aside) takes two (default: "
    f"{GUIDANCE:g})")
add("--guidance-shape", choices=SHAPES, help="W(t) = 1 + (W - 1) t (ramp: v_c at t = 0, W at "
    f"t = 1) or W (constant) (default: {GUIDANCE_SHAPE})")
add("--digit", type=int, choices=range(10), help="--sample this digit only (default: each in turn)")

def main(argv=None):
    args = parser.parse_args(argv)
    if args.handout:  # HANDOUT's settings become the defaults; a setting given still wins
        args = parser.parse_args(argv, argparse.Namespace(**HANDOUT))
    args.out = args.out or f"out/mnist-{args.schedule}"
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)  # bf16 autocast only where the CPU has it
    if args.sample:  # no training: draw from a trained run
        return draw(args, ckpt_path, device, dtype)
    check_guidance_flags(args)  # --digit is for --sample, --guidance for a conditional model
    if args.importance and args.schedule != "linear":
        die("--importance weighs t by the linear schedule's bound: add --schedule linear")
    if args.importance and any(a.startswith(("--t-dist", "--t-mean"))
                               for a in (sys.argv[1:] if argv is None else argv)):
        die("--importance draws t itself: leave out --t-dist and --t-mean")

    if args.cooldown and args.cooldown > args.epochs:
        die(f"--cooldown {args.cooldown} is longer than the run's --epochs {args.epochs}")

    # -------------------------------------------------------------------------
    # set-up: a fresh U-Net, or with --resume the one in OUT/ckpt.pt and its settings
    torch.manual_seed(args.seed)
    ckpt = None
    if args.resume:
        ckpt, args, model = resume(ckpt_path, args, "mnist.py")
    elif os.path.exists(ckpt_path):
        die(f"{ckpt_path} exists: add --resume to continue that run, or choose another --out")
    else:  # about 200 W^2 parameters, each held 5 times: weights, gradients, Adam's 2, average
        check_memory(5 * 4 * 200 * args.width ** 2, f"--width {args.width}", device)
        model = make_unet(args.conditional, args.predict, args.schedule, args.width)
    make_dir(args.out)

    # -------------------------------------------------------------------------
    # data: x1 ~ mu_1, all training digits (N, 1, 28, 28) in [-1, 1], and their classes (N,)
    x1_all, y_all = (a[: args.limit].to(device) for a in load_images("MNIST", args.data,
                                                                      labels=True))
    N = len(x1_all)
    need = step_memory(model, min(args.batch_size, N))  # a step's activations, gradients
    check_memory(need, f"--batch-size {args.batch_size}", device)  # refused now, if too many
    # the same noise every epoch, so the grids can be compared (conditional: 8 of each digit)
    fixed = fixed_noise(80 if args.conditional else 64, args.seed)
    fixed_y = torch.arange(10).repeat_interleave(8) if args.conditional else None

    # -------------------------------------------------------------------------
    # model, optimiser and the weights' moving average; channels_last: the fast conv kernels'
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    start = restore_state(ckpt, opt, ema, device) if ckpt else 0  # epochs done
    learned = ImportanceT() if args.importance else None  # section 8: where t is drawn
    if learned and ckpt:
        learned.load_state_dict(ckpt["importance"])
    schedule = get_schedule(args.schedule)
    if args.predict == "blend":  # section 8: Blend runs in float32 whatever --dtype says
        dtype = torch.float32
    print(f"device {device}, dtype {str(dtype)[6:]}, schedule {args.schedule}, seed {args.seed}, "
          f"{N} training images, {sum(p.numel() for p in model.parameters())} parameters")
    # the sampler of the pictures: --nfe's (a conditional model's guided by --guidance)
    w, shape, per, budget = guidance(args, args.conditional, ckpt_path, "mnist.py")
    solver, n_steps, grid = plan(budget, args.schedule, args.solver, args.steps, args.grid)
    ts = time_grid(grid, n_steps, args.schedule)
    print(f"pictures: {solver}, {n_steps} steps on the {grid} grid "
          f"({nfe(solver, n_steps) * per} network evaluations)")

    # -------------------------------------------------------------------------
    # the training loop
    batches = math.ceil(N / args.batch_size)  # optimiser steps per epoch
    n, saved = start * batches, start  # optimiser steps so far; the epoch in OUT/ckpt.pt
    try:
        for epoch in range(start, args.epochs):
            t0, total = time.time(), 0.0
            for step, idx in enumerate(torch.randperm(N).split(args.batch_size), 1):
                x1 = x1_all[idx.to(device)]  # (B, 1, 28, 28), digits
                if args.dequantize:          # section 8: each pixel anywhere in its grey level
                    x1 = dequantize(x1)
                x0 = torch.randn_like(x1)    # x0 ~ mu_0 = N(0, I), fresh noise for every batch
                y = y_all[idx.to(device)] if args.conditional else None  # section 6: classes
                if args.pairing == "ot":     # section 4: re-paired, least total distance
                    x0 = x0[ot_pairing(x0, x1, y)]
                net = model
                if args.conditional:         # section 6: the class, or "no label" (--label-drop)
                    y = drop_labels(y, args.label_drop)
                    net = lambda xt, t: model(xt, t, y)
                if learned:                  # section 8: t for the bound, and each one's weight
                    t, weight = learned.draw(len(x1), device)
                else:
                    t = draw_t(len(x1), args.t_dist, args.t_mean, device)  # each sample's time
                with autocast(device, dtype):
                    loss = fm_loss(net, x0, x1, schedule, t, reduce=not learned)  # Eq. 4
                if learned:                  # the weighted mean; each loss tells q where to look
                    loss = learned.weigh(t, weight, loss)
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

            # outputs: the grid of this epoch from the fixed noise, then the checkpoint, with all
            # it takes to resume exactly, and never with non-finite weights
            sampler = ema if ema is not None else model
            check_weights([model, sampler], epoch + 1, args.lr)
            x = generate(sampler, fixed, n_steps, device, dtype, solver, ts, y=fixed_y, w=w,
                         shape=shape)
            save_grid(x, os.path.join(args.out, f"epoch{epoch + 1:03d}.png"), nrow=8)
            atomic_save({
                "script": "mnist.py", "model": model.state_dict(),
                "optimizer": opt.state_dict(), "config": vars(args),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                **({"importance": learned.state_dict()} if learned else {}),
                "epoch": epoch + 1, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            }, ckpt_path)
            saved = epoch + 1
            # and the sampling weights alone (0.8 MB at --width 32), one file per epoch, for
            # evaluate.py --curve
            atomic_save({"script": "mnist.py", "ema" if ema is not None else "model":
                         sampler.state_dict(), "config": vars(args), "epoch": epoch + 1},
                        os.path.join(args.out, f"epoch{epoch + 1:03d}.pt"))
    except KeyboardInterrupt:  # Ctrl-C: one line, where the run stands and how to go on; exit 130
        interrupted("mnist.py", args, epoch + 1, saved, ckpt_path)

# -----------------------------------------------------------------------------
# --sample: no training, digits from a trained run

def draw(args, ckpt_path, device, dtype):
    """--sample N: N digits from N noise images fixed by --seed, drawn with the weights of
    OUT/ckpt.pt: OUT/samples.pt (N, 1, 28, 28) in [0, 1], samples.png, flow.png and
    flow.gif. A conditional model draws --digit, or 0, 1, ..., 9 in turn, guided by
    --guidance and --guidance-shape; the labels asked for go into OUT/samples-labels.pt (N,),
    and with --digit the same 8 noise images under several W into OUT/strip.png."""
    model, config = load_model(ckpt_path, device, args.raw, script="mnist.py")
    schedule = config.get("schedule", "cosine")  # the one the weights were trained for
    w, shape, per, budget = guidance(args, config.get("conditional"), ckpt_path, "mnist.py")
    y = labels_to_ask(args, args.sample) if config.get("conditional") else None
    solver, n_steps, grid = plan(budget, schedule, args.solver, args.steps, args.grid)
    ts = time_grid(grid, n_steps, schedule)
    check_memory(2 * args.sample * 28 * 28 * 4, f"--sample {args.sample}")  # noise and digits
    t0 = time.time()
    x0 = fixed_noise(args.sample, args.seed)
    x, path = generate(model, x0, n_steps, device, dtype, solver, ts, keep=64, y=y, w=w,
                       shape=shape)
    dt = time.time() - t0
    print(f"{len(x)} images, {solver}, {n_steps} steps on the {grid} grid "
          f"({nfe(solver, n_steps) * per} network evaluations each"
          f"{f', two per solver evaluation: guidance {w:g}, {shape}' if per == 2 else ''}): "
          f"{dt:.1f} s ({len(x) / dt:.1f} img/s)")
    atomic_save(x, os.path.join(args.out, "samples.pt"))  # (N, 1, 28, 28) in [0, 1]
    save_grid(x[:256], os.path.join(args.out, "samples.png"), nrow=16)
    save_flow(path, ts, args.out)  # the first 64 on their way from t = 0 to 1
    print(f"wrote {args.out}/samples.pt, samples.png, flow.png and flow.gif")
    if y is not None:
        atomic_save(y, os.path.join(args.out, "samples-labels.pt"))  # the digits asked for
        print(f"wrote {args.out}/samples-labels.pt")
    if args.digit is not None:  # the same 8 noise images under several W, a row each
        first8 = fixed_noise(8, args.seed)
        strip = [generate(model, first8, n_steps, device, dtype, solver, ts, y=y[:1].repeat(8),
                          w=v, shape=shape) for v in STRIP[shape]]
        save_grid(torch.cat(strip), os.path.join(args.out, "strip.png"), nrow=8)
        print(f"wrote {args.out}/strip.png (rows: guidance {', '.join(map(str, STRIP[shape]))}, "
              f"{shape})")

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, exit status 130 (files: common.atomic_write)
        print(f"{os.path.basename(__file__)}: interrupted", file=sys.stderr)
        raise SystemExit(130)
