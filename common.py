"""
What the nanoFM scripts share, in the order the README teaches it. First the handout's
maths: the schedules, the flow matching loss (and the moving average of the weights, our
recipe's, not the handout's), Euler's sampler, the two networks (an MLP for 2D, the
handout's U-Net for images). Then each
chapter's maths, in the README's order: where training draws t (section 3), more solvers
and time grids (section 3, appendix D), optimal transport pairing (section 4),
classifier-free guidance (section 6), reflow's straightness (section 7), the flow as a
density (section 8). Last the plumbing, which a learner can skip: the command line, the
data, files and checkpoints, a training run's safety nets, pictures, sampling many images,
progress. Equation numbers refer to the handout (see README.md).
"""
import argparse
import contextlib
import hashlib
import math
import os
import shlex
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# the handout's maths
# =============================================================================

# -----------------------------------------------------------------------------
# schedules: X_t = alpha_t X_0 + beta_t X_1 (Eq. 5), with the border conditions
# alpha_0 = beta_1 = 1 and alpha_1 = beta_0 = 0. Each returns alpha, beta and
# their time derivatives dalpha, dbeta, elementwise in t.

def linear(t):
    # Eq. 2: the straight line from X_0 to X_1
    return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)

def cosine(t):
    # Question 1: cos(a) = 0 and sin(b) = 1 need a = pi/2 + k pi and b = pi/2 + 2k pi,
    # so the smallest positive a and b are both pi/2 (a quarter of a circle).
    a = math.pi / 2
    return torch.cos(a * t), torch.sin(a * t), -a * torch.sin(a * t), a * torch.cos(a * t)

SCHEDULES = {"linear": linear, "cosine": cosine}

def get_schedule(name):
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]

# -----------------------------------------------------------------------------
# training: the loss, and the moving average of the weights that sampling uses

def fm_loss(model, x0, x1, schedule, t=None, reduce=True):
    """The flow matching loss (Eq. 4, generalised by Eq. 6) for one batch x0 ~ mu_0,
    x1 ~ mu_1, both (B, ...): each sample at its own time t (B,), by default t ~ U(0, 1)
    as in the handout (the scripts draw t with draw_t, in the chapters below). reduce=False:
    each sample's own loss (B,) (section 8's ImportanceT weighs them)."""
    if t is None:
        t = torch.rand(len(x0), device=x0.device, dtype=x0.dtype)
    alpha, beta, dalpha, dbeta = (s.view(-1, *[1] * (x0.dim() - 1)) for s in schedule(t))
    xt = alpha * x0 + beta * x1          # a point on the path, Eq. 5
    target = dalpha * x0 + dbeta * x1    # its velocity dX_t/dt, Eq. 6 (X_1 - X_0 for linear)
    # under bf16 autocast the network answers in bf16; the error is taken in x0's precision
    error = (model(xt, t).to(target.dtype) - target).pow(2)
    return error.mean() if reduce else error.flatten(1).mean(1)

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, tensor by tensor (the U-Net has no buffers)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)

# -----------------------------------------------------------------------------
# sampling with Euler's method (Eq. 7): integrate dx/dt = model(x, t) from t = 0 to t = 1
# over a grid of times 0 = t_0 < t_1 < ... < t_steps = 1, one step at a time

def euler_step(model, x, t, t_next):
    """x_{i+1} = x_i + h f_{t_i}(x_i), h = t_{i+1} - t_i: one network evaluation, error O(h)."""
    return x + (t_next - t) * model(x, t.expand(x.shape[0]))

@torch.no_grad()
def euler(model, x0, steps, trajectory=False):
    """Eq. 7, written exactly (README, "Where we differ from the handout"): carry x0 (B, ...)
    from t = 0 to t = 1 in `steps` Euler steps on the uniform grid t_i = i / steps. Returns
    the final points, or with trajectory=True all steps + 1 states (steps + 1, B, ...)."""
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"the number of steps must be a positive integer, got {steps!r}")
    ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64).to(x0.device, x0.dtype)
    x, xs = x0, [x0]
    for i in range(steps):
        x = euler_step(model, x, ts[i], ts[i + 1])
        if trajectory:
            xs.append(x)
    return torch.stack(xs) if trajectory else x

# -----------------------------------------------------------------------------
# networks. Every model is called as model(xt, t) with t of shape (B,) (a conditional U-Net,
# section 6: model(xt, t, y) with the labels y (B,)).

class MLP(nn.Module):
    """The MLP of section 2: d + 1 inputs (the point and the time, last), three hidden
    layers of n_hidden with ReLU, d outputs. The handout also puts a ReLU on the output; we
    don't: a velocity has negative components too, and a ReLU there could never move a
    point left or down."""
    def __init__(self, d=2, n_hidden=128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d + 1, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, d),
        )

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))  # (B, d+1) -> (B, d)

class DoubleConv(nn.Module):
    """conv 3x3, ReLU, conv 3x3, ReLU; padding keeps the height and width."""
    def __init__(self, c_in, c_out):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(),
        )

    def forward(self, x):
        return self.net(x)

class UNet(nn.Module):
    """The U-Net of section 3, for 28x28 images, as the handout lists it (the 3x3 kernels of
    DoubleConv, padded to keep the sizes it lists, are our reading of its "already defined"
    code). The time enters as a constant extra input channel (the "time map"). With
    n_classes > 0 (--conditional, make_unet) a label y enters the same way, as n_classes
    constant one-hot channels, and again at the input of each later block, as a learned
    number per channel and class added to every pixel (README, section 6); y = n_classes is
    "no label": all of them 0. width (section 8, --width): the channels of the first and last
    blocks, twice as many in the middle; the handout's is 32."""
    def __init__(self, c_in=1, c_out=1, n_classes=0, width=32):
        super().__init__()
        self.n_classes = n_classes
        w, w2 = width, 2 * width  # the handout's 32 and 64
        self.enc1 = DoubleConv(c_in + 1 + n_classes, w)
        self.enc2 = DoubleConv(w, w2)
        self.mid = DoubleConv(w2, w2)
        self.up2 = nn.ConvTranspose2d(w2, w2, 2, stride=2)
        self.dec2 = DoubleConv(w2, w)
        self.up1 = nn.ConvTranspose2d(w, w, 2, stride=2)
        self.dec1 = DoubleConv(w, w)
        self.out = nn.Conv2d(w, c_out, 1)
        if n_classes:  # (n_classes + 1, channels) for enc2, mid, dec2, dec1; start at 0
            self.label = nn.ModuleList(nn.Embedding(n_classes + 1, c, padding_idx=n_classes)
                                       for c in (w, w2, w2, w))
            for table in self.label:
                nn.init.zeros_(table.weight)

    def forward(self, x, t, y=None):
        B, _, H, W = x.shape
        maps = [x, t.to(x.dtype).view(B, 1, 1, 1).expand(B, 1, H, W)]  # the image, the time map
        shift = [0, 0, 0, 0]  # the handout's U-Net: nothing added at the later blocks
        if self.n_classes:    # section 6: the label's maps (B, n_classes, H, W), 1 in channel y,
            onehot = F.one_hot(y, self.n_classes + 1)[:, :self.n_classes].to(x.dtype)
            maps.append(onehot.view(B, -1, 1, 1).expand(B, self.n_classes, H, W))
            shift = [table(y).to(x.dtype).view(B, -1, 1, 1) for table in self.label]  # and shifts
        e1 = self.enc1(torch.cat(maps, dim=1))        # (B, 32, 28, 28)
        e2 = self.enc2(F.max_pool2d(e1, 2) + shift[0])  # (B, 64, 14, 14)
        m = self.mid(F.max_pool2d(e2, 2) + shift[1])  # (B, 64, 7, 7)
        d2 = self.dec2(self.up2(m) + e2 + shift[2])   # (B, 32, 14, 14), additive skip
        d1 = self.dec1(self.up1(d2) + e1 + shift[3])  # (B, 32, 28, 28), additive skip
        return self.out(d1)                           # (B, c_out, 28, 28)

def make_unet(conditional=False, predict="v", schedule="cosine", width=32):
    """The handout's U-Net; a conditional one (section 6) reads the ten digits' labels too.
    predict="blend" (section 8): its output is a blend of the velocity and the digit along
    `schedule`, turned into the velocity by Blend. width (section 8): UNet's."""
    net = UNet(n_classes=10 if conditional else 0, width=width)
    return Blend(net, get_schedule(schedule)) if predict == "blend" else net

# =============================================================================
# the chapters' maths, in the README's order
# =============================================================================

# -----------------------------------------------------------------------------
# where training looks: the distribution of t (section 3; fm_loss's default is the handout's)

T_DISTS = ("uniform", "logit-normal", "u-shaped", "half-zero", "zero", "tail", "elbo")
TAIL = 1e-3  # "tail": the smallest 1 - t it draws
ELBO_Z = math.log(1 / TAIL) - (1 - TAIL)  # int_0^(1 - TAIL) t / (1 - t) dt: "elbo"'s normaliser

def draw_t(n, dist="uniform", mean=0.0, device="cpu"):
    """n training times (n,) in [0, 1], by one of T_DISTS:
    - "uniform": U(0, 1), the handout's;
    - "logit-normal" (section 3, mnist.py's default; Esser et al. 2024): t = sigmoid(z),
      z ~ N(mean, 1): more samples mid-path than near the ends, nearer the noise for mean < 0
      (`mean` is used by this one alone);
    - "u-shaped" (section 7; Lee et al. 2024): density proportional to cosh(4 (t - 1/2)),
      more samples near both ends;
    - "zero" (section 7: distillation, Liu et al. 2022): t = 0 always, where x_t = x0 and
      the target is the velocity at the start, x1 - x0 for the linear schedule (one Euler
      step from x0 then lands on x1); "half-zero" (reflow.py's default): t = 0 with
      probability 1/2, else U(0, 1);
    - "tail" (section 8): half U(0, 1), half with 1 - t log-uniform in [TAIL, 1] (density
      proportional to 1 / (1 - t)): many samples where 1 - t is as small as a grey level and
      a model's density is made. A heuristic: near t = 1 its density follows the weight
      t / (1 - t) under which the linear path's loss bounds a diffusion model's likelihood
      (Kingma et al. 2021), not the density of the ODE that section 8 measures;
    - "elbo" (section 8): density proportional to t / (1 - t) on [0, 1 - TAIL], that weight
      itself: the linear path's loss is then, up to a constant, the diffusion model's bound
      (1 - t log-uniform as in "tail", each kept with probability t)."""
    if dist == "uniform":
        return torch.rand(n, device=device)
    if dist == "logit-normal":
        return torch.sigmoid(torch.randn(n, device=device) + mean)
    if dist == "u-shaped":  # density ~ e^(4t) by inverting its CDF, then t or 1 - t
        t = torch.log1p(torch.rand(n, device=device) * math.expm1(4)) / 4
        return torch.where(torch.rand(n, device=device) < 0.5, t, 1 - t)
    if dist in ("half-zero", "zero"):
        t = torch.rand(n, device=device)
        share = 0.5 if dist == "half-zero" else 1.0  # of the samples at t = 0
        return torch.where(torch.rand(n, device=device) < share, torch.zeros_like(t), t)
    if dist == "tail":  # 1 - TAIL^u for u ~ U(0, 1): log(1 - t) uniform in [log TAIL, 0]
        tail = 1 - TAIL ** torch.rand(n, device=device)
        return torch.where(torch.rand(n, device=device) < 0.5, torch.rand_like(tail), tail)
    if dist == "elbo":  # t / (1 - t) = t * 1 / (1 - t): draw by the second, keep with prob. t
        t, left = torch.zeros(n, device=device), torch.arange(n, device=device)
        while len(left):
            s = 1 - TAIL ** torch.rand(len(left), device=device)
            keep = torch.rand(len(left), device=device) < s
            t[left[keep]] = s[keep]
            left = left[~keep]
        return t
    raise ValueError(f"unknown distribution of t {dist!r}; known: {', '.join(T_DISTS)}")

# -----------------------------------------------------------------------------
# more solvers and time grids (section 3, appendix D): one step of each, from (x, t) to t_next

def heun_step(model, x, t, t_next):
    """Heun's method (the explicit trapezoid rule): an Euler step to a trial point, then
    again with the mean of the slopes at both ends. Two network evaluations, error O(h^2)
    (Euler: O(h))."""
    h = t_next - t
    d = model(x, t.expand(x.shape[0]))
    d_next = model(x + h * d, t_next.expand(x.shape[0]))
    return x + h * (d + d_next) / 2

def midpoint_step(model, x, t, t_next):
    """The midpoint method: half an Euler step, then the whole step with the slope found
    there. Two network evaluations, error O(h^2), and none at t_next (never at t = 1)."""
    h = t_next - t
    x_mid = x + h / 2 * model(x, t.expand(x.shape[0]))
    return x + h * model(x_mid, (t + h / 2).expand(x.shape[0]))

# heun-euler: Heun's steps, but an Euler step last, as EDM does (Karras et al. 2022): no
# evaluation at t = 1, where training (t ~ logit-normal) almost never looked
SOLVERS = {"euler": euler_step, "heun": heun_step, "midpoint": midpoint_step,
           "heun-euler": heun_step}

def nfe(solver, steps):
    """Network evaluations per sample."""
    return steps * (1 if solver == "euler" else 2) - (solver == "heun-euler")

def steps_within(solver, budget):
    """The most steps of `solver` that take at most `budget` network evaluations (at least one)."""
    return max(1, (budget + (solver == "heun-euler")) // (1 if solver == "euler" else 2))

# Time grids: steps + 1 times from exactly 0 to exactly 1. "uniform": t_i = i / steps.
# "early": t_i = (i / steps)^1.5, shorter steps in the first half, where the noise becomes a
# digit (README, appendix D). "edm": Karras et al. (2022): the noise-to-signal ratio
# sigma = alpha_t / beta_t (linear: (1 - t) / t, cosine: cot(pi t / 2)) evenly spaced in
# sigma^(1/7) from EDM's sigma_max = 80 to its sigma_min = 0.002 in steps - 1 steps, then
# one step to sigma = 0 (t = 1); short steps at both ends. The first time is 0, not
# sigma = 80's t (0.012 linear, 0.008 cosine): the sampler starts from pure noise.
SIGMA_TO_T = {"linear": lambda s: 1 / (1 + s), "cosine": lambda s: 2 / math.pi * torch.atan(1 / s)}
GRIDS = ("uniform", "early", "edm")

def time_grid(name, steps, schedule="cosine"):
    if name not in GRIDS:
        raise ValueError(f"unknown time grid {name!r}; known grids: {', '.join(GRIDS)}")
    if name == "edm":
        root = torch.linspace(80 ** (1 / 7), 0.002 ** (1 / 7), steps, dtype=torch.float64)
        t = torch.cat([SIGMA_TO_T[schedule](root ** 7), torch.ones(1, dtype=torch.float64)])
    else:
        u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        t = u if name == "uniform" else u ** 1.5
    t[0], t[-1] = 0, 1  # exactly, whatever the rounding
    return t

# The sampler within a budget of network evaluations, per schedule: rows (the smallest
# budget, solver, grid); --nfe K takes the last row that fits K. Each row's solver and grid
# measured best at its budgets on the two noise sets, but for linear at 100, where heun-euler
# on the uniform grid measured 25.277 and on the early grid 25.287 (README, appendix D).
# A reflowed model (reflow.py) has its own rows, measured on its 10- and 20-epoch weights
# (README, section 7).
BEST = {"cosine": [(1, "euler", "early"), (6, "heun-euler", "early")],
        "linear": [(1, "euler", "early"), (2, "midpoint", "early"), (50, "heun-euler", "early")],
        "reflow": [(1, "euler", "uniform"), (2, "midpoint", "early")]}

def plan(budget, schedule, solver=None, steps=None, grid=None, reflowed=False):
    """The sampler for --nfe: the solver and grid of BEST for `budget` network evaluations
    and `schedule` (or a reflowed model), and as many steps as fit it; a solver, steps or
    grid given wins."""
    rows = BEST["reflow" if reflowed else schedule]
    _, best_solver, best_grid = [row for row in rows if row[0] <= budget][-1]
    solver, grid = solver or best_solver, grid or best_grid
    return solver, steps or steps_within(solver, budget), grid

@torch.no_grad()
def sample(model, x0, steps, solver="euler", trajectory=False, ts=None):
    """Carry x0 (B, ...) from t = 0 to t = 1 in `steps` steps of `solver` over the times ts
    (default: the uniform grid t_i = i / steps). Returns the final points, or with
    trajectory=True all steps+1 states (steps+1, B, ...)."""
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"the number of steps must be a positive integer, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {', '.join(SOLVERS)}")
    ts = (time_grid("uniform", steps) if ts is None else ts).to(x0.device, x0.dtype)
    x, xs = x0, [x0]
    for i in range(steps):
        last_euler = solver == "heun-euler" and i == steps - 1
        x = (euler_step if last_euler else SOLVERS[solver])(model, x, ts[i], ts[i + 1])
        if trajectory:
            xs.append(x)
    return torch.stack(xs) if trajectory else x

# -----------------------------------------------------------------------------
# optimal transport pairing (section 4): who meets whom in a batch

def ot_pairing(x0, x1, y=None):
    """Minibatch optimal transport (Tong et al. 2023): the order of x0 (B, ...) that pairs it
    with x1 (B, ...) at the least total squared distance, found exactly by the Hungarian
    method with potentials (Kuhn 1955, in Jonker and Volgenant's form), O(B^3).
    x0[ot_pairing(x0, x1)] is x0 reordered: the pairs keep both marginals, only who meets
    whom changes. With the classes y (B,) of x1, within each class alone: x0 reordered
    among the x1 of one class keeps its marginal given the class, as a conditional model
    samples it (x0 ~ mu_0 whatever the label asked)."""
    if y is not None:
        order = torch.arange(len(x0), device=x0.device)
        for c in y.unique():
            i = (y == c).nonzero().squeeze(1).to(x0.device)
            order[i] = i[ot_pairing(x0[i], x1[i])]
        return order
    import numpy as np
    cost = torch.cdist(x0.flatten(1).float(), x1.flatten(1).float()).pow(2)
    cost = cost.cpu().double().numpy()
    n = len(cost)
    a = np.zeros((n + 1, n + 1))
    a[1:, 1:] = cost                        # 1-based: row/column 0 is the method's dummy
    u, v = np.zeros(n + 1), np.zeros(n + 1)  # the dual potentials of rows and columns
    p = np.zeros(n + 1, dtype=np.int64)     # p[j]: the row matched to column j
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):               # add row i, then repair along a shortest path
        p[0], j0 = i, 0
        minv, used = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=bool)
        while p[j0] != 0:  # (p[0] = i: at least once)
            used[j0] = True
            reduced = a[p[j0]] - u[p[j0]] - v
            better = ~used & (reduced < minv)
            minv[better], way[better] = reduced[better], j0
            j1 = int(np.where(used, np.inf, minv).argmin())
            delta = minv[j1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
        while j0:
            p[j0], j0 = p[way[j0]], way[j0]
    return torch.as_tensor(p[1:] - 1, device=x0.device)  # for column j (x1[j]) the row of x0

# -----------------------------------------------------------------------------
# classifier-free guidance (section 6; Ho and Salimans 2022): one network, trained with the
# label dropped now and then, gives the conditional field v_c and the unconditional v_u

NO_LABEL = 10  # the label a conditional U-Net (make_unet: n_classes 10) reads as "no label"
# the defaults of --guidance and --guidance-shape, and of --nfe for a guided model (cosine:
# 10 steps of heun-euler, plan): measured in README, section 6
GUIDANCE, GUIDANCE_SHAPE, GUIDED_NFE = 4.0, "ramp", 40
SHAPES = ("ramp", "constant")

def drop_labels(y, p):
    """Training labels y (B,), each replaced by NO_LABEL with probability p: one network learns
    the conditional field and the unconditional one."""
    return torch.where(torch.rand(len(y), device=y.device) < p, NO_LABEL, y)

def guided(model, y, w, shape=None):
    """The field v_u + W(t) (v_c - v_u) for labels y (B,), with W(t) = w ("constant") or
    1 + (w - 1) t ("ramp", the default: the conditional field at t = 0, w at t = 1; Wang et
    al. 2024). W = 1 is the conditional field, a constant W = 0 the unconditional one: one
    network evaluation per solver evaluation; any other W (the ramp to 0 too) takes both, in
    one batch of 2B: two (README, section 6)."""
    shape, null = shape or GUIDANCE_SHAPE, torch.full_like(y, NO_LABEL)
    if evaluations_per_step(w, shape) == 1:  # W = 1 (either shape): v_c; a constant 0: v_u
        label = y if w == 1 else null
        return lambda x, t: model(x, t, label)
    def field(x, t):  # mixed in x's precision (float32 under bf16 autocast), either shape
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, y])).to(x.dtype)
        v_u, v_c = both.chunk(2)
        w_t = w if shape == "constant" else 1 + (w - 1) * t.view(-1, *[1] * (x.dim() - 1))
        return v_u + w_t * (v_c - v_u)
    return field

def evaluations_per_step(w, shape=None):
    """Network evaluations each evaluation of the solver costs with guidance w and shape."""
    shape = shape or GUIDANCE_SHAPE
    if shape not in SHAPES:
        raise ValueError(f"unknown guidance shape {shape!r}; known: {', '.join(SHAPES)}")
    return 1 if w == 1 or (w == 0 and shape == "constant") else 2

# -----------------------------------------------------------------------------
# reflow (section 7): how straight a flow is

@torch.no_grad()
def straightness(model, x0, steps=100):
    """How straight a flow is (Liu et al. 2022): S = int_0^1 E |(x_1 - x_0) - v_t(x_t)|^2 dt
    along its own trajectories, here `steps` Euler steps from x0 (B, ...), per dimension. 0
    exactly when every trajectory is a straight line at constant speed. On the uniform grid
    x_1 - x_0 is the mean of the v's, so S = mean |v|^2 - |x_1 - x_0|^2: the kinetic energy
    spent beyond what the straight line from x_0 to x_1 needs."""
    ts = time_grid("uniform", steps).to(x0.device, x0.dtype)
    x, energy = x0, 0.0
    for i in range(steps):
        v = model(x, ts[i].expand(x.shape[0])).to(x0.dtype)
        energy += v.pow(2).mean().item() / steps
        x = x + (ts[i + 1] - ts[i]) * v
    return energy - (x - x0).pow(2).mean().item()

def arc_straightness(x0, x1):
    """The straightness S (per dimension) of the cosine schedule's own paths from each x0 to
    its x1 (B, ...), x_t = cos(pi t / 2) x0 + sin(pi t / 2) x1: no path crosses another, yet
    with v_t = (pi / 2) (cos(pi t / 2) x1 - sin(pi t / 2) x0), int_0^1 |v_t|^2 dt =
    (pi^2 / 8) (|x0|^2 + |x1|^2) - (pi / 2) x0 . x1, so S = (pi^2 / 8 - 1) (|x0|^2 + |x1|^2)
    - (pi / 2 - 2) x0 . x1, averaged: what a cosine flow pays for its arcs alone."""
    ends = x0.pow(2).mean() + x1.pow(2).mean()
    return ((math.pi ** 2 / 8 - 1) * ends - (math.pi / 2 - 2) * (x0 * x1).mean()).item()

# -----------------------------------------------------------------------------
# mean flows (section 7; Geng et al. 2025): the average velocity over an interval, for one step.
# In this project's time (noise at 0, data at 1), from a point x at time s to time e >= s the
# flow moves by (e - s) u(x, s, e) = int_s^e v(x_tau, tau) dtau. Differentiating in s along
# the trajectory (x_s moves at v, e stays) gives u = v + (e - s) du/ds, du/ds = v . d_x u +
# d_s u: a target for u from v alone, with one Jacobian-vector product. (The paper's time runs
# the other way, data at 0: there u = v - (t - r) du/dt.)

class MeanFlowUNet(nn.Module):
    """u(x, s, e), x (B, 1, 28, 28), s and e (B,): the handout's U-Net reading the interval's
    length e - s as a second map beside the image, and s as its time map. At e = s the new map
    is 0 and u is the flow's own velocity v(x, s), what mnist.py's U-Net learns on the same
    schedule."""
    def __init__(self):
        super().__init__()
        self.unet = UNet(c_in=2)

    def forward(self, x, s, e):
        h = (e - s).to(x.dtype).view(-1, 1, 1, 1).expand_as(x)
        return self.unet(torch.cat([x, h], dim=1), s)

def draw_interval(n, ratio=0.25, mean=0.4, std=1.0, device="cpu"):
    """n intervals s <= e (each (n,)) as the paper draws them: two logit-normal times
    sigmoid(N(mean, std^2)), the smaller s and the larger e, then e = s (plain flow matching)
    for all but a share `ratio`. The paper's -0.4 is our +0.4: its time runs the other way."""
    a = torch.sigmoid(mean + std * torch.randn(n, device=device))
    b = torch.sigmoid(mean + std * torch.randn(n, device=device))
    s, e = torch.minimum(a, b), torch.maximum(a, b)
    return s, torch.where(torch.rand(n, device=device) < ratio, e, s)

def mean_flow_target(model, x, s, e, v):
    """model(x, s, e) (with its graph, for the loss), and its target v + (e - s) du/ds with the
    total derivative du/ds = v . d_x u + d_s u taken by one forward-mode Jacobian-vector
    product along (v, 1, 0), under stop-gradient."""
    u, du_ds = torch.func.jvp(model, (x, s, e), (v, torch.ones_like(s), torch.zeros_like(e)))
    h = (e - s).view(-1, *[1] * (x.dim() - 1))
    return u, (v + h * du_ds).detach()

def mean_flow_loss(model, x0, x1, schedule, s, e, p=1.0, eps=1e-3):
    """The mean flow loss for one batch x0 ~ mu_0, x1 ~ mu_1 (B, ...) on the intervals (s, e):
    x_s on the path (Eq. 5), v its velocity (Eq. 6), each image's squared error to the target
    (its mean over the pixels), weighted by 1 / (error + eps)^p: the paper's adaptive weight,
    but the paper sums over the pixels, where its eps = 1e-3 is 784 times smaller against the
    error than ours (p = 0: plain).
    Returns the weighted loss and the plain mean squared error."""
    alpha, beta, dalpha, dbeta = (q.view(-1, *[1] * (x0.dim() - 1)) for q in schedule(s))
    u, target = mean_flow_target(model, alpha * x0 + beta * x1, s, e, dalpha * x0 + dbeta * x1)
    err = (u - target).pow(2).flatten(1).mean(1)
    return (err / (err.detach() + eps) ** p).mean(), err.mean()

@torch.no_grad()
def mean_flow_sample(model, x0, steps):
    """Carry x0 from t = 0 to 1 in `steps` jumps of the uniform grid, x <- x + (e - s)
    u(x, s, e): one network evaluation per jump."""
    ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64).to(x0.device, x0.dtype)
    x = x0
    for s, e in zip(ts[:-1], ts[1:]):
        x = x + (e - s) * model(x, s.expand(len(x)), e.expand(len(x)))
    return x

# -----------------------------------------------------------------------------
# the flow as a density (Chen et al. 2018, FFJORD: Grathwohl et al. 2019). Along a
# trajectory of the flow (Eq. 1) the continuity equation (README, sections 0 and 8) gives
# d log p_t(x_t)/dt = -div v_t(x_t), so log p_1(x_1) = log p_0(x_0) - int_0^1 div v_t(x_t) dt,
# with x_0 found by running the flow backwards from x_1: the density of the exact flow of the
# learned field, not of a few-step sampler. As Meta's flow_matching
# (ODESolver.compute_likelihood) does: the divergence exact for a few dimensions,
# Hutchinson's estimate with one Rademacher probe, fixed along each trajectory, for images.

def divergence(model, x, t, probe=None):
    """The field v = model(x, t) at x (B, ...), t a scalar tensor, and its divergence
    sum_i dv_i/dx_i (B,): exact without a probe (a backward pass per dimension: 2D); with
    a probe z (x's shape) Hutchinson's estimate z . (dv/dx) z (one backward pass), unbiased
    when E[z z^T] = I, as for z of independent +-1 entries (Rademacher: variance 2 sum_{i != j}
    S_ij^2, S the symmetric part of dv/dx; a Gaussian z adds the diagonal's 2 sum_i S_ii^2)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = model(x, t.expand(x.shape[0])).to(x.dtype)
        if probe is not None:
            zJ, = torch.autograd.grad(v, x, grad_outputs=probe)  # z^T dv/dx, row by row
            div = (zJ * probe).flatten(1).sum(1)
        else:
            flat = v.flatten(1)
            div = sum(torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
                      .flatten(1)[:, i] for i in range(flat.shape[1]))
    return v.detach(), div.detach()

def rademacher(shape, generator=None):
    """Hutchinson's probe: independent entries +1 or -1, each with probability 1/2."""
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1

def standard_normal_log_density(x):
    """log N(x; 0, I) of each row of x (B, ...): the log-density of the noise mu_0."""
    d = x[0].numel()
    return -0.5 * x.flatten(1).pow(2).sum(1) - d / 2 * math.log(2 * math.pi)

@torch.no_grad()
def log_likelihood(model, x1, steps, probe=None, log_p0=standard_normal_log_density):
    """log p_1(x1) (B,) of the flow of model: x1 (B, ...) carried from t = 1 back to t = 0 by
    `steps` midpoint steps on the grid t_i = 1 - (i / steps)^2, short steps near the data,
    where a model trained there contracts fast (on uniform steps, 100 of them are 0.42
    (linear) and 0.66 (cosine) bits per dimension off for a Gaussian target as narrow as a grey
    level, the closed form of test_log_likelihood_of_a_target_as_narrow_as_a_grey_level; on this
    grid under 0.001), int_0^1 div v_t(x_t) dt
    by the same rule (the divergence at each step's midpoint; exact, or with the probe
    Hutchinson's estimate), then log p_0(x_0) minus it. Error O(1/steps^2): going from half
    the steps to all moves the figure by about 3 times the error left. The same probe at every
    step keeps the integrand smooth, so that this holds and the move measures the integration
    alone."""
    ts = (1 - torch.linspace(0, 1, steps + 1, dtype=torch.float64) ** 2).to(x1.device, x1.dtype)
    x, integral = x1, torch.zeros(len(x1), device=x1.device, dtype=x1.dtype)
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t  # < 0: backwards
        x_mid = euler_step(model, x, t, t + h / 2)  # the midpoint rule's half step
        v, div = divergence(model, x_mid, t + h / 2, probe)  # v: the field at the midpoint
        x = x + h * v
        integral = integral - h * div  # -h > 0: the integral from 0 to 1
    return log_p0(x) - integral

def guess_x1(schedule, t, x, v):
    """The x_1 that a velocity v at (x, t) points to: Eq. 5 and 6, x = alpha x_0 + beta x_1
    and v = dalpha x_0 + dbeta x_1, solved for x_1 (exact where v is the velocity of a
    single path through x)."""
    a, b, da, db = schedule(t)
    return (a * v - da * x) / (a * db - da * b)

class ClippedX1(nn.Module):
    """model's field with its guess of x_1 (guess_x1) held to [lo, hi], the dequantised
    digits' range (README, section 8): the velocity of the path through x that ends at the
    clipped guess c, v + (alpha dbeta - dalpha beta) / alpha (c - guess). Where the guess
    lies in [lo, hi], the field is model's own; outside, the network answers where it never
    trained, and run backwards its field can grow with x without bound. At t = 1 (alpha_1 = 0)
    the field is model's own: there x is the digit and the guess is x."""
    def __init__(self, model, schedule, lo=-1 - 1 / 255, hi=1 + 1 / 255):
        super().__init__()
        self.model, self.schedule, self.lo, self.hi = model, schedule, lo, hi

    def forward(self, x, t):
        v = self.model(x, t)
        tt = t.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        guess = guess_x1(self.schedule, tt, x, v)
        a, b, da, db = self.schedule(tt)
        end = tt >= 1  # alpha_1 = 0: no path left to bend, and no division by 0
        bend = torch.where(end, 0.0, (a * db - da * b) / torch.where(end, torch.ones_like(a), a))
        return v + bend * (guess.clamp(self.lo, self.hi) - guess)

class Blend(nn.Module):
    """section 8: the U-Net `net` trained to predict F = beta_t x_1 + (1 - beta_t) v, the
    velocity v near the noise (beta_0 = 0) and the digit x_1 near the data (beta_1 = 1);
    returns the velocity it stands for. Eq. 5 and 6 solved for x_1 (guess_x1), F = c v -
    beta dalpha x / D with D = alpha dbeta - dalpha beta and c = 1 - beta + beta alpha / D,
    so v = (F + beta dalpha x / D) / c; linear: v = (F - t x) / (1 - t^2). fm_loss on v weighs
    the error of F by 1 / c^2: the same objective as predicting v. Near t = 1 the edge of the
    digits' range is a slope of 1 / (1 - t) in v, only a kink in F. Past t_max (by default
    1 - TAIL, the smallest 1 - t that "tail" and "elbo" draw) the field is the one at t_max
    (at t = 1, c = 0); always in float32 at least (bf16's rounding of F, divided by c, would
    reach v up to 500 times larger at 1 - TAIL: linear; about 1,000: cosine)."""
    def __init__(self, net, schedule, t_max=1 - TAIL):
        super().__init__()
        self.net, self.schedule, self.t_max = net, schedule, t_max

    def forward(self, x, t, y=None):
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 if given
        t = t.to(x.dtype).clamp(max=self.t_max)
        with torch.autocast(x.device.type, enabled=False):
            f = self.net(x, t, y)
        a, b, da, db = (s.view(-1, *[1] * (x.dim() - 1)) for s in self.schedule(t))
        D = a * db - da * b
        return (f + b * da * x / D) / (1 - b + b * a / D)

def dequantize(x, generator=None):
    """Images in [-1, 1] on the grid of 256 levels (pixel / 127.5 - 1) made continuous: each
    value moved uniformly within its bin, [value - 1/255, value + 1/255) (width 2/255, one
    grey level; the bins of -1 and 1 reach past [-1, 1], which is as valid: disjoint bins of
    one width), so that a density may be compared with a discrete model (Theis et al. 2016)."""
    u = (torch.rand_like(x) if generator is None  # a training batch, where it lies
         else torch.rand(x.shape, generator=generator).to(x.device, x.dtype))
    return x + (u - 0.5) * (2 / 255)

def bits_per_dim(log_p, d):
    """The standard likelihood figure of 8-bit images from log p (nats) of dequantised images
    in pixel / 127.5 - 1's scale (bins of width 2/255) in d dimensions: -log2 P(image) / d of
    the discrete model P(image) = the integral of p over the image's bins, bounded by Jensen:
    log P >= E log p(dequantised) + d log(2/255), so log2(255 / 2) - log p / (d ln 2), averaged
    over dequantisations, is an upper bound of its bits (8: a uniform guess). Images scaled
    otherwise (papers: [0, 256) / 256) shift log p by their Jacobian: the same figure."""
    return math.log2(255 / 2) - log_p / (d * math.log(2))

class ImportanceT:
    """section 8: importance sampling of t for the linear path's likelihood bound J = int
    lambda(t) E[L_t] dt, lambda = t / (1 - t) on [0, 1 - TAIL] (bound_variance). t is drawn
    from q and each sample's loss weighted by lambda / (Z q), Z = int lambda, so the weighted
    loss estimates J / Z (the scale of "elbo"'s loss, q = lambda / Z); q is learned as
    training goes towards the q of least variance, proportional to lambda sqrt(E[L_t^2])
    (Nichol and Dhariwal 2021; Song et al. 2021's q is "elbo"'s). t = 1 - TAIL^u with u in
    n_bins equal bins (lambda dt/du = t ln(1 / TAIL)); bin k is drawn with probability p_k
    proportional to the root mean square of t L_t over its last `history` losses, with a
    share `floor` spread evenly, and evenly until every bin holds `history` losses: the
    LossSecondMomentResampler of openai/improved-diffusion (resample.py; history 10, a share
    of 0.001 where ours is 0.01), on bins of a continuous t."""
    def __init__(self, n_bins=64, history=10, floor=0.01):
        self.sq = torch.zeros(n_bins, history, dtype=torch.float64)  # (t L_t)^2, the last ones
        self.seen = torch.zeros(n_bins, dtype=torch.long)  # losses recorded, by bin
        self.floor = floor

    def probabilities(self):
        n_bins, history = self.sq.shape
        if (self.seen < history).any():
            return torch.full((n_bins,), 1 / n_bins, dtype=torch.float64)
        p = self.sq.mean(1).sqrt()
        return (1 - self.floor) * p / p.sum() + self.floor / n_bins

    def draw(self, n, device="cpu"):
        """n times (n,) and their weights lambda / (Z q) (n,)."""
        p = self.probabilities()
        k = torch.multinomial(p, n, replacement=True)
        t = 1 - TAIL ** ((k + torch.rand(n, dtype=torch.float64)) / len(p))
        weight = t * math.log(1 / TAIL) / (len(p) * p[k] * ELBO_Z)  # lambda / (Z q), q in t
        return t.float().to(device), weight.float().to(device)

    def weigh(self, t, weight, losses):
        """The batch's loss, the mean of weight * losses (each sample's, fm_loss's reduce=False),
        after recording each (t L_t)^2 in its bin."""
        n_bins, history = self.sq.shape
        t, each = t.detach().cpu().double(), losses.detach().cpu().double()
        bins = (torch.log1p(-t) / math.log(TAIL) * n_bins).long().clamp(0, n_bins - 1)
        for k, v in zip(bins.tolist(), (t * each).pow(2).tolist()):
            self.sq[k, self.seen[k] % history] = v
            self.seen[k] += 1
        return (weight * losses).mean()

    def state_dict(self):
        return {"sq": self.sq.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state):
        self.sq, self.seen = state["sq"].clone(), state["seen"].clone()

def weighted_bits(log_p, d):
    """bits_per_dim of log mean_k p_k, from log_p (K, n): K dequantisations of each of n
    images. The uniform dequantisation as a proposal in importance weighting (Burda et al.
    2016): log P(image) >= E log mean_k p(x + u_k) + d log(2/255), a bound that tightens as K
    grows (for K = 1, bits_per_dim's) and reaches the model's own log P as K -> infinity.
    The K = 1 figure lies above the model's own by at least its distance from this one (in
    expectation): that looseness of the uniform dequantisation's bound is the most a better
    dequantising distribution (Ho et al. 2019) could give back without retraining.
    Hutchinson's estimate makes each p_k noisy, which biases log mean_k p_k up and the
    distance with it; one probe for all K keeps their errors alike."""
    return bits_per_dim(torch.logsumexp(log_p, 0) - math.log(len(log_p)), d)

@torch.no_grad()
def bound_variance(model, x1, n_t=64, batch=256, t_mean=-0.5, generator=None):
    """section 8, importance sampling of t: how noisy one sample of the linear path's
    likelihood bound J = int_0^(1 - TAIL) lambda(t) E[L_t] dt is, lambda(t) = t / (1 - t)
    (Kingma et al. 2021; L_t: one pair's loss at t, fm_loss's mean square), when t is drawn
    from q and weighted by lambda / q: V_q = int lambda^2 E[L_t^2] / q dt - J^2. Returned as
    V_q / J^2 for the q of draw_t's "uniform", "logit-normal" (mean t_mean), "tail" and
    "elbo" (q = lambda / Z, Song et al. 2021's importance sampling), and for "optimal": q
    proportional to lambda sqrt(E[L_t^2]), the least variance (what ImportanceT learns from
    the losses' second moment, Nichol and Dhariwal 2021), V = (int lambda sqrt(E[L_t^2]))^2
    - J^2.
    The integrals by the midpoint rule on n_t times t = 1 - TAIL^u, u uniform; E[L_t] and
    E[L_t^2] each from `batch` pairs: x0 ~ N(0, I), x1 drawn from x1 (N, ...)."""
    u = (torch.arange(n_t, dtype=torch.float64) + 0.5) / n_t
    t = 1 - TAIL ** u
    dt = (1 - t) * math.log(1 / TAIL) / n_t  # each time's share of [0, 1 - TAIL]
    m, m2 = torch.zeros(n_t, dtype=torch.float64), torch.zeros(n_t, dtype=torch.float64)
    for k in range(n_t):
        b = x1[torch.randint(len(x1), (batch,), generator=generator)]
        x0 = torch.randn(b.shape, generator=generator).to(b)
        loss = fm_loss(model, x0, b, linear, torch.full((batch,), float(t[k])).to(b), reduce=False)
        m[k], m2[k] = loss.double().mean(), loss.double().pow(2).mean()
    lam = t / (1 - t)
    J = (lam * m * dt).sum()
    out = {}
    for dist in ("uniform", "logit-normal", "tail", "elbo"):
        q = t_density(t, dist, t_mean)
        out[dist] = float((lam ** 2 * m2 / q * dt).sum() / J ** 2 - 1)
    out["optimal"] = float((lam * m2.sqrt() * dt).sum() ** 2 / J ** 2 - 1)
    return out

def t_density(t, dist, mean=0.0):
    """The density of draw_t(n, dist, mean) at t in (0, 1 - TAIL], for "uniform",
    "logit-normal", "tail" and "elbo"."""
    if dist == "uniform":
        return torch.ones_like(t)
    if dist == "logit-normal":  # z = logit(t) ~ N(mean, 1), dz/dt = 1 / (t (1 - t))
        z = torch.logit(t) - mean
        return torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi) / (t * (1 - t))
    if dist == "tail":  # half U(0, 1), half 1 - t log-uniform in [TAIL, 1]
        return 0.5 + 0.5 / ((1 - t) * math.log(1 / TAIL))
    if dist == "elbo":  # t / (1 - t) / Z, Z = its integral over [0, 1 - TAIL]
        return t / (1 - t) / ELBO_Z
    raise ValueError(f"no density for the distribution of t {dist!r}")

# =============================================================================
# plumbing: what the scripts need around the maths, which a learner can skip
# =============================================================================

# -----------------------------------------------------------------------------
# the command line: one-line errors, argparse types, device and precision

def die(msg):
    """A user's mistake: one line on stderr naming the script, exit status 1."""
    raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'nanofm'}: error: {msg}")

class Help(argparse.HelpFormatter):
    """--help with each setting's default after its text, as "(default: 20)" (not for a
    switch, nor for a setting whose default is none or is said in its text)."""
    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in action.help \
                or action.default == argparse.SUPPRESS:
            return action.help
        return action.help + " (default: %(default)s)"

# argparse types: a ValueError becomes one line, "argument --lr: invalid positive_float value: '0'"
def positive_int(s):  # counts: epochs, steps, ...
    if not int(s) > 0:
        raise ValueError(s)
    return int(s)

def finite_float(s):  # a number, not inf or nan
    if not math.isfinite(float(s)):
        raise ValueError(s)
    return float(s)

def positive_float(s):  # a learning rate
    if not finite_float(s) > 0:
        raise ValueError(s)
    return float(s)

def non_negative_float(s):  # a guidance weight
    if not finite_float(s) >= 0:
        raise ValueError(s)
    return float(s)

def probability(s):  # 0 <= p <= 1
    if not 0 <= float(s) <= 1:
        raise ValueError(s)
    return float(s)

def decay(s):  # a moving average's decay, 0 (none) <= d < 1
    if not 0 <= float(s) < 1:
        raise ValueError(s)
    return float(s)

def pick_device(name="auto"):
    """'auto' takes cuda, then mps, then cpu; a named device must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        die(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        die(f"device {name!r} is not available on this machine ({n} CUDA "
            f"device{'' if n == 1 else 's'})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        die(f"device {name!r} is not available on this machine (no Apple GPU)")
    return device

def pick_dtype(name, device):
    """'auto' takes bfloat16 autocast only on a CPU that computes it natively (AVX512-BF16
    or AMX): 2.3x faster there; emulated bf16 is slower than fp32, and so is autocast on an
    H200 (README, appendix E)."""
    if name == "auto":
        native = device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or
                                           torch.cpu._is_amx_tile_supported())
        name = "bfloat16" if native else "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]

def autocast(device, dtype):
    """Mixed precision: matmuls and convs in bf16, weights and the loss stay in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

def budget(nfe, per):
    """The solver evaluations an image may take (plan's budget): the network evaluations of
    --nfe (nfe) if given, else 20, or GUIDED_NFE when each solver evaluation takes two
    (per), divided by per; at least one."""
    return max(1, (nfe or (GUIDED_NFE if per == 2 else 20)) // per)

def guidance(args, conditional, path, script):
    """How to sample a model: (W, shape, per, budget): W and its shape (--guidance,
    --guidance-shape; GUIDANCE, GUIDANCE_SHAPE), the network evaluations each solver
    evaluation then takes, and the solver evaluations an image may take (budget). An
    unconditional model: (1, GUIDANCE_SHAPE, 1, --nfe or 20); --digit, --guidance or
    --guidance-shape given for it (path) is one line."""
    given = [k for k in ("digit", "guidance", "guidance_shape") if getattr(args, k) is not None]
    if not conditional:
        if given:
            die(f"--{given[0].replace('_', '-')}: {path} is not a conditional model ({script} "
                f"--conditional trains one)")
        return 1.0, GUIDANCE_SHAPE, 1, budget(args.nfe, 1)
    w = GUIDANCE if args.guidance is None else args.guidance
    shape = args.guidance_shape or GUIDANCE_SHAPE
    per = evaluations_per_step(w, shape)
    return w, shape, per, budget(args.nfe, per)

def check_guidance_flags(args):
    """A training run: --digit is for --sample, --guidance and --guidance-shape for a
    conditional model (a resumed run's own checkpoint says whether it is one: guidance())."""
    if args.digit is not None:
        die("--digit is for --sample; a conditional run's pictures show every digit")
    for k in ("guidance", "guidance_shape"):
        if getattr(args, k) is not None and not (args.conditional or args.resume):
            die(f"--{k.replace('_', '-')} is for a conditional model: add --conditional")

def labels_to_ask(args, n):
    """The n digits a conditional model is asked for: --digit, or 0, 1, ..., 9 in turn."""
    return torch.full((n,), args.digit) if args.digit is not None else torch.arange(n) % 10

# -----------------------------------------------------------------------------
# data: MNIST and Fashion-MNIST through torchvision, checked; fixed noise

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_MD5 = {  # the official files' (uncompressed), in IDX_FILES' order
    "MNIST": ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
              "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
    "FashionMNIST": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
                     "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965")}

def check_idx(path, md5):
    """One line if a data file is there but damaged: not IDX, not the size its header gives,
    or the official size (60,000 or 10,000 items) with another MD5. A missing file passes."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    nd = data[3] if len(data) > 3 and data[:3] == b"\0\0\x08" and data[3] in (1, 3) else 0
    shape = struct.unpack(f">{nd}I", data[4:4 + 4 * nd]) if len(data) >= 4 + 4 * nd else ()
    if not shape or len(data) != 4 + 4 * nd + math.prod(shape):
        problem = f"{len(data)} bytes, not an IDX file of the size its header gives"
    elif shape[0] in (60000, 10000) and hashlib.md5(data).hexdigest() != md5:
        problem = "the official file's size, but not its MD5"
    else:
        return
    die(f"{path} is damaged ({problem}); delete it so that it is downloaded again, "
        f"or copy it again")

def load_images(name, root, train=True, labels=False):
    """All images of MNIST or FashionMNIST as one tensor (N, 1, 28, 28) in [-1, 1] (and
    their classes (N,)). torchvision downloads them on first use; offline, we say where to
    put them."""
    import torchvision  # only the image scripts need it
    for file, md5 in zip(IDX_FILES, IDX_MD5[name]):
        check_idx(os.path.join(root, name, "raw", file), md5)
    try:
        ds = getattr(torchvision.datasets, name)(root, train=train, download=True)
    except Exception as e:  # no network, a proxy, a truncated file: all end here
        raw = os.path.join(root, name, "raw")
        die(f"{name} is not in {raw} and could not be downloaded ({type(e).__name__}); "
            f"put the four files {', '.join(IDX_FILES)} there")
    x = ds.data[:, None].float() / 127.5 - 1  # uint8 (N, 28, 28) -> (N, 1, 28, 28)
    return (x, ds.targets) if labels else x

def fixed_noise(n, seed):
    """n noise images (n, 1, 28, 28) fixed by the seed: mnist.py, reflow.py and evaluate.py
    share them."""
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))

def blur(garments, sigma, seed=0):
    """translate.py --sigma's starting points: the garments (N, 1, 28, 28) plus sigma times
    the fixed noise of seed, as in training a garment plus Gaussian noise."""
    return garments + sigma * fixed_noise(len(garments), seed) if sigma else garments

# -----------------------------------------------------------------------------
# files and checkpoints. Every file is written under a temporary name beside it (NAME.tmp.EXT)
# and renamed when complete: a crash or a full disk never leaves a half-written file under
# the real name, and the one that was there stays as it was. A kill (SIGKILL, power) can leave
# the temporary file behind; the next write of the same file replaces it.

def make_dir(path):
    """Create a folder to write into, or say in one line why it cannot be."""
    try:
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, ".nanofm-write-test"), "w").close()
        os.remove(os.path.join(path, ".nanofm-write-test"))
    except OSError as e:
        die(f"cannot write to the folder {path}: {e.strerror or e}")

@contextlib.contextmanager
def atomic_write(path):
    """with atomic_write(path) as tmp: write tmp (same extension as path, so that writers
    that go by it still do). When the block ends it is renamed to path; if it fails, tmp is
    removed and path is as it was (a full disk or a folder we may not write: one line)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        die(f"cannot write {path} ({str(e).splitlines()[0][:200]}); what was there is unchanged")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def atomic_save(obj, path):
    """torch.save, through atomic_write."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)

def load_checkpoint(path):
    if not os.path.exists(path):
        die(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint {path}: not a file that torch.save wrote, or a damaged one "
            f"({type(e).__name__}); write it again, or delete it")

def written_by(ckpt):
    """The script that wrote a checkpoint, as it records ("script"; None in a checkpoint from
    before that record). A run of mnist.py --pairing reflow, from before reflow had a script
    of its own, is reflow.py's."""
    if not isinstance(ckpt, dict):
        return None
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    if ckpt.get("script") == "mnist.py" and config.get("pairing") == "reflow":
        return "reflow.py"
    return ckpt.get("script")

def check_script(ckpt, path, scripts, hint=None):
    """Checkpoints record the script that wrote them: a script not among `scripts` (one, or a
    tuple) refuses them in one line, with `hint` or the script to use. A checkpoint from
    before that record passes."""
    scripts = (scripts,) if isinstance(scripts, str) else tuple(scripts)
    wrote = written_by(ckpt)
    if wrote is not None and wrote not in scripts:
        named = " or ".join([", ".join(scripts[:-1]), scripts[-1]] if len(scripts) > 1 else scripts)
        die(f"{path} is a run of {wrote}, not of {named}"
            f"{f': use {wrote}' if hint is None else hint}")

def restore(model, weights, path):
    """Load weights (a state dict) into model, or say clearly that they do not fit it."""
    try:
        model.load_state_dict(weights)
    except (KeyError, IndexError, TypeError, RuntimeError):
        die(f"{path} does not hold weights for this script's {type(model).__name__}")
    return model

def network_for(config, script):
    """The untrained network that a run's settings (config) and script describe: a mean
    flow's, or make_unet's (its labels, its Blend)."""
    if script == "meanflow.py":
        return MeanFlowUNet()
    return make_unet(config.get("conditional"), config.get("predict", "v"),
                     config.get("schedule", "cosine"), config.get("width", 32))

def load_model(path, device, raw=False, script=None, hint=None):
    """The U-Net of a checkpoint (in a Blend where it predicts one), for sampling: its moving
    average where it has one, unless raw, and the settings it was trained with. With script
    (one, or a tuple), a checkpoint another script wrote is refused (check_script).
    channels_last: the layout fast conv kernels want."""
    ckpt = load_checkpoint(path)
    if script:
        check_script(ckpt, path, script, hint)
    if raw and isinstance(ckpt, dict) and "ema" in ckpt and "model" not in ckpt:
        die(f"{path} holds only the moving average of the weights; --raw needs a run's ckpt.pt")
    weights = None
    if isinstance(ckpt, dict):
        weights = ckpt.get("ema" if "ema" in ckpt and not raw else "model")
    config = (ckpt.get("config") if isinstance(ckpt, dict) else None) or {}
    model = network_for(config, written_by(ckpt))
    if config.get("conditional") and isinstance(weights, dict) and "label.0.weight" not in weights:
        # a conditional U-Net saved before the label entered the later blocks: with those
        # shifts at 0 (as they start) it is exactly that U-Net
        weights = {**{k: v for k, v in model.state_dict().items() if k.startswith("label.")},
                   **weights}
    model = restore(model, weights, path)
    model = model.to(device, memory_format=torch.channels_last)
    return model, config

# -----------------------------------------------------------------------------
# a training run's plumbing: resume exactly, stop on divergence, Ctrl-C, memory

# settings newer than some checkpoints, by script: what a run saved before them trained with
OLDER = {"mnist.py": {"t_dist": "uniform", "t_mean": 0.0, "warmup": None, "clip": None,
                      "pairing": "random", "conditional": False, "label_drop": 0.1,
                      "dequantize": False, "predict": "v", "width": 32, "importance": False,
                      "cooldown": None},
         "translate.py": {"t_dist": "uniform", "t_mean": 0.0, "warmup": None, "clip": None,
                          "pairing": "random", "conditional": False, "label_drop": 0.1,
                          "sigma": 0.0, "cooldown": None},
         "reflow.py": {"cooldown": None}, "meanflow.py": {"cooldown": None}}

def resume(path, args, script):
    """--resume: returns the checkpoint at path, the run's settings and its U-Net (in a Blend
    where it predicts one) with the trained weights. The settings are the checkpoint's (with
    OLDER[script] for settings it predates; those the script no longer has left out), but
    --epochs, --out, --data, --device, --dtype, --nfe, --guidance and --guidance-shape as
    given now, and --cooldown where given. What cannot be resumed is one line."""
    ckpt = load_checkpoint(path)
    check_script(ckpt, path, script)
    if isinstance(ckpt, dict) and "config" in ckpt and "optimizer" not in ckpt:
        die(f"{path} holds weights only, no optimiser state: it can --sample, not --resume")
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    model = network_for(config if isinstance(config, dict) else {}, script)
    model = restore(model, ckpt.get("model") if isinstance(ckpt, dict) else None, path)
    if not isinstance(config, dict):
        die(f"{path} has no training settings to resume from")
    if ckpt.get("epoch", 0) >= args.epochs:
        die(f"{path} holds {ckpt.get('epoch', 0)} epochs already: nothing to do for --epochs "
            f"{args.epochs}; ask for more than {ckpt.get('epoch', 0)}")
    mine = vars(args)
    given = {k: mine[k] for k in ("epochs", "out", "data", "device", "dtype", "resume", "nfe",
                                  "guidance", "guidance_shape") if k in mine}
    if mine.get("cooldown") is not None:  # given now: it replaces the saved one
        given["cooldown"] = mine["cooldown"]
    saved = {k: v for k, v in {**OLDER[script], **config}.items() if k in mine}
    args = argparse.Namespace(**{**mine, **saved, **given})
    check_cooldown(saved, args, ckpt["epoch"], path)  # every script that resumes has --cooldown
    print(f"resuming {path} after epoch {ckpt['epoch']}")
    return ckpt, args, model

def check_cooldown(saved, args, done, path):
    """A resumed run's --cooldown: within the run, and every epoch done trained at the rate
    learning_rate gives it under the settings now (saved: the checkpoint's)."""
    E, C, E0, C0 = args.epochs, args.cooldown, saved.get("epochs"), saved.get("cooldown")
    if C and C > E:
        die(f"a cooldown of {C} epochs is longer than the run's {E}")
    if (E0, C0) == (E, C) or not (C or C0):
        return
    if C0 and done > E0 - C0:
        die(f"{path} is in its cooldown (the last {C0} of {E0} epochs): resume it with "
            f"--epochs {E0} --cooldown {C0}" if done < E0 else
            f"{path} ended with its cooldown (the last {C0} of {E0} epochs): it cannot go on "
            f"at the rate a longer run would have had; train another --out")
    if C and done > E - C:
        die(f"a cooldown of {C} epochs in {E} would have begun after epoch {E - C}, and {path} "
            f"holds {done} epochs without it: ask for --epochs {done + C} or more")

def restore_state(ckpt, opt, ema, device):
    """The rest of a resumed run's state, so that it goes on exactly: the optimiser's
    moments, the moving average (a checkpoint without one starts it from the weights), the
    random number generators. Returns the epochs done."""
    if ema is not None and "ema" in ckpt:
        ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    if device.type == "cuda" and ckpt["cuda_rng"]:
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["epoch"]

def learning_rate(n, lr, warmup, cooldown, epochs, batches):
    """The learning rate of optimiser step n + 1 (n done) in a run of `epochs` epochs of
    `batches` steps: rising linearly to lr over `warmup` steps, then lr, then over the last
    `cooldown` epochs falling linearly towards 0 (the last step's is lr / (cooldown batches)).
    A cooldown after a constant rate (the "warmup-stable-decay" schedule; Hägele et al. 2024,
    "Scaling laws and compute-optimal training beyond fixed training durations") leaves the
    epochs before it as they were, so a run without one can be cooled down from its checkpoint
    OUT/ckpt.pt: --resume --epochs E --cooldown C after E - C epochs or fewer."""
    rate = lr * min(1, (n + 1) / warmup) if warmup else lr
    if cooldown:
        rate *= min(1, (epochs * batches - n) / (cooldown * batches))
    return rate

def check_loss(total, loss, step, epoch, lr):
    """A non-finite loss (total: the epoch's sum so far) stops the run before the optimiser
    step it would spoil the weights with; the last checkpoint stays as it was."""
    if not math.isfinite(total):
        die(f"the loss is {loss.item()} at step {step} of epoch {epoch}: the run diverged; "
            f"try a smaller --lr than {lr:g} (the last checkpoint is left as it was)")

def check_weights(models, epoch, lr):
    """Never a checkpoint of non-finite weights."""
    if not all(p.isfinite().all() for m in models for p in m.parameters()):
        die(f"the weights are no longer finite after epoch {epoch}: the run diverged; "
            f"try a smaller --lr than {lr:g} (the last checkpoint is left as it was)")

def interrupted(script, args, epoch, saved, path):
    """Ctrl-C in epoch `epoch`: one line on stderr with the epoch the checkpoint at path
    holds (saved) and the command that goes on from it; exit status 130."""
    print("\r\033[K" if sys.stdout.isatty() else "", end="", flush=True)  # (the progress line)
    data = f" --data {shlex.quote(args.data)}" if "data" in vars(args) else ""
    again = f"python {script} --out {shlex.quote(args.out)}{data} --resume --epochs {args.epochs}"
    again += "".join(f" --{k} {v}" for k in ("device", "dtype")
                     if (v := vars(args).get(k, "auto")) != "auto")
    where = f"{path} holds epoch {saved}; continue with: {again}" if saved else \
        "no checkpoint was written yet"
    print(f"{script}: interrupted in epoch {epoch}; {where}", file=sys.stderr)
    raise SystemExit(130)

def free_memory(device=None):
    """The memory free on a CUDA device, or else Linux's MemAvailable, in bytes; None where it
    is unknown (Apple's mps, other systems)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device is not None and device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None

def check_memory(need, what, device=None):
    """One line if `need` bytes are more than the memory free (free_memory: the device's for
    a GPU, else the machine's; unknown: pass)."""
    free = free_memory(device)
    if free is not None and need > free:
        die(f"{what} needs {need / 2**30:.1f} GiB of memory, {free / 2**30:.1f} GiB is free: "
            f"ask for fewer")

def step_memory(model, batch, channels=1):
    """The bytes a training step of `batch` images needs at least: the output of every layer
    of the U-Net model for each image, which the backward pass keeps, and as much again for
    their gradients, in float32. Counted on one image of zeros (of `channels` maps)."""
    sizes = []
    layers = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, out: sizes.append(out.numel())) for m in layers]
    try:
        with torch.no_grad():
            x, t, y = torch.zeros(1, channels, 28, 28), torch.zeros(1), torch.zeros(1).long()
            model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    return 2 * 4 * batch * sum(sizes)

# -----------------------------------------------------------------------------
# pictures

def to_unit(x):
    """[-1, 1] (what the model makes, clipped) -> [0, 1] (what an image file holds)."""
    return (x.float().clamp(-1, 1) + 1) / 2

def save_grid(x, path, nrow):
    """torchvision's save_image (a grid of x (N, 1, 28, 28) in [0, 1], nrow to a row),
    through atomic_write."""
    from torchvision.utils import save_image
    with atomic_write(path) as tmp:
        save_image(x, tmp, nrow=nrow)

def save_flow(path, ts, out, rows=8, scale=2):
    """OUT/flow.png: `rows` images (a row each) at about ten of the times ts (columns,
    written above them), and OUT/flow.gif: all of path (up to 64 images) moving from t = 0
    to 1. path: (steps + 1, K, 1, 28, 28) in [0, 1], the states at the times ts."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid
    # (3, H, W) in [0, 1] -> a grey PIL image
    to_image = lambda grid: Image.fromarray(grid[0].mul(255).round().byte().numpy())
    cols = sorted({round(i * (len(ts) - 1) / 9) for i in range(10)})
    grid = to_image(make_grid(path[cols, :rows].transpose(0, 1).flatten(0, 1), nrow=len(cols)))
    png = Image.new("L", (grid.width * scale, grid.height * scale + 12 * scale))
    big = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    png.paste(big, (0, 12 * scale))
    for j, c in enumerate(cols):
        ImageDraw.Draw(png).text(((30 * j + 4) * scale, 2), f"t={ts[c]:.2f}", fill=255,
                                 font_size=6 * scale)
    with atomic_write(os.path.join(out, "flow.png")) as tmp:
        png.save(tmp)
    frames = [to_image(make_grid(x, nrow=8)) for x in path]
    frames += [to_image(make_grid(path[-1], nrow=8))] * 12  # held at the end
    with atomic_write(os.path.join(out, "flow.gif")) as tmp:
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=120, loop=0)

# -----------------------------------------------------------------------------
# sampling many images: in chunks, to pictures' [0, 1], with or without guidance

@torch.no_grad()
def generate(model, x0, steps, device, dtype, solver="euler", ts=None, keep=0, y=None, w=1.0,
             shape=None):
    """Carry x0 (N, 1, 28, 28) to t = 1 in chunks of 256: (N, 1, 28, 28) in [0, 1] on the
    CPU. With keep=K, also the way there of the first K images, (steps + 1, K, 1, 28, 28)
    in [0, 1]. With labels y (N,), a conditional model's field, guided by w and shape
    (guided)."""
    xs, path, chunks = [], None, x0.split(256)
    ys = y.split(256) if y is not None else [None] * len(chunks)
    with autocast(device, dtype):
        for i, (chunk, yc) in enumerate(zip(chunks, ys)):
            first = keep > 0 and i == 0
            field = model if yc is None else guided(model, yc.to(device), w, shape)
            x = sample(field, chunk.to(device), steps, solver, trajectory=first, ts=ts)
            if keep and i == 0:  # the states on the way, from the same network evaluations
                path, x = to_unit(x[:, :keep]).cpu(), x[-1]
            xs.append(to_unit(x).cpu())
    return (torch.cat(xs), path) if keep else torch.cat(xs)

@torch.no_grad()
def generate_mean(model, x0, steps, device):
    """A mean flow's generate: x0 (N, 1, 28, 28) carried in `steps` jumps (mean_flow_sample), in
    chunks of 256, in float32: (N, 1, 28, 28) in [0, 1] on the CPU."""
    return torch.cat([to_unit(mean_flow_sample(model, chunk.to(device), steps)).cpu()
                      for chunk in x0.split(256)])

# the guidance of the rows of --sample --digit's strip.png, by shape
STRIP = {"ramp": (1, 2, 4, 6, 8), "constant": (0, 1, 1.5, 2, 3)}

# -----------------------------------------------------------------------------
# progress

def progress(epoch, epochs, step, steps, images, loss_sum, t0):
    """Progress inside an epoch of `steps` optimiser steps: on a terminal one line rewritten
    in place, into a file or a pipe a plain line every tenth of the epoch. Called after
    every step; epoch counts from 1."""
    tty = sys.stdout.isatty()
    if step == steps:  # the epoch's own line follows
        print("\r\033[K" if tty else "", end="", flush=True)
        return
    if step % max(1, steps // (100 if tty else 10)):
        return
    dt = time.time() - t0
    left = (steps - step) * dt / step
    clock = lambda s: f"{int(s) // 3600:02d}:{int(s) // 60 % 60:02d}:{int(s) % 60:02d}"
    line = (f"  step {step}/{steps} of epoch {epoch}/{epochs} | loss {loss_sum / images:.4f} | "
            f"{images / dt:.0f} img/s | {clock(left)} left in the epoch, "
            f"{clock(left + (epochs - epoch) * steps * dt / step)} in the run")
    print("\r\033[K" + line if tty else line, end="" if tty else "\n", flush=True)
