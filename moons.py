"""
Flow matching in 2D (handout section 2): from a standard Gaussian to the two moons.

    python moons.py                       # linear schedule, writes out/moons/
    python moons.py --schedule cosine --out out/moons-cosine

Writes OUT/moons.png (the data and the generated points, trajectories from t = 0 to 1,
the learned velocity field at a few times, the loss), OUT/moons.gif (the points flowing) and
OUT/density.png (the learned density p_1 on a grid, each point run back to t = 0: README,
section 8).
"""
import argparse
import math
import os
import sys
import time

import matplotlib
matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt
from matplotlib.animation import FuncAnimation, PillowWriter
import torch

from common import (MLP, SCHEDULES, atomic_write, die, euler, fm_loss, get_schedule,
                    log_likelihood, make_dir, pick_device, positive_float, positive_int)

# -----------------------------------------------------------------------------
# settings; the defaults are the recommended run
parser = argparse.ArgumentParser(description="Flow matching on the two moons.")
parser.error = die  # argparse's errors in one line, without its usage block
parser.add_argument("--schedule", default="linear", choices=list(SCHEDULES),
                    help="the path from X_0 to X_1 (Eq. 5)")
parser.add_argument("--iters", type=positive_int, default=5000,
                    help="training iterations (fresh batches each)")
parser.add_argument("--batch-size", type=positive_int, default=256, help="points per iteration")
parser.add_argument("--n-hidden", type=positive_int, default=128,
                    help="width of the MLP's hidden layers")
parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
parser.add_argument("--steps", type=positive_int, default=100,
                    help="Euler steps when sampling (Eq. 7)")
parser.add_argument("--n-samples", type=positive_int, default=2000,
                    help="points generated for the pictures")
parser.add_argument("--seed", type=int, default=0, help="makes the run repeat itself")
parser.add_argument("--out", default="out/moons", help="output folder")
parser.add_argument("--device", default="cpu",
                    help="cpu is fastest for this tiny MLP; auto, cuda, mps also work")
parser.add_argument("--gif", type=int, default=1, help="1: also write OUT/moons.gif, 0: skip it")

def sample_moons(n, noise=0.05):
    """The two-moons data (as scikit-learn's make_moons), centred on the origin: (n, 2)."""
    theta = torch.rand(n) * math.pi
    upper = torch.rand(n) < 0.5
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    return torch.stack([x, y], dim=1) + noise * torch.randn(n, 2) - torch.tensor([0.5, 0.25])

def main(argv=None):
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    make_dir(args.out)
    torch.manual_seed(args.seed)
    schedule = get_schedule(args.schedule)
    print(f"device {device}, schedule {args.schedule}, seed {args.seed}")

    # -------------------------------------------------------------------------
    # training: mu_0 = N(0, I), mu_1 = the moons, both sampled afresh every iteration
    model = MLP(d=2, n_hidden=args.n_hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    every = max(1, args.iters // 10)  # print the mean loss ten times
    losses, t0 = [], time.time()
    for it in range(1, args.iters + 1):
        x1 = sample_moons(args.batch_size).to(device)  # x1 ~ the moons, (B, 2)
        x0 = torch.randn_like(x1)                      # x0 ~ N(0, I)
        loss = fm_loss(model, x0, x1, schedule)        # Eq. 4, with t ~ U(0, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            die(f"the loss is {losses[-1]} at iteration {it}: the run diverged; "
                f"try a smaller --lr than {args.lr:g}")
        if it % every == 0:
            print(f"iter {it:5d}/{args.iters} | loss {sum(losses[-every:]) / every:.4f} | "
                  f"{time.time() - t0:5.1f} s")

    # -------------------------------------------------------------------------
    # sampling: the whole trajectory of n_samples points, (steps+1, n, 2)
    traj = euler(model, torch.randn(args.n_samples, 2, device=device), args.steps,
                 trajectory=True).cpu()
    plot(model, traj, sample_moons(args.n_samples), losses, args, device)
    print(f"wrote {args.out}/moons.png" + (f" and {args.out}/moons.gif" if args.gif else ""))

    # -------------------------------------------------------------------------
    # the flow as a density: log p_1(x) = log p_0(x_0) - int_0^1 div v_t(x_t) dt, each point
    # of a 100 x 100 grid run back to t = 0 (the divergence exact in 2D)
    g = torch.linspace(-2.5, 2.5, 100)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), dim=-1).reshape(-1, 2)
    log_p = log_likelihood(model, grid.to(device), args.steps).cpu().view(100, 100)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, z, title in [(axes[0], log_p.exp(), "p_1(x)"), (axes[1], log_p.clamp(min=-12),
                         "log p_1(x), clipped at -12")]:
        im = ax.imshow(z.numpy(), origin="lower", extent=(-2.5, 2.5, -2.5, 2.5), cmap="magma")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(f"the learned density {title}")
    fig.tight_layout()
    with atomic_write(os.path.join(args.out, "density.png")) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    mass = log_p.exp().sum().item() * (5 / 99) ** 2  # Riemann sum over the grid: near 1
    print(f"wrote {args.out}/density.png (the density's integral over the grid: {mass:.3f})")
    return {"losses": losses, "samples": traj[-1], "log_p": log_p, "mass": mass}

@torch.no_grad()
def plot(model, traj, data, losses, args, device):
    lim = 2.5
    fig, axes = plt.subplots(2, 4, figsize=(16, 8))
    # top row: the points x_t at four times, with the learned velocity f_t (arrows)
    g = torch.linspace(-lim, lim, 17)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), dim=-1).reshape(-1, 2)  # (289, 2)
    for ax, t in zip(axes[0], [0.0, 0.25, 0.5, 0.75]):
        v = model(grid.to(device), torch.full((len(grid),), t, device=device)).cpu()
        i = round(t * args.steps)
        ax.scatter(*traj[i].T, s=2, alpha=0.4, color="tab:blue")
        ax.quiver(*grid.T, *v.T, color="tab:red", angles="xy", width=0.003)
        ax.set_title(f"x_t and the velocity f_t at t = {i / args.steps:.2f}")
    # bottom row: data, generated points, trajectories, loss
    axes[1, 0].scatter(*data.T, s=2, color="black")
    axes[1, 0].set_title("data: X_1 ~ mu_1")
    axes[1, 1].scatter(*traj[-1].T, s=2, color="tab:blue")
    axes[1, 1].set_title(f"generated: Euler, {args.steps} steps")
    for k in range(min(300, traj.shape[1])):
        axes[1, 2].plot(*traj[:, k].T, lw=0.5, alpha=0.5, color="tab:gray")
    axes[1, 2].scatter(*traj[0, :300].T, s=4, color="tab:orange", label="t = 0", zorder=3)
    axes[1, 2].scatter(*traj[-1, :300].T, s=4, color="tab:blue", label="t = 1", zorder=3)
    axes[1, 2].legend(loc="upper right")
    axes[1, 2].set_title("trajectories from t = 0 to 1")
    for ax in [*axes[0], *axes[1, :3]]:
        ax.set_xlim(-lim, lim); ax.set_ylim(-lim, lim); ax.set_aspect("equal")
    smooth = torch.tensor(losses).unfold(0, min(100, len(losses)), 1).mean(1)  # moving average
    axes[1, 3].plot(losses, lw=0.3, alpha=0.4, color="tab:blue")
    axes[1, 3].plot(range(len(losses) - len(smooth), len(losses)), smooth, color="tab:blue")
    axes[1, 3].set_title(f"training loss ({args.schedule} schedule)")
    axes[1, 3].set_xlabel("iteration")
    fig.tight_layout()
    with atomic_write(os.path.join(args.out, "moons.png")) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)

    if args.gif:  # the points flowing from the Gaussian to the moons, 40 frames
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.set_xlim(-lim, lim); ax.set_ylim(-lim, lim); ax.set_aspect("equal"); ax.axis("off")
        dots = ax.scatter(*traj[0].T, s=2)
        frames = sorted(set(torch.linspace(0, args.steps, 40).round().long().tolist()))
        def draw(i):
            dots.set_offsets(traj[i].numpy())
            ax.set_title(f"t = {i / args.steps:.2f}")
        with atomic_write(os.path.join(args.out, "moons.gif")) as tmp:
            FuncAnimation(fig, draw, frames=frames + [args.steps] * 10).save(
                tmp, writer=PillowWriter(fps=12), dpi=60)
        plt.close(fig)

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, exit status 130 (files: common.atomic_write)
        print(f"{os.path.basename(__file__)}: interrupted", file=sys.stderr)
        raise SystemExit(130)
