"""
Flow matching on MNIST with the handout's small U-Net (section 3): noise -> digits.

Train; after every epoch it writes an 8x8 grid of samples from the same fixed noise
(OUT/epoch001.png, ...), the sampling weights (OUT/epoch001.pt, ...) and a checkpoint
OUT/ckpt.pt:
    python mnist.py --schedule cosine --epochs 20        # OUT = out/mnist-cosine
    python mnist.py --limit 2000 --epochs 2              # a one-minute look on a laptop CPU
    python mnist.py --pairing reflow --teacher weights/mnist-cosine   # a straighter flow
Continue an interrupted run, or draw samples from a trained one:
    python mnist.py --out out/mnist-cosine --resume --epochs 30
    python mnist.py --out out/mnist-cosine --sample 64   # OUT/samples.pt (64, 1, 28, 28), .png

The maths (fm_loss, the samplers, the U-Net) is in common.py; the run is all here.
"""
import argparse
import copy
import math
import os
import sys
import time

import torch

from common import (GRIDS, GUIDANCE, GUIDANCE_SHAPE, GUIDED_NFE, NO_LABEL, SCHEDULES, SHAPES,
                    SOLVERS, STRIP, T_DISTS, atomic_save, autocast, check_loss, check_memory,
                    check_weights, decay, dequantize, die, fixed_noise, fm_loss, generate,
                    get_schedule, guidance, interrupted, labels_to_ask, load_checkpoint,
                    load_images, load_model, make_dir, make_unet, nfe, non_negative_float,
                    ot_pairing, pick_device, pick_dtype, plan, positive_float, positive_int,
                    probability, progress, restore_state, resume, save_flow, save_grid,
                    time_grid, update_ema)

# -----------------------------------------------------------------------------
# settings; the defaults are the recommended run (README, appendix A). translate.py has the
# same settings; test_fm.py lists the defaults in which the two differ, and why.
parser = argparse.ArgumentParser(description="Flow matching on MNIST: noise -> digits.")
parser.error = die  # argparse's errors in one line, without its usage block
add = parser.add_argument
add("--schedule", default="cosine", choices=list(SCHEDULES),
    help="the path from x0 to x1 (Eq. 5) (default: %(default)s)")
add("--epochs", type=positive_int, default=20,
    help="passes over the training set (default: %(default)s)")
add("--batch-size", type=positive_int, default=32,
    help="images per optimiser step (default: %(default)s)")
add("--lr", type=positive_float, default=1e-3, help="Adam's learning rate (default: %(default)s)")
add("--t-dist", default="logit-normal", choices=list(T_DISTS), help="the distribution of t in "
    "training (the handout's: uniform; --pairing reflow's: half-zero, t = 0 with probability "
    "1/2; common.fm_loss) (default: %(default)s)")
add("--t-mean", type=float, default=-0.5, help="logit-normal t: the mean of the normal (< 0: more "
    "training near the noise end, > 0: near the data end) (default: %(default)s)")
add("--warmup", type=positive_int, default=None, help="optimiser steps over which the learning "
    "rate rises linearly to --lr (default: none)")
add("--clip", type=positive_float, default=None,
    help="clip the norm of the gradient to this (default: none)")
# --pairing reflow: the student's own defaults (README, section 7); a setting given wins
REFLOW = {"schedule": "linear", "t_dist": "half-zero"}
PAIR_SEED = 12345  # + --seed: the pairs' noise, not the noise sets 0 and 1 that are scored
add("--pairing", default="random", choices=["random", "ot", "reflow"], help="which noise image "
    "meets which digit: drawn independently, re-paired in each batch by optimal transport "
    "(--conditional: within each class), or "
    "reflow: the digit --teacher carries it to (README, section 7), with "
    + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in REFLOW.items())
    + " unless given (default: %(default)s)")
add("--teacher", default=None, metavar="RUN", help="--pairing reflow: the trained run (OUT of "
    "mnist.py, or weights/mnist-cosine) whose samples are the digits; its sampling weights (the "
    "moving average where it has one) start the student")
add("--pairs", type=positive_int, default=60000, metavar="N", help="--pairing reflow: the noise "
    "images the teacher carries to digits, once, into OUT/pairs.pt (default: %(default)s)")
add("--dequantize", action="store_true", help="each training digit's pixels moved uniformly "
    "within their grey level's bin, afresh every batch: a density on continuous images, as "
    "evaluate.py --bpd measures it (README, section 8)")
add("--conditional", action="store_true", help="learn each digit's class too (the label: ten "
    "one-hot maps beside the time map, and a learned shift at each later block), replaced by "
    "'no label' with probability --label-drop, so that one network learns both fields "
    "classifier-free guidance mixes (README, section 6)")
add("--label-drop", type=probability, default=0.1, metavar="P",
    help="--conditional: how often a label is dropped in training (default: %(default)s)")
add("--ema", type=decay, default=0.999, metavar="DECAY",
    help="moving average of the weights, used for sampling (0: none) (default: %(default)s)")
add("--nfe", type=positive_int, default=None, help="sample with at most this many network "
    "evaluations an image, by the solver, grid and steps that measured best for it "
    f"(default: 20; {GUIDED_NFE} for a guided conditional model, whose solver evaluations take "
    "two network evaluations each)")
add("--solver", default=None, choices=list(SOLVERS), help="instead of --nfe's choice: euler "
    "(1 network evaluation a step), heun or midpoint (2), heun-euler (2, the last step 1)")
add("--steps", type=positive_int, default=None,
    help="instead of --nfe's choice: solver steps (Eq. 7 for Euler)")
add("--grid", default=None, choices=list(GRIDS), help="instead of --nfe's choice: the times of "
    "the steps, uniform, early (shorter steps first) or edm (Karras et al.)")
add("--seed", type=int, default=0,
    help="seeds the training and the fixed sampling noise (default: %(default)s)")
add("--limit", type=positive_int, default=None,
    help="train on the first N images only (quick runs)")
add("--data", default="data",
    help="torchvision's data folder (MNIST/raw/ below it) (default: %(default)s)")
add("--out", default=None,
    help="output folder (default: out/mnist-SCHEDULE; --pairing reflow: out/mnist-reflow)")
add("--device", default="auto",
    help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps (default: %(default)s)")
add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
    help="auto: bf16 autocast on a CPU with native bf16 (AVX512-BF16 or AMX), float32 "
    "elsewhere, GPUs included (README, appendix E) (default: %(default)s)")
add("--resume", action="store_true",
    help="continue OUT/ckpt.pt with its settings, but --epochs, --nfe, --guidance and "
    "--guidance-shape as given here")
add("--sample", type=positive_int, default=None, metavar="N",
    help="no training: N digits from OUT/ckpt.pt into OUT/samples.pt and .png")
add("--raw", action="store_true",
    help="with --sample: the trained weights, not their moving average")
add("--digit", type=int, choices=range(10), default=None, metavar="D", help="with --sample, a "
    "conditional model: draw this digit (default: 0, 1, ..., 9 in turn)")
add("--guidance", type=non_negative_float, default=None, metavar="W", help="a conditional "
    "model's field: v_u + W(t) (v_c - v_u); W = 1 is the conditional field, and another W "
    "doubles the network evaluations (but a constant W = 0, the unconditional field) "
    f"(default: {GUIDANCE:g})")
add("--guidance-shape", default=None, choices=SHAPES, help="W(t) = 1 + (W - 1) t (ramp: the "
    f"conditional field at t = 0, W at t = 1) or W (constant) (default: {GUIDANCE_SHAPE})")
# --handout: the handout's t ~ U(0, 1), no moving average and Euler sampling, with the batch
# size and Euler steps its text leaves open (our choices: README)
HANDOUT = {"t_dist": "uniform", "batch_size": 128, "ema": 0.0, "solver": "euler", "steps": 100,
           "grid": "uniform"}
add("--handout", action="store_true", help="the handout's recipe as we run it: "
    + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in HANDOUT.items())
    + "; a setting given besides it wins")

# settings newer than some checkpoints: what a checkpoint saved before them trained with
OLDER = {"t_dist": "uniform", "t_mean": 0.0, "warmup": None, "clip": None, "pairing": "random",
         "conditional": False, "label_drop": 0.1, "dequantize": False}

def draw(args, ckpt_path, device, dtype):
    """--sample N, no training: N digits from N noise images fixed by --seed, drawn with the
    weights of OUT/ckpt.pt: OUT/samples.pt (N, 1, 28, 28) in [0, 1], samples.png, flow.png
    and flow.gif. A conditional model draws --digit, or 0, 1, ..., 9 in turn, guided by
    --guidance and --guidance-shape; the labels asked for go into OUT/samples-labels.pt (N,)."""
    model, config = load_model(ckpt_path, device, args.raw, script="mnist.py")
    schedule = config.get("schedule", "cosine")  # the one the weights were trained for
    w, shape, per, budget = guidance(args, config.get("conditional"), ckpt_path, "mnist.py")
    y = labels_to_ask(args, args.sample) if config.get("conditional") else None
    solver, n_steps, grid = plan(budget, schedule, args.solver, args.steps, args.grid,
                                 reflowed=config.get("pairing") == "reflow")
    ts = time_grid(grid, n_steps, schedule)
    check_memory(2 * args.sample * 28 * 28 * 4, f"--sample {args.sample}")  # noise and digits
    t0 = time.time()
    x0 = fixed_noise(args.sample, args.seed)
    x, path = generate(model, x0, n_steps, device, dtype, solver, ts, keep=64, y=y, w=w,
                       shape=shape)
    dt = time.time() - t0
    print(f"{len(x)} images, {solver}, {n_steps} steps on the {grid} grid "
          f"({nfe(solver, n_steps) * per} network evaluations each"
          f"{f', two a solver evaluation: guidance {w:g}, {shape}' if per == 2 else ''}): "
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

def load_teacher(args, device):
    """--teacher: the trained, unconditional mnist.py run that reflow learns from, and its
    settings."""
    teacher, config = load_model(os.path.join(args.teacher, "ckpt.pt"), device,
                                 script="mnist.py")
    if config.get("conditional"):
        die(f"--teacher {args.teacher} is a conditional run; reflow learns an unconditional one")
    return teacher, config

def make_pairs(args, device, dtype):
    """--pairing reflow: the pairs (x0, x1) the student learns, both (--pairs, 1, 28, 28) in
    [-1, 1]: noise x0 fixed by PAIR_SEED + --seed (drawn again on every run), and x1 the
    digit the teacher carries it to with its sampler of --nfe 20, made once into
    OUT/pairs.pt (in float16: 1.5 KB a pair) and read back by a run in the same OUT, --resume
    too."""
    path = os.path.join(args.out, "pairs.pt")
    check_memory(3 * args.pairs * 28 * 28 * 4, f"--pairs {args.pairs}")  # x0, x1 and a copy
    x0 = fixed_noise(args.pairs, PAIR_SEED + args.seed)
    made = {"teacher": args.teacher, "seed": PAIR_SEED + args.seed}
    if os.path.exists(path):
        pairs = load_checkpoint(path)
        if not (isinstance(pairs, dict) and {k: pairs.get(k) for k in made} == made
                and len(pairs.get("x1", ())) == args.pairs):
            die(f"{path} holds other pairs than those of --teacher {args.teacher} --pairs "
                f"{args.pairs} --seed {args.seed}: choose another --out, or delete it")
        print(f"pairs: {path}, {args.pairs} digits of --teacher {args.teacher}")
        return x0, pairs["x1"].float()
    teacher, config = load_teacher(args, device)
    solver, n_steps, grid = plan(20, config.get("schedule", "cosine"),
                                 reflowed=config.get("pairing") == "reflow")
    ts = time_grid(grid, n_steps, config.get("schedule", "cosine"))
    t0, x1 = time.time(), []
    for i, chunk in enumerate(x0.split(2560)):  # with a line of progress for each chunk
        x1.append(generate(teacher, chunk, n_steps, device, dtype, solver, ts) * 2 - 1)
        done = min((i + 1) * 2560, args.pairs)
        print(f"  pairs: {done}/{args.pairs} from --teacher {args.teacher}, {solver}, {n_steps} "
              f"steps ({nfe(solver, n_steps)} evaluations) | {done / (time.time() - t0):.0f} "
              f"img/s", flush=True)
    x1 = torch.cat(x1).half()  # what is kept is what every epoch learns, resumed or not
    atomic_save({**made, "x1": x1}, path)
    return x0, x1.float()

def main(argv=None):
    args = parser.parse_args(argv)
    if args.handout or args.pairing == "reflow":  # their settings become the defaults
        defaults = {**(HANDOUT if args.handout else {}),
                    **(REFLOW if args.pairing == "reflow" else {})}
        args = parser.parse_args(argv, argparse.Namespace(**defaults))
    reflow = args.pairing == "reflow"
    args.out = args.out or f"out/mnist-{'reflow' if reflow else args.schedule}"
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    if args.sample:  # no training: draw from a trained run
        return draw(args, ckpt_path, device, dtype)
    if args.digit is not None:
        die("--digit is for --sample; a conditional run's pictures show every digit")
    for k in ("guidance", "guidance_shape"):
        if getattr(args, k) is not None and not (args.conditional or args.resume):
            die(f"--{k.replace('_', '-')} is for a conditional model: add --conditional")
    if args.teacher is not None and not reflow:
        die("--teacher is for --pairing reflow")
    if reflow and args.teacher is None and not args.resume:
        die("--pairing reflow needs --teacher RUN, the trained run whose samples it learns")
    if reflow and args.conditional:
        die("--pairing reflow learns an unconditional teacher: drop --conditional")
    if reflow and args.dequantize:
        die("--dequantize is for the training digits; --pairing reflow learns the teacher's "
            "samples")
    if reflow and args.limit:
        die("--limit is for the training digits; --pairing reflow makes --pairs N, ask for fewer")
    if args.pairs != parser.get_default("pairs") and not reflow:
        die("--pairs is for --pairing reflow")
    if args.teacher is not None:
        args.teacher = os.path.normpath(args.teacher)  # weights/x/ and weights/x: one teacher

    # -------------------------------------------------------------------------
    # set-up: a fresh U-Net, or with --resume the one in OUT/ckpt.pt and its settings
    torch.manual_seed(args.seed)
    model, ckpt = make_unet(args.conditional), None
    if args.resume:
        ckpt, args, model = resume(ckpt_path, args, "mnist.py", OLDER)
    elif os.path.exists(ckpt_path):
        die(f"{ckpt_path} exists: add --resume to continue that run, or choose another --out")
    elif reflow:  # the student starts as the teacher: its sampling weights
        model.load_state_dict(load_teacher(args, device)[0].state_dict())
    make_dir(args.out)

    # -------------------------------------------------------------------------
    # data: x1 ~ mu_1, all training digits in one tensor (N, 1, 28, 28) in [-1, 1], their
    # classes (N,); reflow: the teacher's digits x1 and the noise x0 it carried to each
    if args.pairing == "reflow":
        x0_all, x1_all = (a[: args.limit].to(device) for a in make_pairs(args, device, dtype))
        y_all = None
    else:
        x1_all, y_all = (a[: args.limit].to(device) for a in load_images("MNIST", args.data,
                                                                          labels=True))
    N = len(x1_all)
    # the same noise every epoch, so the grids can be compared (conditional: 8 of each digit)
    fixed = fixed_noise(80 if args.conditional else 64, args.seed)
    fixed_y = torch.arange(10).repeat_interleave(8) if args.conditional else None
    w, shape, per, budget = guidance(args, args.conditional, ckpt_path, "mnist.py")  # pictures
    schedule = get_schedule(args.schedule)

    # -------------------------------------------------------------------------
    # model, optimiser and the moving average of the weights. channels_last is the layout
    # the fast conv kernels want.
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    start = restore_state(ckpt, opt, ema, device) if ckpt else 0  # epochs done
    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, schedule {args.schedule}, "
          f"seed {args.seed}, {N} training images, {sum(p.numel() for p in model.parameters())} "
          f"parameters")
    solver, n_steps, grid = plan(budget, args.schedule, args.solver, args.steps, args.grid,
                                 reflowed=args.pairing == "reflow")
    ts = time_grid(grid, n_steps, args.schedule)  # the sampler of the pictures
    print(f"pictures: {solver}, {n_steps} steps on the {grid} grid "
          f"({nfe(solver, n_steps) * per} network evaluations)")

    # -------------------------------------------------------------------------
    # the training loop
    batches = math.ceil(N / args.batch_size)  # optimiser steps an epoch
    n, saved = start * batches, start  # optimiser steps so far; the epoch in OUT/ckpt.pt
    try:
        for epoch in range(start, args.epochs):
            t0, total = time.time(), 0.0
            for step, idx in enumerate(torch.randperm(N).split(args.batch_size), 1):
                x1 = x1_all[idx.to(device)]   # (B, 1, 28, 28), digits
                if args.dequantize:           # continuous: each pixel anywhere in its bin
                    x1 = dequantize(x1)
                if args.pairing == "reflow":  # the noise the teacher carried to these digits
                    x0 = x0_all[idx.to(device)]
                else:                         # x0 ~ mu_0 = N(0, I), fresh noise for every batch
                    x0 = torch.randn_like(x1)
                y = y_all[idx.to(device)] if args.conditional else None  # the digits' classes
                if args.pairing == "ot":  # re-paired, least total distance (conditional: by class)
                    x0 = x0[ot_pairing(x0, x1, y)]
                net = model
                if args.conditional:  # each class "no label" with probability --label-drop
                    drop = torch.rand(len(y), device=device) < args.label_drop
                    y = torch.where(drop, NO_LABEL, y)
                    net = lambda xt, t: model(xt, t, y)
                with autocast(device, dtype):
                    loss = fm_loss(net, x0, x1, schedule, args.t_dist, args.t_mean)
                total += loss.item() * len(idx)
                check_loss(total, loss, step, epoch + 1, args.lr)  # before it can spoil the weights
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if args.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                if args.warmup:  # from the step count, so that a resumed run goes on exactly
                    opt.param_groups[0]["lr"] = args.lr * min(1, (n + 1) / args.warmup)
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
                "epoch": epoch + 1, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            }, ckpt_path)
            saved = epoch + 1
            # and the sampling weights alone (0.8 MB), one file an epoch: evaluate.py --curve
            atomic_save({"script": "mnist.py", "ema" if ema is not None else "model":
                         sampler.state_dict(), "config": vars(args), "epoch": epoch + 1},
                        os.path.join(args.out, f"epoch{epoch + 1:03d}.pt"))
    except KeyboardInterrupt:  # Ctrl-C: one line, where the run stands and how to go on; exit 130
        interrupted("mnist.py", args, epoch + 1, saved, ckpt_path)

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, exit status 130 (files: common.atomic_write)
        print(f"{os.path.basename(__file__)}: interrupted", file=sys.stderr)
        raise SystemExit(130)
