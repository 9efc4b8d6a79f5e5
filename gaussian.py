"""
Is the schedule variance preserving? (handout questions 3 to 6)

Flow matching from mu_0 = N(0, I) to mu_1 = N((1, 1), I) in 2D, once per schedule.
We generate points with the Euler sampler and measure their variance at every step
of the way, next to the theory for independent X_0, X_1:
    Var(alpha_t X_0 + beta_t X_1) = alpha_t^2 + beta_t^2 = (1 - t)^2 + t^2 (linear), 1 (cosine).

    python gaussian.py                    # both schedules, writes out/gaussian/
    python gaussian.py --schedule cosine --steps 10

Then the learned flow as a density: the mean log-density it gives held-out points of
N((1, 1), I), found by running the flow back to t = 0 (common.log_likelihood, the divergence
exact in 2D), beside the exact one: what "learned the right distribution" means, in one
number per schedule.

Writes OUT/variance.csv (schedule,t,var_measured,var_theory) and OUT/variance.png.
"""
import argparse
import csv
import math
import os
import sys
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from common import (MLP, SCHEDULES, atomic_write, die, euler, fm_loss, get_schedule,
                    log_likelihood, make_dir, pick_device, positive_float, positive_int,
                    standard_normal_log_density)

# -----------------------------------------------------------------------------
# settings; the defaults are the recommended run
parser = argparse.ArgumentParser(description="Variance along the flow, N(0, I) -> N((1, 1), I).")
parser.error = die  # argparse's errors in one line, without its usage block
parser.add_argument("--schedule", default="both", choices=["both", *SCHEDULES],
                    help="which schedule(s) to train")
parser.add_argument("--iters", type=positive_int, default=3000,
                    help="training iterations per schedule")
parser.add_argument("--batch-size", type=positive_int, default=1024,
                    help="points per iteration (large: a precise mean)")
parser.add_argument("--n-hidden", type=positive_int, default=128,
                    help="width of the MLP's hidden layers")
parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
parser.add_argument("--steps", type=positive_int, default=100,
                    help="Euler steps when sampling (Eq. 7); midpoint steps back for the density")
parser.add_argument("--n-samples", type=positive_int, default=50000,
                    help="points whose variance we measure")
parser.add_argument("--n-density", type=positive_int, default=10000,
                    help="held-out points whose log-density we compute")
parser.add_argument("--seed", type=int, default=0, help="makes the run repeat itself")
parser.add_argument("--out", default="out/gaussian", help="output folder")
parser.add_argument("--device", default="cpu",
                    help="cpu is fastest for this tiny MLP; auto, cuda, mps also work")

MU1 = torch.tensor([1.0, 1.0])  # the mean of the target; its covariance is I

def main(argv=None):
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    names = list(SCHEDULES) if args.schedule == "both" else [args.schedule]
    make_dir(args.out)
    rows, results = [], {}
    for name in names:
        # ---------------------------------------------------------------------
        # training, as in moons.py, with x1 ~ N((1, 1), I)
        torch.manual_seed(args.seed)
        schedule = get_schedule(name)
        model = MLP(d=2, n_hidden=args.n_hidden).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        every = max(1, args.iters // 5)  # print the mean loss five times
        losses, t0 = [], time.time()
        for it in range(1, args.iters + 1):
            x0 = torch.randn(args.batch_size, 2, device=device)                 # x0 ~ N(0, I)
            x1 = MU1.to(device) + torch.randn(args.batch_size, 2,
                                              device=device)                    # x1 ~ N((1, 1), I)
            loss = fm_loss(model, x0, x1, schedule)                             # Eq. 4, t ~ U(0, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                die(f"the loss is {losses[-1]} at iteration {it}: the run diverged; "
                    f"try a smaller --lr than {args.lr:g}")
            if it % every == 0:
                print(f"{name} | iter {it:5d}/{args.iters} | "
                      f"loss {sum(losses[-every:]) / every:.4f} | {time.time() - t0:5.1f} s")

        # ---------------------------------------------------------------------
        # the variance of the generated points at every Euler step, next to the theory
        traj = euler(model, torch.randn(args.n_samples, 2, device=device), args.steps,
                     trajectory=True).cpu()
        t = torch.linspace(0, 1, args.steps + 1)
        var = traj.var(dim=1).mean(dim=1)   # (steps+1,): per coordinate, averaged over the two
        alpha, beta, _, _ = schedule(t)
        theory = alpha ** 2 + beta ** 2     # Var(X_0) = Var(X_1) = 1, X_0 and X_1 independent
        rows += [(name, f"{ti:.4f}", f"{vm:.5f}", f"{vt:.5f}")
                 for ti, vm, vt in zip(t.tolist(), var.tolist(), theory.tolist())]
        mean = traj[-1].mean(dim=0)
        print(f"{name} | mean of the generated X_1: ({mean[0]:.3f}, {mean[1]:.3f}), target (1, 1)")

        # ---------------------------------------------------------------------
        # the flow as a density (README, section 8): log p_1(x) = log p_0(x_0) - int div v dt
        # for held-out x ~ N((1, 1), I), beside the exact log N(x; (1, 1), I)
        held = MU1 + torch.randn(args.n_density, 2,
                                 generator=torch.Generator().manual_seed(args.seed + 1))
        learned = log_likelihood(model, held.to(device), args.steps).mean().item()
        exact = standard_normal_log_density(held - MU1).mean().item()
        print(f"{name} | mean log-density of {args.n_density} held-out points: learned "
              f"{learned:.4f}, exact {exact:.4f} (nats; {args.steps} midpoint steps back)")
        results[name] = {"t": t, "var": var, "theory": theory, "mean": mean,
                         "loss": sum(losses[-every:]) / every, "log_p": learned,
                         "exact_log_p": exact}

    # -------------------------------------------------------------------------
    # outputs: a readable table, the csv, the plot
    print("\n    t | " + " | ".join(f"{n:>6} measured  theory" for n in names))
    for i in range(0, args.steps + 1, max(1, args.steps // 10)):
        print(f"{results[names[0]]['t'][i]:5.2f} | " + " | ".join(
            f"{results[n]['var'][i]:15.4f} {results[n]['theory'][i]:7.4f}" for n in names))
    csv_path = os.path.join(args.out, "variance.csv")
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["schedule", "t", "var_measured", "var_theory"])
        w.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, color in zip(names, ["tab:blue", "tab:orange"]):
        ax.plot(results[n]["t"], results[n]["var"], color=color, label=f"{n}: measured")
        ax.plot(results[n]["t"], results[n]["theory"], "--", color="black", lw=1,
                label=f"{n}: theory")
    ax.set_xlabel("t"); ax.set_ylabel("variance of x_t (per coordinate)"); ax.set_ylim(0, 1.2)
    ax.set_title(f"N(0, I) -> N((1, 1), I), Euler with {args.steps} steps")
    ax.legend()
    fig.tight_layout()
    with atomic_write(os.path.join(args.out, "variance.png")) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}/variance.csv and {args.out}/variance.png")
    return results

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, exit status 130 (files: common.atomic_write)
        print(f"{os.path.basename(__file__)}: interrupted", file=sys.stderr)
        raise SystemExit(130)
