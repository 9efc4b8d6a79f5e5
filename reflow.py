"""
Reflow (Liu et al. 2022; README, section 7): a straighter flow, for one or two network
evaluations per image.

A trained flow, the teacher (a run of mnist.py; of reflow.py for a second reflow), carries
noise x0 to digits x1; the pairs (x0, x1) are made once into OUT/pairs.pt. A student, which
starts as the teacher, learns the straight lines between them: mnist.py's loop, with the
pairs' x0 in place of fresh noise and the teacher's digits in place of the training digits.
Two trajectories of a flow never meet, so these lines cross far less than random pairs do,
and one Euler step follows them. Defaults: the linear schedule (its paths are the lines)
and t = 0 for half the samples (--t-dist half-zero), where the target is the whole step,
x1 - x0, from noise alone.

    python reflow.py --teacher weights/mnist-cosine          # pairs, 20 epochs: out/mnist-reflow
    python reflow.py --teacher weights/mnist-cosine --pairs 2000 --epochs 2   # a quick look
    python reflow.py --out out/mnist-reflow --resume --epochs 30
    python reflow.py --out weights/mnist-reflow --sample 64 --nfe 1   # one evaluation each

After every epoch: OUT/epochNNN.png (64 digits from fixed noise), OUT/epochNNN.pt (the
sampling weights) and OUT/ckpt.pt, as mnist.py writes them; --sample N writes
OUT/samples.pt (N, 1, 28, 28) in [0, 1], samples.png, flow.png and flow.gif.
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
# the chapters: how t is drawn (README, sections 3 and 7), samplers (section 3, appendix D)
from common import GRIDS, SOLVERS, T_DISTS, draw_t, plan, time_grid
# plumbing, which a learner can skip
from common import (Help, atomic_save, autocast, check_loss, check_memory,
                    check_weights, decay, die, finite_float, fixed_noise, generate, interrupted,
                    learning_rate, load_checkpoint, load_model, make_dir, nfe, pick_device,
                    pick_dtype, positive_float, positive_int, progress, restore_state, resume,
                    save_flow, save_grid, step_memory)

# -----------------------------------------------------------------------------
# settings: mnist.py's recipe, with the student's own schedule and t, and the teacher's pairs
parser = argparse.ArgumentParser(description="Reflow: a straighter flow from a trained one's "
                                 "pairs of noise and digits.", formatter_class=Help)
parser.error = die  # argparse's errors in one line, without its usage block
add = parser.add_argument
# the teacher and its pairs
add("--teacher", metavar="RUN", help="the trained run (OUT of mnist.py or reflow.py, or "
    "weights/mnist-cosine) whose samples are the digits; its sampling weights start the student")
add("--pairs", type=positive_int, default=60000, metavar="N", help="the noise images the teacher "
    "carries to digits, once, into OUT/pairs.pt")
# the recipe
add("--schedule", default="linear", choices=list(SCHEDULES), help="the path from x0 to x1 (Eq. 5)")
add("--epochs", type=positive_int, default=20, help="passes over the pairs")
add("--batch-size", type=positive_int, default=32, help="pairs per optimiser step")
add("--lr", type=positive_float, default=1e-3, help="Adam's learning rate")
add("--t-dist", default="half-zero", choices=list(T_DISTS), help="how t is drawn (draw_t)")
add("--t-mean", type=finite_float, default=-0.5, help="logit-normal t: the normal's mean")
add("--ema", type=decay, default=0.999, metavar="D", help="the weights' moving average (0: none)")
add("--warmup", type=positive_int, metavar="N", help="the learning rate rises to --lr over N steps")
add("--cooldown", type=positive_int, metavar="N", help="the last N epochs' learning rate falls "
    "linearly towards 0; the epochs before are a run's without it (common.learning_rate)")
add("--clip", type=positive_float, help="clip the norm of the gradient to this")
add("--seed", type=int, default=0, help="seeds the training, the pairs' noise (+ 12345) and the "
    "fixed sampling noise")
# the run
add("--out", default="out/mnist-reflow", help="output folder")
add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 "
    "autocast on a CPU with native bf16 (AVX512-BF16 or AMX), else float32 (README, appendix E)")
add("--resume", action="store_true", help="continue OUT/ckpt.pt with its settings and pairs, "
    "but --epochs, --device, --dtype and --nfe as given here (--cooldown where given)")
# sampling: the pictures of every epoch, and --sample
add("--sample", type=positive_int, metavar="N", help="no training: N digits into OUT/samples.pt")
add("--raw", action="store_true", help="with --sample: the trained weights, not their average")
add("--nfe", type=positive_int, default=20, help="network evaluations per image, by the sampler "
    "measured best for them on reflowed models")
add("--solver", choices=list(SOLVERS), help="instead of --nfe's: euler (1 network evaluation per "
    "step), heun or midpoint (2), heun-euler (2, the last step 1)")
add("--steps", type=positive_int, help="instead of --nfe's: solver steps (Eq. 7 for Euler)")
add("--grid", choices=list(GRIDS), help="instead of --nfe's: the steps' times (uniform, early: "
    "shorter steps first, edm: Karras et al.)")
PAIR_SEED = 12345  # + --seed: the pairs' noise, not the noise sets 0 and 1 that are scored

def main(argv=None):
    args = parser.parse_args(argv)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)  # bf16 autocast only where the CPU has it
    if args.sample:  # no training: draw from a trained student
        return draw(args, ckpt_path, device, dtype)
    if args.teacher is None and not args.resume:
        die("reflow.py needs --teacher RUN, the trained run whose samples it learns")
    if args.teacher is not None:
        args.teacher = os.path.normpath(args.teacher)  # weights/x/ and weights/x: one teacher

    if args.cooldown and args.cooldown > args.epochs:
        die(f"--cooldown {args.cooldown} is longer than the run's --epochs {args.epochs}")

    # -------------------------------------------------------------------------
    # set-up: the student starts as the teacher (its sampling weights), or with --resume as
    # OUT/ckpt.pt with its settings
    torch.manual_seed(args.seed)
    model, ckpt = make_unet(), None
    if args.resume:
        ckpt, args, model = resume(ckpt_path, args, "reflow.py")
    elif os.path.exists(ckpt_path):
        die(f"{ckpt_path} exists: add --resume to continue that run, or choose another --out")
    else:
        model.load_state_dict(load_teacher(args.teacher, device)[0].state_dict())
    make_dir(args.out)

    # -------------------------------------------------------------------------
    # data: the pairs, x0 the noise and x1 the digit the teacher carries it to, each
    # (N, 1, 28, 28), x1 in [-1, 1]
    x0_all, x1_all = (a.to(device) for a in make_pairs(args, device, dtype))
    N = len(x1_all)
    need = step_memory(model, min(args.batch_size, N))  # a step's activations, gradients
    check_memory(need, f"--batch-size {args.batch_size}", device)  # refused now, if too many
    fixed = fixed_noise(64, args.seed)  # the same noise every epoch, so the grids compare

    # -------------------------------------------------------------------------
    # model, optimiser and the moving average of the weights, as in mnist.py
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    start = restore_state(ckpt, opt, ema, device) if ckpt else 0  # epochs done
    schedule = get_schedule(args.schedule)
    print(f"device {device}, dtype {str(dtype)[6:]}, schedule {args.schedule}, seed {args.seed}, "
          f"{N} pairs of --teacher {args.teacher}")
    solver, n_steps, grid = plan(args.nfe, args.schedule, args.solver, args.steps, args.grid,
                                 reflowed=True)
    ts = time_grid(grid, n_steps, args.schedule)  # the sampler of the pictures
    print(f"pictures: {solver}, {n_steps} steps on the {grid} grid "
          f"({nfe(solver, n_steps)} network evaluations)")

    # -------------------------------------------------------------------------
    # the training loop: mnist.py's, on the teacher's pairs
    batches = math.ceil(N / args.batch_size)  # optimiser steps per epoch
    n, saved = start * batches, start  # optimiser steps so far; the epoch in OUT/ckpt.pt
    try:
        for epoch in range(start, args.epochs):
            t0, total = time.time(), 0.0
            for step, idx in enumerate(torch.randperm(N).split(args.batch_size), 1):
                x1 = x1_all[idx.to(device)]  # (B, 1, 28, 28), the teacher's digits
                x0 = x0_all[idx.to(device)]  # the noise the teacher carried to each of them
                t = draw_t(len(x1), args.t_dist, args.t_mean, device)  # each pair's time
                with autocast(device, dtype):
                    loss = fm_loss(model, x0, x1, schedule, t)          # Eq. 4
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

            # outputs: the grid of this epoch from the fixed noise, the checkpoint (never with
            # non-finite weights) and the sampling weights alone, as in mnist.py
            sampler = ema if ema is not None else model
            check_weights([model, sampler], epoch + 1, args.lr)
            x = generate(sampler, fixed, n_steps, device, dtype, solver, ts)
            save_grid(x, os.path.join(args.out, f"epoch{epoch + 1:03d}.png"), nrow=8)
            atomic_save({
                "script": "reflow.py", "model": model.state_dict(),
                "optimizer": opt.state_dict(), "config": vars(args),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "epoch": epoch + 1, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            }, ckpt_path)
            saved = epoch + 1
            atomic_save({"script": "reflow.py", "ema" if ema is not None else "model":
                         sampler.state_dict(), "config": vars(args), "epoch": epoch + 1},
                        os.path.join(args.out, f"epoch{epoch + 1:03d}.pt"))
    except KeyboardInterrupt:  # Ctrl-C: one line, where the run stands and how to go on; exit 130
        interrupted("reflow.py", args, epoch + 1, saved, ckpt_path)

# -----------------------------------------------------------------------------
# the teacher and its pairs

def load_teacher(run, device):
    """--teacher: the trained, unconditional run that reflow learns from (mnist.py's, or
    reflow.py's for a second reflow), and its settings."""
    teacher, config = load_model(os.path.join(run, "ckpt.pt"), device,
                                 script=("mnist.py", "reflow.py"), hint="")
    if config.get("conditional"):
        die(f"--teacher {run} is a conditional run; reflow learns an unconditional one")
    if config.get("width", 32) != 32 or config.get("predict", "v") != "v":
        die(f"--teacher {run} is not the handout's U-Net (--width or --predict); the student "
            f"starts as the teacher, a U-Net of width 32 that predicts the velocity")
    return teacher, config

def make_pairs(args, device, dtype):
    """The pairs (x0, x1) the student learns, both (--pairs, 1, 28, 28): noise x0 fixed by
    PAIR_SEED + --seed (drawn again on every run), and x1 in [-1, 1] the digit the teacher
    carries it to with its sampler of --nfe 20, made once into OUT/pairs.pt (in float16: 1.5
    KB per pair) and read back by a run in the same OUT, --resume too."""
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
    teacher, config = load_teacher(args.teacher, device)
    schedule = config.get("schedule", "cosine")
    solver, n_steps, grid = plan(20, schedule, reflowed=bool(config.get("teacher")))
    ts = time_grid(grid, n_steps, schedule)
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

# -----------------------------------------------------------------------------
# --sample: no training, digits from a trained student

def draw(args, ckpt_path, device, dtype):
    """--sample N: N digits from N noise images fixed by --seed, drawn with the weights of
    OUT/ckpt.pt by the sampler of --nfe for a reflowed model: OUT/samples.pt (N, 1, 28, 28)
    in [0, 1], samples.png, flow.png and flow.gif."""
    model, config = load_model(ckpt_path, device, args.raw, script="reflow.py")
    schedule = config.get("schedule", "linear")  # the one the weights were trained for
    solver, n_steps, grid = plan(args.nfe, schedule, args.solver, args.steps, args.grid,
                                 reflowed=True)
    ts = time_grid(grid, n_steps, schedule)
    check_memory(2 * args.sample * 28 * 28 * 4, f"--sample {args.sample}")  # noise and digits
    t0 = time.time()
    x, path = generate(model, fixed_noise(args.sample, args.seed), n_steps, device, dtype,
                       solver, ts, keep=64)
    dt = time.time() - t0
    print(f"{len(x)} images, {solver}, {n_steps} steps on the {grid} grid "
          f"({nfe(solver, n_steps)} network evaluations each): {dt:.1f} s "
          f"({len(x) / dt:.1f} img/s)")
    atomic_save(x, os.path.join(args.out, "samples.pt"))  # (N, 1, 28, 28) in [0, 1]
    save_grid(x[:256], os.path.join(args.out, "samples.png"), nrow=16)
    save_flow(path, ts, args.out)  # the first 64 on their way from t = 0 to 1
    print(f"wrote {args.out}/samples.pt, samples.png, flow.png and flow.gif")

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, exit status 130 (files: common.atomic_write)
        print(f"{os.path.basename(__file__)}: interrupted", file=sys.stderr)
        raise SystemExit(130)
