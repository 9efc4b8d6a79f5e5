"""
The pieces every nanoFM script shares: the schedules, the flow matching loss,
the Euler sampler, the two networks (an MLP for 2D, the handout's U-Net for
images) and a few small helpers (device, seed, errors, checkpoints).

Equation numbers refer to the handout of the practical (section 1; see README.md).
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

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
# training and sampling

T_DISTS = ("uniform", "logit-normal")  # the distributions of t that fm_loss knows

def fm_loss(model, x0, x1, schedule, t_dist="uniform"):
    """The flow matching loss (Eq. 4, generalised by Eq. 6) for one batch.
    x0 ~ mu_0 and x1 ~ mu_1 have the same shape (B, ...); each sample gets its own t,
    drawn from U(0, 1), or with t_dist="logit-normal" as sigmoid(N(0, 1)): more samples
    in the middle of the path, fewer near its ends (Esser et al. 2024)."""
    if t_dist == "uniform":
        t = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)
    elif t_dist == "logit-normal":
        t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device, dtype=x0.dtype))
    else:
        raise ValueError(f"unknown distribution of t {t_dist!r}; known: {', '.join(T_DISTS)}")
    alpha, beta, dalpha, dbeta = (s.view(-1, *[1] * (x0.dim() - 1)) for s in schedule(t))
    xt = alpha * x0 + beta * x1          # a point on the path, Eq. 5
    target = dalpha * x0 + dbeta * x1    # its velocity dX_t/dt, Eq. 6 (X_1 - X_0 for linear)
    # under bf16 autocast the network answers in bf16; the error is taken in x0's precision
    return (model(xt, t).to(target.dtype) - target).pow(2).mean()

# The samplers integrate dx/dt = model(x, t) from t = 0 to t = 1 on the grid t_i = i / steps.
# One step of each solver, from (x, t) to t_next:

def euler_step(model, x, t, t_next):
    """x_{i+1} = x_i + h f_{t_i}(x_i), h = t_{i+1} - t_i: one network evaluation, error O(h)."""
    return x + (t_next - t) * model(x, t.expand(x.shape[0]))

def heun_step(model, x, t, t_next):
    """Heun's method (the explicit trapezoid rule): an Euler step to a trial point, then
    the step again with the mean of the slopes at both ends. Two network evaluations,
    error O(h^2): halving h divides the error by about 4 (Euler: by 2)."""
    h = t_next - t
    d = model(x, t.expand(x.shape[0]))
    d_next = model(x + h * d, t_next.expand(x.shape[0]))
    return x + h * (d + d_next) / 2

SOLVERS = {"euler": euler_step, "heun": heun_step}
NFE_PER_STEP = {"euler": 1, "heun": 2}  # network evaluations per step

@torch.no_grad()
def sample(model, x0, steps, solver="euler", trajectory=False):
    """Carry x0 (B, ...) from t = 0 to t = 1 in `steps` equal steps of `solver`.
    Returns the final points, or with trajectory=True all steps+1 states (steps+1, B, ...)."""
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"the number of steps must be a positive integer, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {', '.join(SOLVERS)}")
    step = SOLVERS[solver]
    ts = torch.linspace(0, 1, steps + 1, device=x0.device, dtype=x0.dtype)
    x, xs = x0, [x0]
    for i in range(steps):
        x = step(model, x, ts[i], ts[i + 1])
        if trajectory:
            xs.append(x)
    return torch.stack(xs) if trajectory else x

def euler(model, x0, steps, trajectory=False):
    """The Euler sampler of Eq. 7, written exactly:
        x_{i+1} = x_i + (t_{i+1} - t_i) f_{t_i}(x_i),  t_i = i / steps,  i = 0 .. steps-1.
    The handout's integral should read X_0 + int_0^1 v_t(phi_t(X_0)) dt, and its sum over
    i = 1 .. N-1 needs the grid t_1 = 0, ..., t_N = 1; we count steps instead."""
    return sample(model, x0, steps, "euler", trajectory)

def train_2d(model, draw, schedule, args, every, tag=""):
    """The training loop of the 2D scripts: args.iters Adam steps on fresh batches
    x0, x1 = draw(args.batch_size), printing the mean loss every `every` steps."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses, t0 = [], time.time()
    for it in range(1, args.iters + 1):
        x0, x1 = draw(args.batch_size)
        loss = fm_loss(model, x0, x1, schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if it % every == 0:
            print(f"{tag}iter {it:5d}/{args.iters} | loss {sum(losses[-every:]) / every:.4f} | {time.time() - t0:5.1f} s")
    return losses

# -----------------------------------------------------------------------------
# networks. Every model is called as model(xt, t) with t of shape (B,).

class MLP(nn.Module):
    """The MLP of section 2: d + 1 inputs (the point and the time, last), three hidden
    layers of n_hidden with ReLU, d outputs. The handout also puts a ReLU on the output;
    we don't: a velocity has negative components too, and a ReLU there could never
    move a point left or down."""

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
    """The U-Net of section 3, for 28x28 images, exactly as the handout gives it.
    The time enters as a constant extra input channel (the "time map")."""

    def __init__(self, c_in=1, c_out=1):
        super().__init__()
        self.enc1 = DoubleConv(c_in + 1, 32)
        self.enc2 = DoubleConv(32, 64)
        self.mid = DoubleConv(64, 64)
        self.up2 = nn.ConvTranspose2d(64, 64, 2, stride=2)
        self.dec2 = DoubleConv(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 32, 2, stride=2)
        self.dec1 = DoubleConv(32, 32)
        self.out = nn.Conv2d(32, c_out, 1)

    def forward(self, x, t):
        B, _, H, W = x.shape
        tmap = t.to(x.dtype).view(B, 1, 1, 1).expand(B, 1, H, W)
        e1 = self.enc1(torch.cat([x, tmap], dim=1))  # (B, 32, 28, 28)
        e2 = self.enc2(F.max_pool2d(e1, 2))           # (B, 64, 14, 14)
        m = self.mid(F.max_pool2d(e2, 2))             # (B, 64, 7, 7)
        d2 = self.dec2(self.up2(m) + e2)              # (B, 32, 14, 14), additive skip
        d1 = self.dec1(self.up1(d2) + e1)             # (B, 32, 28, 28), additive skip
        return self.out(d1)                           # (B, c_out, 28, 28)

# -----------------------------------------------------------------------------
# helpers for the scripts

def die(msg):
    """A user's mistake: one line on stderr naming the script, exit status 1."""
    raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'nanofm'}: error: {msg}")

def positive_int(s):
    """argparse type for counts (steps, epochs, ...): a clear error for 0, -3 or 'ten'."""
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(s)  # argparse turns this into "invalid positive_int value: 's'"
    return n

def positive_float(s):
    """argparse type for a learning rate: a clear error for 0, -1e-3 or 'fast'."""
    x = float(s)  # argparse turns a ValueError into "invalid positive_float value: 's'"
    if not x > 0:
        raise ValueError(s)
    return x

def decay(s):
    """argparse type for a moving average's decay: 0 <= d < 1."""
    d = float(s)  # argparse turns a ValueError into "invalid decay value: 's'"
    if not 0 <= d < 1:
        raise ValueError(s)
    return d

def one_line_errors(parser):
    """argparse prints its usage (several lines) before an error; we print the error alone."""
    parser.error = lambda msg: die(msg)
    return parser

def pick_device(name="auto"):
    """'auto' takes cuda, then mps, then cpu; a named device must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        die(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if (device.type == "cuda" and not torch.cuda.is_available()) or \
       (device.type == "mps" and not torch.backends.mps.is_available()):
        die(f"device {name!r} is not available on this machine")
    return device

def seed_everything(seed):
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device

# -----------------------------------------------------------------------------
# the image scripts (mnist.py, translate.py): data, precision, checkpoints, the loop

def image_parser(description, epochs):
    """The flags mnist.py and translate.py share; the defaults are the recommended run."""
    parser = one_line_errors(argparse.ArgumentParser(description=description))
    add = parser.add_argument
    add("--schedule", default="cosine", choices=list(SCHEDULES), help="the path from x0 to x1 (Eq. 5)")
    add("--epochs", type=positive_int, default=epochs, help="passes over the training set")
    # 64 beat the handout's 128 after 20 epochs on two noise sets, at the same cost per epoch on a CPU (README, 4)
    add("--batch-size", type=positive_int, default=64, help="images per optimiser step (default %(default)s; the handout's: 128)")
    add("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    add("--lr-schedule", default="constant", choices=["constant", "cosine"],
        help="cosine: the learning rate falls from --lr to 0 over the run's --epochs")
    # t ~ sigmoid(N(0, 1)) beat the handout's U(0, 1) after 20 epochs on two noise sets (README, section 4)
    add("--t-dist", default="logit-normal", choices=list(T_DISTS),
        help="the distribution of t in training (uniform: the handout's)")
    # Heun with 25 steps samples as well as Euler with 100, at half the cost (README, section 4)
    add("--steps", type=positive_int, default=25, help="solver steps when sampling (Eq. 7 for Euler)")
    add("--solver", default="heun", choices=list(SOLVERS), help="euler: 1 network call a step; heun: 2, more exact")
    add("--ema", type=decay, default=0.999, metavar="DECAY",
        help="keep an exponential moving average of the weights (0: none); sampling uses it")
    add("--raw", action="store_true", help="with --sample: the trained weights, not their average")
    add("--seed", type=int, default=0, help="seeds the training and the fixed sampling noise")
    add("--limit", type=positive_int, default=None, help="train on the first N images only (quick runs)")
    add("--data", default="data", help="torchvision's data folder (MNIST/raw/, FashionMNIST/raw/ below it)")
    add("--out", default=None, help="output folder (default: out/SCRIPT-SCHEDULE)")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
        help="auto: bf16 autocast only where the hardware computes bf16 natively")
    add("--resume", action="store_true", help="continue OUT/ckpt.pt (its settings, new --epochs)")
    add("--sample", type=positive_int, default=None, metavar="N",
        help="no training: load OUT/ckpt.pt and write N results to OUT/samples.pt and .png")
    return parser

def pick_dtype(name, device):
    """'auto' takes bfloat16 only where the hardware computes it natively: a CUDA GPU
    that supports it, or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and
    slower than fp32 (measured in the README)."""
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        elif device.type == "cpu":
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        else:
            native = False
        return torch.bfloat16 if native else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]

def autocast(device, dtype):
    """Mixed precision: matmuls and convs in bf16, weights and the loss stay in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

def load_images(name, root, train=True, labels=False):
    """All images of MNIST or FashionMNIST as one float tensor (N, 1, 28, 28) in [-1, 1]
    (with labels=True, also their classes, (N,) int64).
    torchvision downloads the files into root/name/raw on first use; offline, we say
    exactly what to put where. Pixels go to [-1, 1] to be centred and of the same scale
    as the N(0, I) noise the flow starts from."""
    import torchvision  # only the image scripts need it
    cls = getattr(torchvision.datasets, name)
    try:
        ds = cls(root, train=train, download=True)
    except Exception as e:  # no network, a proxy, a truncated file: all end here
        raw = os.path.join(root, name, "raw")
        die(f"{name} is not in {raw} and could not be downloaded ({type(e).__name__}); "
            f"put the four files {', '.join(IDX_FILES)} there")
    x = ds.data[:, None].float() / 127.5 - 1  # uint8 (N, 28, 28) -> (N, 1, 28, 28)
    return (x, ds.targets) if labels else x

def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a kill mid-write never leaves a half file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)

def load_checkpoint(path):
    if not os.path.exists(path):
        die(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

def restore(model, ckpt, path):
    """Load a checkpoint's weights into model, or say clearly that they do not fit it."""
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, IndexError, TypeError, RuntimeError):
        die(f"{path} does not hold weights for this script's {type(model).__name__}")
    return model

def start_run(args):
    """Seed, then a fresh U-Net, or with --resume the one in OUT/ckpt.pt and its settings
    (only --epochs, --device and --dtype come from the command line). A fresh run never
    overwrites an earlier one. Returns (args, model, ckpt or None)."""
    path = os.path.join(args.out, "ckpt.pt")
    seed_everything(args.seed)
    model, ckpt = UNet(), None
    if args.resume:
        ckpt = load_checkpoint(path)
        restore(model, ckpt, path)
        if not isinstance(ckpt.get("config"), dict):
            die(f"{path} has no training settings to resume from")
        keep = {k: getattr(args, k) for k in ("epochs", "device", "dtype", "resume")}
        # the checkpoint's settings win; a setting newer than the checkpoint keeps its default
        args = argparse.Namespace(**{**vars(args), **ckpt["config"], **keep})
    elif os.path.exists(path):
        die(f"{path} exists: add --resume to continue that run, or choose another --out")
    os.makedirs(args.out, exist_ok=True)
    return args, model, ckpt

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, tensor by tensor (the U-Net has no buffers)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)

def train(args, model, ckpt, device, dtype, x1_all, draw_x0, picture):
    """The training loop of the image scripts. x1_all: the target images (N, 1, 28, 28)
    on the device; draw_x0(x1) gives the matching batch of starting points; picture(model,
    epoch) draws the epoch's PNG. After every epoch: one log line, the picture, then the
    checkpoint, written atomically, with all it takes to resume exactly."""
    # channels_last: the layout the fast conv kernels want (README, "How fast")
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # the moving average of the weights; its decay warms up as (1 + n) / (10 + n), so that
    # short runs are not dominated by the random initial weights
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    schedule, N, start = get_schedule(args.schedule), len(x1_all), 0
    if ckpt:
        if ema is not None and "ema" in ckpt:  # (a checkpoint without one starts it from its weights)
            ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda" and ckpt["cuda_rng"]:
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        start = ckpt["epoch"]
        print(f"resuming {args.out}/ckpt.pt after epoch {start}")
    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, schedule {args.schedule}, "
          f"seed {args.seed}, {N} training images, {sum(p.numel() for p in model.parameters())} parameters")
    per_epoch = math.ceil(N / args.batch_size)
    n, n_total = start * per_epoch, args.epochs * per_epoch  # optimiser steps: done, in all
    for epoch in range(start, args.epochs):
        t0 = time.time()
        total = torch.zeros((), device=device)
        for idx in torch.randperm(N).split(args.batch_size):
            x1 = x1_all[idx.to(device)]  # (B, 1, 28, 28)
            x0 = draw_x0(x1)
            if args.lr_schedule == "cosine":  # from the step count: a resumed run goes on exactly
                for group in opt.param_groups:
                    group["lr"] = args.lr * (1 + math.cos(math.pi * n / n_total)) / 2
            with autocast(device, dtype):
                loss = fm_loss(model, x0, x1, schedule, args.t_dist)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += 1
            if ema is not None:
                update_ema(ema, model, min(args.ema, (1 + n) / (10 + n)))
            total += loss.detach() * len(idx)
        dt = time.time() - t0
        print(f"epoch {epoch + 1:3d}/{args.epochs} | loss {total.item() / N:.4f} | "
              f"{N / dt:5.0f} img/s | {dt:6.1f} s", flush=True)
        picture(ema if ema is not None else model, epoch + 1)
        atomic_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "config": vars(args),
            **({"ema": ema.state_dict()} if ema is not None else {}),
            "epoch": epoch + 1, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        }, os.path.join(args.out, "ckpt.pt"))

def load_model(out, device, raw=False):
    """The U-Net of OUT/ckpt.pt, for sampling: its moving average where it has one, unless
    raw. channels_last doubles the speed of the forward pass on our CPU (README, "How fast")."""
    path = os.path.join(out, "ckpt.pt")
    ckpt = load_checkpoint(path)
    if not raw and isinstance(ckpt, dict) and "ema" in ckpt:
        ckpt = {"model": ckpt["ema"]}
    return restore(UNet(), ckpt, path).to(device, memory_format=torch.channels_last)

@torch.no_grad()
def generate(model, x0, steps, device, dtype, solver="euler", quiet=True):
    """Solve from x0 (N, 1, 28, 28) to t = 1, in chunks to bound the memory: (N, 1, 28, 28)
    in [0, 1] on the CPU. quiet=False prints the speed."""
    t0, xs = time.time(), []
    for chunk in x0.split(256):
        with autocast(device, dtype):
            xs.append(to_unit(sample(model, chunk.to(device), steps, solver)).cpu())
    if not quiet:
        dt = time.time() - t0
        print(f"{len(x0)} images, {steps} {solver} steps ({steps * NFE_PER_STEP[solver]} network calls each): "
              f"{dt:.1f} s ({len(x0) / dt:.1f} img/s)")
    return torch.cat(xs)

def fixed_noise(n, seed):
    """n noise images (n, 1, 28, 28) that depend on the seed alone: mnist.py's pictures and
    --sample, and evaluate.py's sweeps, start from the same ones."""
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))

def to_unit(x):
    """[-1, 1] (what the model makes, clipped) -> [0, 1] (what an image file holds)."""
    return (x.float().clamp(-1, 1) + 1) / 2
