"""
Numbers for image quality: score generated digits with a small MNIST classifier.

    python evaluate.py out/mnist-cosine/samples.pt                       # FID, confidence, coverage
    python evaluate.py out/translate-linear/samples.pt --translation  # + which garment: which digit
    python evaluate.py real --n 1000     # 1000 real MNIST training images: the best to hope for
    python evaluate.py noise --n 1000    # 1000 images of uniform noise: far away
    python evaluate.py out/mnist-cosine --n 1000   # a run folder: quality against the number
                                   # of network evaluations, every solver on every time grid
                                   # (nfe.csv, nfe.png; with --raw: nfe-raw.*; with
                                   # --clip-x1, ClippedX1's field: nfe-clip.*, nfe-raw-clip.*)
    python evaluate.py out/mnist-cosine --curve    # quality against epochs (curve.csv, .png)
    python evaluate.py out/mnist-cosine --path     # how the flow moves along 100 Euler steps
    python evaluate.py out/mnist-cosine --bpd      # the model as a density: bits per dimension
                                   # of 100 random MNIST test digits (README, section 8)
    python evaluate.py weights/mnist-bpd --bpd --n 10000   # of all 10,000, as the papers
    python evaluate.py out/mnist-reflow --also out/mnist-cosine --nfe 1 2 4   # runs side by
                                   # side: each with --nfe's sampler, and how straight it is

Add --translation for translate.py's samples and runs. The figures come from a small
convolutional classifier trained on the MNIST training set, kept with its test accuracy and
the statistics of the MNIST test set in weights/classifier.pt: retrained, its weights (and
every FID) differ a little from one CPU to another (README, section 5), so the one every
number in the README comes from is kept. --classifier PATH of a file that does not exist
trains a new one there. Scoring a samples.pt, real or noise, the last line of the output
holds the figures as name=value pairs:
    n       the number of images scored
    fid     the Frechet distance between Gaussians fitted to the classifier's 128 features
            (the layer before the logits) of these images and of the 10,000 MNIST test
            images. 0 is perfect. This is the usual FID with a digit classifier in place of
            Inception; like FID it grows as n shrinks, so compare numbers at the same n.
    confidence   the classifier's mean top probability: does each image look like a digit?
    coverage     exp(entropy of the predicted digits) / 10: 1 when all ten digits are
                 equally frequent, 0.1 when only one is ever drawn
    accuracy     the classifier's accuracy on the MNIST test set (>= 0.98 expected)
"""
import argparse
import csv
import glob
import hashlib
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (GRIDS, GUIDANCE_SHAPE, SHAPES, SOLVERS, ClippedX1, MeanFlowUNet,
                    arc_straightness, atomic_save, atomic_write, bits_per_dim, blur, budget,
                    check_script, dequantize, die, evaluations_per_step, fixed_noise, generate,
                    generate_mean, get_schedule, guess_x1, load_checkpoint, load_images,
                    load_model, log_likelihood, nfe, non_negative_float, pick_device, pick_dtype,
                    plan, positive_int, rademacher, save_grid, steps_within, straightness,
                    time_grid, weighted_bits)

GARMENTS = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
            "Boot"]

parser = argparse.ArgumentParser(description="Score generated MNIST digits with a classifier.")
parser.error = die  # argparse's errors in one line, without its usage block
add = parser.add_argument
add("samples", help="a samples.pt of any script's --sample (N, 1, 28, 28) in "
    "[0, 1]; 'real' (MNIST training images) or 'noise' (uniform noise), for reference; or a run "
    "folder (OUT of one of them) to sweep the solvers and grids")
add("--n", type=positive_int, default=None,
    help="score the first N images (default: all of samples.pt; 100 with --bpd; 1000 otherwise)")
add("--translation", action="store_true", help="translate.py's samples.pt or run: image i comes "
    "from Fashion-MNIST test image i")
# run folder only (RUN_ONLY, but --device: a samples.pt is scored where it is): what to sample
add("--nfe", type=positive_int, nargs="+", default=[4, 6, 8, 10, 16, 20, 50, 100], help="run "
    "folder: the budgets of network evaluations to try (each solver takes as many steps as fit, "
    "at least one; with --also, each run the sampler of its script's --nfe K)")
add("--grids", nargs="+", choices=list(GRIDS), default=list(GRIDS),
    help="run folder: the time grids to try (default: all)")
add("--seeds", type=int, nargs="+", default=[0, 1], help="run folder: the sets of noise images to "
    "sample from (those of the --sample --seed S of mnist.py, reflow.py, meanflow.py)")
add("--guidance", type=non_negative_float, nargs="+", metavar="W", help="conditional run folder: "
    "quality against classifier-free guidance instead: 1000 class-balanced digits for each W and "
    "shape, with mnist.py --sample's sampler, FID against the share read as asked "
    "(guidance.csv, guidance.png)")
add("--guidance-shape", nargs="+", choices=SHAPES, default=None, metavar="SHAPE",
    help="with --guidance: the shapes of W(t) to try, ramp or constant (mnist.py --guidance-shape)"
    f" (default: {GUIDANCE_SHAPE})")
add("--raw", action="store_true", help="run folder: the trained weights, not their average "
    "(not with --curve: the epochs' files hold only the average)")
add("--path", action="store_true", help="run folder: how the flow moves instead: along 100 Euler "
    "steps, the pixels' scale, how fast the velocity changes, when the digit is decided, and "
    "how straight the flow is")
add("--curve", action="store_true", help="run folder: quality against epochs instead: score the "
    "weights of every epoch (epochNNN.pt) with the sampler of --nfe 10 (curve.csv, curve.png; "
    "with --translation also chi2 and the distances to the garments)")
add("--bpd", action="store_true", help="a run folder of digits: the model as a density instead: "
    "bits per dimension of N MNIST test images (--n, default 100) in a fixed random order "
    "(bpd_order; --n 10000: all), uniformly dequantised: the mean with its standard error, the "
    "median, the digits above 4, the figure at half the steps; each digit's in RUN/bpd.csv. "
    "Stopped, the same command goes on from RUN/bpd-part.pt (more than 100 images)")
add("--first", action="store_true", help="with --bpd: the first N test images instead, those "
    "section 8's settings were chosen on")
add("--digits", type=int, nargs="+", metavar="I", help="with --bpd: these test images instead "
    "(their indices, as bpd.csv gives them: to look again at the holes a run found)")
add("--clip-x1", action="store_true", help="with --bpd, or a run folder's sweep of solvers: the "
    "field with its guess of x1 held to the dequantised digits' range (common.ClippedX1; "
    "README, section 8; the sweep writes nfe-clip.csv)")
add("--draws", type=positive_int, default=1, metavar="K", help="with --bpd: K dequantisations of "
    "each digit, one probe, K times the time: the figures are their mean, and beside it the "
    "bound importance-weighted over them, log mean_k p (Burda et al. 2016; README, section 8), "
    "tighter with K (default: %(default)s)")
add("--steps", type=positive_int, default=100, help="with --bpd: midpoint steps from t = 1 back to "
    "t = 0 (default: %(default)s)")
add("--also", nargs="+", metavar="RUN", help="more runs in the same picture: with --curve, their "
    "FID against epochs; otherwise (runs of mnist.py, reflow.py, meanflow.py) their FID against "
    "--nfe, each sampled as its script's --sample --nfe K samples it, and how straight each flow "
    "is (compare.csv, compare.png, compare-samples.png)")
add("--device", default="auto", help="where to sample a run folder (auto, cpu, cuda, mps)")
add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="run folder: sample "
    "in this precision (auto: as for mnist.py; --path always samples in float32)")
# the classifier
add("--data", default="data", help="torchvision's data folder (as for mnist.py)")
add("--classifier", default="weights/classifier.pt", help="the classifier's file; trained and "
    "written there if it does not exist (default: %(default)s)")
add("--epochs", type=positive_int, default=2, help="the classifier's training epochs")
add("--seed", type=int, default=0, help="seeds the classifier's training, the 'noise' images "
    "and --bpd's dequantisation and probes")
RUN_ONLY = ("nfe", "grids", "seeds", "raw", "path", "curve", "also", "dtype", "guidance",
            "guidance_shape", "bpd", "steps", "first", "digits", "clip_x1", "draws")

class Classifier(nn.Module):
    """Two conv layers and two linear ones; features() is the 128-d layer FID compares."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),          # (B, 128)
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):  # x in [-1, 1], as everywhere in nanoFM
        return self.head(self.features(x))

@torch.no_grad()
def features_and_probs(model, x):
    """x (N, 1, 28, 28) in [-1, 1] -> features (N, 128) in float64, class probabilities (N, 10)."""
    feats, probs = [], []
    for chunk in x.split(1000):
        f = model.features(chunk)
        feats.append(f.double())
        probs.append(F.softmax(model.head(f), dim=1))
    return torch.cat(feats), torch.cat(probs)

def gaussian_stats(f):
    """Mean and covariance (unbiased) of features f (N, D)."""
    return f.mean(0), torch.cov(f.T)

def frechet_distance(mu1, s1, mu2, s2):
    """The Frechet (2-Wasserstein) distance between N(mu1, s1) and N(mu2, s2), squared:
        |mu1 - mu2|^2 + Tr(s1) + Tr(s2) - 2 Tr((s1 s2)^(1/2)).
    s1 s2 is not symmetric, but it has the eigenvalues of r s2 r with r = s1^(1/2), which
    is symmetric and positive semi-definite; Tr((s1 s2)^(1/2)) is the sum of their roots."""
    w, v = torch.linalg.eigh(s1)
    r = (v * w.clamp(min=0).sqrt()) @ v.T
    m = r @ s2 @ r
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = ((mu1 - mu2) ** 2).sum().item() + (s1.trace() + s2.trace() - 2 * tr_sqrt).item()
    return max(d, 0.0)  # rounding can take equal distributions a hair below 0

def coverage(pred):
    """exp(entropy of the histogram of predicted digits) / 10, in [0.1, 1]."""
    p = torch.bincount(pred, minlength=10).double() / len(pred)
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item()) / 10

def train_classifier(args):
    """Train the classifier on MNIST, measure it on the test set, cache it with the test
    set's feature statistics (the FID reference)."""
    torch.manual_seed(args.seed)
    x, y = load_images("MNIST", args.data, labels=True)
    x_test, y_test = load_images("MNIST", args.data, train=False, labels=True)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"classifier epoch {epoch + 1}/{args.epochs} | last loss {loss.item():.4f} | "
              f"{time.time() - t0:.0f} s")
    model.eval()
    feats, probs = features_and_probs(model, x_test)
    mu, sigma = gaussian_stats(feats)
    accuracy = (probs.argmax(1) == y_test).double().mean().item()
    cache = {"model": model.state_dict(), "accuracy": accuracy,
             "mu": mu, "sigma": sigma, "n_reference": len(x_test)}
    os.makedirs(os.path.dirname(args.classifier) or ".", exist_ok=True)
    atomic_save(cache, args.classifier)
    return cache

def load_classifier(args):
    """The cached classifier, or a new one trained now. Returns (model, cache)."""
    fresh = not os.path.exists(args.classifier)
    cache = train_classifier(args) if fresh else load_checkpoint(args.classifier)
    model = Classifier()
    try:
        model.load_state_dict(cache["model"])
        accuracy = cache["accuracy"]
    except (KeyError, IndexError, TypeError, RuntimeError):
        die(f"{args.classifier} is not an evaluate.py classifier; delete it to train a new one")
    print(f"classifier {args.classifier} ({'trained now' if fresh else 'cached'}): "
          f"MNIST test accuracy {100 * accuracy:.2f}%")
    return model.eval(), cache

def images_to_score(args):
    """The images to score, (N, 1, 28, 28) in [-1, 1]."""
    if args.samples == "real":  # digits the classifier's reference (the test set) does not contain
        return load_images("MNIST", args.data)[: args.n or 1000]
    if args.samples == "noise":
        g = torch.Generator().manual_seed(args.seed)
        return torch.rand(args.n or 1000, 1, 28, 28, generator=g) * 2 - 1
    if not os.path.exists(args.samples):
        die(f"no file or run folder {args.samples}")
    x = load_checkpoint(args.samples)
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1:] == (1, 28, 28)
            and x.is_floating_point()):
        die(f"{args.samples} does not hold images: expected a float tensor (N, 1, 28, 28), "
            f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.isfinite().all():
        die(f"{args.samples}: {(~x.isfinite()).sum().item()} values are not finite (NaN or "
            f"infinite); the model that drew them has diverged")
    if len(x) < 2 or x.min() < 0 or x.max() > 1:
        die(f"{args.samples}: expected at least 2 images with values in [0, 1] "
            f"(the scripts' --sample N writes them)")
    if args.n and args.n > len(x):
        die(f"--n {args.n}: {args.samples} holds only {len(x)} images")
    return x[: args.n].float() * 2 - 1

def labels_beside(args, n):
    """A conditional model's samples.pt has the labels it asked for beside it
    (samples-labels.pt, (N,)); the first n of them, or None."""
    if args.samples in ("real", "noise"):
        return None
    path = os.path.splitext(args.samples)[0] + "-labels.pt"
    if not os.path.exists(path):
        return None
    y = load_checkpoint(path)
    if not (isinstance(y, torch.Tensor) and y.dim() == 1 and len(y) >= n):
        die(f"{path} does not hold the labels of {args.samples}: expected (N,) with N >= {n}")
    return y[:n].long()

def garment_link(args, pred, x):
    """What a translation keeps of its garment: the table of the digit (columns, counts) each
    garment class becomes (rows), its chi2 against independence and the degrees of freedom,
    and the mean squared pixel difference of a translation x (N, 1, 28, 28) in [-1, 1] and
    its own garment, and another's (the previous garment's)."""
    garments, garment = load_images("FashionMNIST", args.data, train=False, labels=True)
    garments, garment = garments[: len(pred)], garment[: len(pred)]
    own = (x - garments).pow(2).mean().item()
    other = (x - garments.roll(1, dims=0)).pow(2).mean().item()
    table = torch.stack([torch.bincount(pred[garment == g], minlength=10) for g in range(10)])
    return (table, *independence_chi2(table), own, other)

def translation_table(args, pred, x):
    """Print garment_link's figures: the table in % of each row, chi2, the distances."""
    table, chi2, dof, own, other = garment_link(args, pred, x)
    print(f"distance from its own garment {own:.4f}, from another's {other:.4f} "
          f"(mean squared pixel difference)")
    digits = " ".join(f"{d:>4d}" for d in range(10))
    print(f"garment  -> digit (% of the row)   {digits}     n")
    for name, row in zip(GARMENTS, table):
        share = 100 * row.double() / max(row.sum().item(), 1)
        print(f"  {name:<31s}" + " ".join(f"{s:4.0f}" for s in share) + f" {row.sum().item():5d}")
    print(f"chi2 = {chi2:.1f} with {dof} degrees of freedom: "
          f"about {dof} +- {math.sqrt(2 * dof):.0f} "
          f"if the digit did not depend on the garment")
    return table, own

def independence_chi2(table):
    """Pearson's chi-squared statistic of a contingency table against independence of its
    rows and columns, and its degrees of freedom (empty rows and columns left out)."""
    t = table.double()
    t = t[t.sum(1) > 0][:, t.sum(0) > 0]
    expected = t.sum(1, keepdim=True) * t.sum(0, keepdim=True) / t.sum()
    return ((t - expected) ** 2 / expected).sum().item(), (t.shape[0] - 1) * (t.shape[1] - 1)

def score(classifier, cache, x):
    """The figures for images x (N, 1, 28, 28) in [-1, 1]."""
    feats, probs = features_and_probs(classifier, x)
    confidence, pred = probs.max(1)
    fid = frechet_distance(*gaussian_stats(feats), cache["mu"], cache["sigma"])
    return {"n": len(x), "fid": fid,
            "confidence": confidence.mean().item(), "coverage": coverage(pred), "pred": pred,
            "counts": torch.bincount(pred, minlength=10), "accuracy": cache["accuracy"]}

def asked(pred, labels):
    """The share of images the classifier reads as the digit asked for (labels (N,)), and
    per digit asked (10,), NaN for a digit never asked."""
    hit = (pred == labels).double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    per = torch.stack([hit[labels == d].mean() if (labels == d).any() else nan for d in range(10)])
    return hit.mean().item(), per

def line(r):
    return (f"n={r['n']} fid={r['fid']:.3f} confidence={r['confidence']:.4f} "
            f"coverage={r['coverage']:.4f}" + (f" asked={r['asked']:.4f}" if "asked" in r else ""))

def starting_points(args, n, seeds=None, sigma=0.0):
    """Where sampling starts, by noise set: with --translation the first n Fashion-MNIST test
    images (one set, None), plus sigma times the noise of seed 0 as translate.py --sample
    --seed 0 adds it for a run trained with --sigma; else the noise of mnist.py --sample n --seed S
    for each S of seeds (default --seeds), so the same samples."""
    if args.translation:
        return {None: blur(load_images("FashionMNIST", args.data, train=False)[:n], sigma)}
    return {seed: fixed_noise(n, seed) for seed in seeds or args.seeds}

def mean_over(rows, field, **where):
    """The mean of a field over the rows that match where: over the noise sets, as a rule."""
    values = [r[field] for r in rows if all(r[k] == v for k, v in where.items())]
    return sum(values) / len(values)

def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    return plt

def save_figure(fig, path):
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    pyplot().close(fig)

def write_csv(rows, path):
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

def sweep(args, model, config, device, classifier, cache):
    """Sample the run's model with every solver on every time grid of --grids at each number
    of network evaluations, from the same starting points (starting_points), and score each.
    Writes RUN/nfe.csv and RUN/nfe.png (nfe-raw.* with --raw, nfe-clip.* or nfe-raw-clip.* with
    --clip-x1)."""
    n, run = args.n or 1000, args.samples
    name = os.path.join(run, "nfe" + "-raw" * args.raw + "-clip" * args.clip_x1)
    dtype, schedule = pick_dtype(args.dtype, device), config.get("schedule", "cosine")
    rows = []
    for seed, x0 in starting_points(args, n, sigma=config.get("sigma", 0.0)).items():
        for grid in args.grids:
            for solver in SOLVERS:
                for k in args.nfe:
                    steps = steps_within(solver, k)
                    t0 = time.time()
                    ts = time_grid(grid, steps, schedule)
                    x = generate(model, x0, steps, device, dtype, solver, ts)
                    seconds = time.time() - t0
                    r = score(classifier, cache, x * 2 - 1)
                    rows.append({"seed": seed, "grid": grid, "solver": solver, "steps": steps,
                                 "nfe": nfe(solver, steps), "n": n, "fid": round(r["fid"], 3),
                                 "confidence": round(r["confidence"], 4),
                                 "coverage": round(r["coverage"], 4), "seconds": round(seconds, 1)})
                    print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    write_csv(rows, name + ".csv")
    plot_sweep(rows, name + ".png", f"{run}{' (raw weights)' * args.raw}"
               f"{', the guess of x1 clipped' * args.clip_x1}, n = {n}")
    print(f"wrote {name}.csv and {name}.png")
    return rows

def guidance_sweep(args, model, config, device, classifier, cache):
    """A conditional run's quality against the guidance W: for each shape of
    --guidance-shape, W of --guidance and noise set of --seeds, n digits asked for in turn
    (0, 1, ..., 9, 0, ...), drawn with mnist.py --sample's sampler (common.budget: GUIDED_NFE
    network evaluations per image with guidance's two counted, 20 without), scored for FID and the
    share read as asked. RUN/guidance.csv and guidance.png, a curve per shape."""
    if not config.get("conditional"):
        die(f"--guidance: {args.samples} is not a conditional run (mnist.py --conditional)")
    n, schedule, dtype, rows = args.n or 1000, config.get("schedule", "cosine"), \
        pick_dtype(args.dtype, device), []
    y, starts = torch.arange(n) % 10, starting_points(args, n, sigma=config.get("sigma", 0.0))
    shapes = args.guidance_shape or [GUIDANCE_SHAPE]
    for shape in shapes:
        for w in args.guidance:
            per = evaluations_per_step(w, shape)
            solver, steps, grid = plan(budget(None, per), schedule)
            ts = time_grid(grid, steps, schedule)
            for seed, x0 in starts.items():
                x = generate(model, x0, steps, device, dtype, solver, ts, y=y, w=w, shape=shape)
                r = score(classifier, cache, x * 2 - 1)
                rows.append({"shape": shape, "guidance": w, "seed": seed, "n": n,
                             "nfe": nfe(solver, steps) * per, "fid": round(r["fid"], 3),
                             "asked": round(asked(r["pred"], y)[0], 4),
                             "confidence": round(r["confidence"], 4),
                             "coverage": round(r["coverage"], 4)})
                print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    path = os.path.join(args.samples, "guidance")
    write_csv(rows, path + ".csv")
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    ws = list(dict.fromkeys(args.guidance))
    for shape in dict.fromkeys(shapes):
        xs = [100 * mean_over(rows, "asked", shape=shape, guidance=w) for w in ws]
        ys = [mean_over(rows, "fid", shape=shape, guidance=w) for w in ws]
        ax.plot(xs, ys, "o-", label=f"W(t) = {'1 + (W - 1) t' if shape == 'ramp' else 'W'}")
        for w, point in zip(ws, zip(xs, ys)):
            ax.annotate(f"{w:g}", point, fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("read as the digit asked (%)")
    ax.set_ylabel("FID (mean over the noise sets)")
    ax.set_yscale("log")  # from the best to far off
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"{args.samples}, n = {n}, labels: W", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path + ".png")
    print(f"wrote {path}.csv and {path}.png")
    return rows

@torch.no_grad()
def along_the_path(args, model, schedule, device, sigma=0.0):
    """Carry the starting points of --seeds' first set (with --translation: the garments,
    and a --sigma run's noise of seed 0)
    with 100 Euler steps in float32 and print, every tenth of the way and at 0.95 and 0.99:
    the root mean square of the pixels of x_t; how fast the velocity changes, |dv/dt| (the
    norm over an image's 784 pixels, averaged over the images); and "decided", the share of
    images whose x_1 as the model guesses it from x_t (guess_x1) the classifier reads as the
    digit the image ends as. At t = 1 there is nothing left to guess: that row has no "decided".
    Last, the flow's straightness along the same steps (common.straightness's S, from the
    velocities the loop takes anyway)."""
    classifier, _ = load_classifier(args)
    n, steps = args.n or 1000, 100
    ts = torch.linspace(0, 1, steps + 1, device=device)
    (x0,) = starting_points(args, n, args.seeds[:1], sigma).values()  # one set
    x0 = x0.to(device)
    x, v_prev, rows, energy = x0, None, [], 0.0
    for i in range(steps):
        v = model(x, ts[i].expand(n)).float()
        energy += v.pow(2).mean().item() / steps  # straightness: mean |v|^2 - |x_1 - x_0|^2
        guess = classifier(guess_x1(schedule, ts[i], x, v).clamp(-1, 1).cpu()).argmax(1)
        dv = (v - v_prev).flatten(1).norm(dim=1).mean().item() * steps if i else float("nan")
        rows.append({"t": round(ts[i].item(), 2), "rms": x.pow(2).mean().sqrt().item(),
                     "guess": guess, "dv/dt": dv})
        x, v_prev = x + (ts[i + 1] - ts[i]) * v, v
    final = classifier(x.clamp(-1, 1).cpu()).argmax(1)
    rows.append({"t": 1.0, "rms": x.pow(2).mean().sqrt().item(), "guess": None,
                 "dv/dt": float("nan")})
    print(f"{args.samples}, {n} images: t, rms of x_t, |dv/dt|, "
          f"x_1 guessed from x_t read as the final digit")
    rows = [rows[i] for i in [*range(0, 100, 10), 95, 99, 100]]
    for r in rows:
        guess = r.pop("guess")
        r["decided"] = None if guess is None else (guess == final).double().mean().item()
        decided = "" if guess is None else f" decided={100 * r['decided']:.0f}%"
        print(f"t={r['t']:.2f} rms={r['rms']:.2f} dv/dt={r['dv/dt']:.0f}{decided}")
    d2 = (x - x0).pow(2).mean().item()
    print(f"straightness {energy - d2:.4f} (Liu et al.: 0 for straight paths at constant speed; "
          f"per pixel, where |x_1 - x_0|^2 is {d2:.3f})")
    print(f"a cosine arc from each x_0 to its own x_1, no path crossing another: straightness "
          f"{arc_straightness(x0, x):.4f} (the cosine schedule's paths, not straight lines)")
    return rows

# --bpd's test digits: a fixed random order (seed 2026) of those after the first 100, then the
# first 100, on which the settings of README section 8 were chosen: --n N <= 9900 draws N digits
# disjoint from them, --n 10000 takes all, as the papers do
def bpd_order(n_test=10000, chosen_on=100, seed=2026):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([chosen_on + torch.randperm(n_test - chosen_on, generator=g),
                      torch.arange(chosen_on)])

BPD_CHUNK = 100  # digits integrated at once; a --bpd of more keeps its figures after each

def weights_digest(model):
    """A fingerprint of a model's weights: an unfinished --bpd goes on only with the same."""
    h = hashlib.sha256()
    for v in model.state_dict().values():
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

def bits(args, model, device):
    """--bpd: N MNIST test images (--n, 100) in bpd_order's order (--first: the first N;
    --digits: those named), each dequantised (common.dequantize) and given one Rademacher
    probe (--seed's, in that order; --draws K: K - 1 more dequantisations after these), their
    log-likelihood under the flow (common.log_likelihood, float32, TF32 off on GPUs; --steps
    midpoint steps and half as many; --clip-x1: of common.ClippedX1's field) in bits per
    dimension, averaged over the K draws. The mean, as the papers give it, with its standard
    error (the spread of the per-image figures over sqrt(N): the images', the dequantisations'
    and the probes' together), beside the median and the digits above 4 bits per dimension (a
    hole in the density drags the mean far more than the median). With K > 1 also the bound
    importance-weighted over the draws, log mean_k p_k (common.weighted_bits). Each image's
    figures go into RUN/bpd.csv. The last line begins with "bpd".

    The images go BPD_CHUNK at a time. With more than that, RUN/bpd-part.pt keeps the figures
    after each chunk, with what they depend on (the images, --seed, --steps, --draws,
    --clip-x1, the weights, the device's kind): the same command, stopped (Ctrl-C, a lost
    machine), goes on from there, to the very figures of a run without a stop; done, the file
    goes."""
    n, steps = len(args.digits) if args.digits else args.n or 100, args.steps
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(args.seed)
    x = load_images("MNIST", args.data, train=False)
    if n > len(x):
        die(f"--n {n}: MNIST has only {len(x)} test images")
    if args.digits and not all(0 <= i < len(x) for i in args.digits):
        die(f"--digits: MNIST's test images are 0 to {len(x) - 1}")
    index = torch.tensor(args.digits) if args.digits else \
        torch.arange(n) if args.first else bpd_order(len(x))[:n]
    x = x[index]
    draws = [dequantize(x, g)]
    probe = rademacher(x.shape, g)  # one probe for all draws: its error moves them alike
    draws += [dequantize(x, g) for _ in range(args.draws - 1)]
    d, t0, c = x[0].numel(), time.time(), BPD_CHUNK
    log_p = {k: torch.zeros(args.draws, n, dtype=torch.float64) for k in (steps // 2, steps)}
    # plumbing: the figures so far of the same command, stopped
    part, done, before = os.path.join(args.samples, "bpd-part.pt"), 0, 0.0
    key = n > c and {"digits": index.tolist(), "seed": args.seed, "steps": steps,
                     "draws": args.draws, "clip_x1": bool(args.clip_x1), "chunk": c,
                     "weights": weights_digest(model), "device": device.type}
    if key and os.path.exists(part):
        kept = load_checkpoint(part)
        if not isinstance(kept, dict) or kept.get("key") != key:
            die(f"{part} holds an unfinished --bpd of other images, settings, weights or "
                f"device: go on with its own command, or delete it")
        done, before = kept["done"], kept["seconds"]
        for k in log_p:
            log_p[k][:, :done] = kept["log_p"][k]
        print(f"going on from {part}: {done} of {n} images scored")
    try:
        for j in range(done, n, c):
            for k in log_p:  # half the steps, then all
                for i, xs in enumerate(draws):
                    log_p[k][i, j:j + c] = log_likelihood(model, xs[j:j + c].to(device), k,
                                                          probe[j:j + c].to(device)).cpu()
            scored = min(j + c, n)
            if scored < n:
                atomic_save({"key": key, "done": scored, "seconds": before + time.time() - t0,
                             "log_p": {k: v[:, :scored].clone() for k, v in log_p.items()}},
                            part)
            done = scored  # what the file holds
    except KeyboardInterrupt:
        if done == 0:
            raise
        print(f"{os.path.basename(sys.argv[0]) or 'evaluate.py'}: interrupted after {done} of "
              f"{n} images; {part} keeps them: the same command goes on from there",
              file=sys.stderr)
        raise SystemExit(130)
    out = {k: bits_per_dim(v, d).mean(0) for k, v in log_p.items()}
    b, seconds = out[steps], before + time.time() - t0
    weighted = weighted_bits(log_p[steps], d)
    write_csv([{"digit": i, "bpd": round(v, 4), "bpd_half_steps": round(h, 4),
                **({"bpd_weighted": round(w, 4)} if args.draws > 1 else {})}
               for i, v, h, w in zip(index.tolist(), b.tolist(), out[steps // 2].tolist(),
                                     weighted.tolist())],
              os.path.join(args.samples, "bpd.csv"))
    if n > c and os.path.exists(part):  # done: the figures are in bpd.csv
        os.remove(part)
    holes = index[b > 4].tolist()
    print(f"{n} images{f' x {args.draws} dequantisations' * (args.draws > 1)}, {seconds:.0f} s"
          f"{', the guess of x1 clipped' * args.clip_x1}; bits per "
          f"dimension: {out[steps // 2].mean():.4f} at {steps // 2} steps, {b.mean():.4f} at "
          f"{steps}; median {b.quantile(0.5):.4f}; "
          f"{len(holes)} above 4{f' (test digits {holes[:10]})' if holes else ''}; "
          f"each digit's in {os.path.join(args.samples, 'bpd.csv')}")
    if args.draws > 1:
        print(f"{args.draws} dequantisations of each digit: importance-weighted over them "
              f"{weighted.mean():.4f} +- {weighted.std() / math.sqrt(n):.4f} bits per dimension, "
              f"{(b - weighted).mean():.4f} +- {(b - weighted).std() / math.sqrt(n):.4f} below "
              f"their mean (at {steps} steps)")
    print(f"bpd {b.mean():.4f} +- {b.std() / math.sqrt(n):.4f} (standard error over the images, "
          f"dequantisations and probes; {steps} midpoint steps moved it by "
          f"{b.mean() - out[steps // 2].mean():+.4f} from {steps // 2})")
    return {"bpd": b.mean().item(), "se": (b.std() / math.sqrt(n)).item(),
            "half": out[steps // 2].mean().item(), "median": b.quantile(0.5).item(),
            "holes": holes, "digits": index.tolist(), "seconds": seconds,
            "weighted": weighted.mean().item()}

def read_scores(path):
    """The scores of an earlier curve.csv by the row's key (curve_key). A row that does not
    parse, and a last line without its newline (a file cut short), are left out: they are
    scored again."""
    try:
        with open(path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return {}
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    scored = {}
    try:
        for r in csv.DictReader(lines):
            try:
                scores = {k: float(r[k]) for k in CURVE_SCORES if r.get(k)}
                if {"fid", "confidence", "coverage"} <= scores.keys():
                    scored[curve_key(r)] = scores
            except (KeyError, TypeError, ValueError):
                continue
    except csv.Error:
        pass
    return scored

CURVE_SCORES = ("fid", "confidence", "coverage", "chi2", "own", "other")  # chi2 on: translations

def curve_key(row):
    """What decides a curve.csv row's scores, but for the weights and the classifier."""
    keys = ("epoch", "seed", "sampler", "n", "dtype")
    return tuple("" if row[k] is None else str(row[k]) for k in keys)

def curve(args, device):
    """Score the sampling weights of every epoch of a run (RUN/epochNNN.pt), each from the
    same starting points, with the cheap sampler that --nfe 10 takes: RUN/curve.csv, and
    curve.png with a line for RUN and one for each run of --also (translations: also chi2
    and the distances to the garments, garment_link, and a chi2 panel). Epochs already in a run's
    curve.csv with the same n, noise set, sampler and precision are read back, unless their
    weights or the classifier are newer than the file."""
    runs = [args.samples, *(args.also or [])]
    files = {run: sorted(glob.glob(os.path.join(run, "epoch[0-9][0-9][0-9].pt"))) for run in runs}
    for run in runs:
        if not files[run]:
            die(f"{run} holds no epochNNN.pt (the training scripts write one per epoch)")
        check_script(load_checkpoint(files[run][0]), files[run][0], SCRIPT[args.translation],
                     HINT[args.translation])  # before the classifier: a wrong run is told at once
    classifier, cache = load_classifier(args)
    n, dtype, curves = args.n or 1000, pick_dtype(args.dtype, device), {}
    starts = starting_points(args, n)  # the same every epoch
    for run in runs:
        rows = curves[run] = []
        path = os.path.join(run, "curve.csv")
        scored, since = {}, 0  # an earlier --curve's scores, and when they were written
        if os.path.exists(path):
            scored, since = read_scores(path), os.path.getmtime(path)
        for f in files[run]:
            model, config = load_model(f, device, False, SCRIPT[args.translation],
                                       HINT[args.translation])
            if config.get("conditional"):
                die(f"{f}: --curve does not score conditional runs yet; use --guidance W...")
            sampler, _, draw = sampler_of(model, config, 10, device, dtype)
            for seed in starts:
                row = {"epoch": int(os.path.basename(f)[5:8]), "seed": seed, "n": n,
                       "sampler": sampler, "dtype": "float32" if isinstance(model, MeanFlowUNet)
                       else str(dtype)[6:]}  # a mean flow samples in float32
                old = scored.get(curve_key(row))
                newer = max(os.path.getmtime(f), os.path.getmtime(args.classifier)) >= since
                if old and not newer and (not args.translation or "chi2" in old):
                    row.update(old)
                else:
                    x = draw(blur(starts[seed], config.get("sigma", 0.0))) * 2 - 1
                    r = score(classifier, cache, x)
                    row.update({"fid": round(r["fid"], 3), "confidence": round(r["confidence"], 4),
                                "coverage": round(r["coverage"], 4)})
                    if args.translation:  # what the translations keep of their garments
                        _, chi2, _, own, other = garment_link(args, r["pred"], x)
                        row.update({"chi2": round(chi2, 1), "own": round(own, 4),
                                    "other": round(other, 4)})
                rows.append(row)
                print(f"{run} " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        write_csv(rows, path)
    panels = ["fid", "chi2"] if args.translation else ["fid"]  # translations: FID and the link
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False)
    for ax, field in zip(axes[0], panels):
        for run, rows in curves.items():
            epochs = sorted({r["epoch"] for r in rows})
            ax.plot(epochs, [mean_over(rows, field, epoch=e) for e in epochs], "o-", ms=3,
                    label=run)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("FID (mean over the noise sets)" if field == "fid" else
                      "chi2 of garment class against digit")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax.set_title(f"n = {n}, the weights of each epoch", fontsize=10)
    fig.tight_layout()
    save_figure(fig, os.path.join(args.samples, "curve.png"))
    print(f"wrote curve.csv in {', '.join(runs)} and {os.path.join(args.samples, 'curve.png')}")
    return curves[args.samples]

def compare(args, device):
    """RUN and the runs of --also side by side: for each, how straight its flow is (straightness,
    100 Euler steps from the first noise set), and at each budget K of --nfe the FID of the
    sampler its script's --sample --nfe K takes for it (plan), on each noise set. RUN/compare.csv;
    compare.png, FID against network evaluations, a line per run; compare-samples.png, the
    first 8 images of the first noise set, a row for each run and budget."""
    runs, rows, pictures = [args.samples, *args.also], [], []
    models = {run: load_model(os.path.join(run, "ckpt.pt"), device, False, SCRIPT[False], "")
              for run in runs}
    for run, (model, config) in models.items():
        if config.get("conditional"):
            die(f"{run} is a conditional run: score it with --guidance W...")
    classifier, cache = load_classifier(args)
    n, dtype = args.n or 1000, pick_dtype(args.dtype, device)
    starts = starting_points(args, n)
    for run, (model, config) in models.items():
        field = (lambda x, t: model(x, t, t)) if isinstance(model, MeanFlowUNet) else model
        s = straightness(field, starts[args.seeds[0]].to(device))  # in float32
        for k in args.nfe:
            sampler, evaluations, draw = sampler_of(model, config, k, device, dtype)
            for seed, x0 in starts.items():
                x = draw(x0)
                if seed == args.seeds[0]:
                    pictures.append(x[:8])
                r = score(classifier, cache, x * 2 - 1)
                rows.append({"run": run, "straightness": round(s, 4), "nfe": evaluations,
                             "sampler": sampler, "seed": seed, "n": n,
                             "fid": round(r["fid"], 3), "confidence": round(r["confidence"], 4),
                             "coverage": round(r["coverage"], 4)})
                print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    path = os.path.join(args.samples, "compare")
    write_csv(rows, path + ".csv")
    fig, ax = pyplot().subplots(figsize=(5.5, 3.5))
    for run in runs:
        mine = [r for r in rows if r["run"] == run]
        ks = sorted({r["nfe"] for r in mine})
        ax.plot(ks, [mean_over(mine, "fid", nfe=k) for k in ks], "o-", ms=4,
                label=f"{run} (straightness {mine[0]['straightness']:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (--nfe)")
    ax.set_ylabel("FID (mean over the noise sets)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"n = {n}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path + ".png")
    save_grid(torch.cat(pictures), path + "-samples.png", nrow=8)
    print(f"wrote {path}.csv, {path}.png and {path}-samples.png (rows: "
          f"{', '.join(f'{run} at {k}' for run in runs for k in args.nfe)})")
    return rows

def sampler_of(model, config, k, device, dtype):
    """How its script's --sample --nfe K samples a run: the sampler's name, its network
    evaluations per image, and a function from starting points to images in [0, 1]. A mean
    flow (meanflow.py) jumps K times; a flow takes --nfe's solver, steps and grid (plan)."""
    if isinstance(model, MeanFlowUNet):
        return f"meanflow-{k}", k, lambda x0: generate_mean(model, x0, k, device)
    schedule = config.get("schedule", "cosine")
    solver, steps, grid = plan(k, schedule, reflowed=bool(config.get("teacher")))
    ts = time_grid(grid, steps, schedule)
    return (f"{solver}-{steps}-{grid}", nfe(solver, steps),
            lambda x0: generate(model, x0, steps, device, dtype, solver, ts))

def plot_sweep(rows, path, title):
    """FID and confidence against the network evaluations, a line per solver and grid (the mean
    over the noise sets)."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ["fid", "confidence"]):
        for grid, style in zip(GRIDS, ["o-", "s--", "^:"]):
            for solver, color in zip(SOLVERS, ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
                mine = [r for r in rows if r["solver"] == solver and r["grid"] == grid]
                ks = sorted({r["nfe"] for r in mine})
                ys = [mean_over(mine, key, nfe=k) for k in ks]
                ax.plot(ks, ys, style, color=color, label=f"{solver}, {grid} grid", ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per image")
        ax.set_ylabel({"fid": "FID (classifier features, lower is better)",
                       "confidence": "mean confidence"}[key])
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)

# the scripts that write the runs of each kind (noise to digits, translations), and what to say
# to someone who mixed them
SCRIPT = {False: ("mnist.py", "reflow.py", "meanflow.py"), True: ("translate.py",)}
HINT = {False: ": add --translation for translate.py's runs",
        True: ": --translation is for translate.py's runs"}

def main(argv=None):
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 2:  # FID fits a covariance: one image has none
        die(f"--n {args.n}: {'a standard error' if args.bpd else 'FID'} needs at least 2 images")
    if args.translation and args.samples in ("real", "noise"):
        die("--translation needs translate.py's samples.pt or run folder")
    if args.guidance_shape and not args.guidance:
        die("--guidance-shape is for the sweep over --guidance W...: add --guidance")
    sweep_only = [k for k in ("nfe", "grids") if getattr(args, k) != parser.get_default(k)]
    if args.guidance and sweep_only:  # the guidance sweep samples as mnist.py --sample does
        die(f"--{sweep_only[0]} is for the sweep over solvers; --guidance samples with "
            f"mnist.py --sample's sampler")
    if args.also and not args.curve:  # the comparison samples as each script's --sample does
        mine = [k for k in ("grids", "raw", "path", "guidance", "translation")
                if getattr(args, k) != parser.get_default(k)]
        if mine:
            die(f"--{mine[0]} is not for runs side by side (--also without --curve)")
    # --bpd and --clip-x1 are for one run folder of digits, not with another mode
    other_mode = args.translation or args.curve or args.also or args.path or args.guidance
    if args.bpd and other_mode:
        die("--bpd is for one run folder of digits alone (not with --translation, --curve, "
            "--also, --path or --guidance)")
    sampling = [k for k in ("nfe", "grids", "seeds", "dtype")
                if getattr(args, k) != parser.get_default(k)]
    if args.bpd and sampling:  # the density: float32, its own steps and --seed's probes
        die(f"--{sampling[0]} is for sampling; --bpd integrates in float32 with --steps midpoint "
            f"steps (--seed: its dequantisation and probes)")
    for k in ("steps", "draws"):
        if getattr(args, k) != parser.get_default(k) and not args.bpd:
            die(f"--{k} is for --bpd")
    for k in ("first", "digits"):
        if getattr(args, k) and not args.bpd:
            die(f"--{k} is for --bpd")
    if args.clip_x1 and other_mode:
        die("--clip-x1 is for --bpd or the sweep of one run folder of digits (not with "
            "--translation, --curve, --also, --path or --guidance)")
    if args.digits and (args.first or args.n):
        die(f"--{'first' if args.first else 'n'} and --digits: --digits names the test images")
    if args.digits and len(args.digits) < 2:
        die("--digits: a standard error needs at least 2 images")
    if args.steps < 2:
        die(f"--steps {args.steps}: --bpd compares the figure with half the steps; give at "
            "least 2")
    if args.raw and args.curve:
        die("--raw and --curve: the epochs' files (epochNNN.pt) hold only the moving average")
    if os.path.isdir(args.samples):
        device = pick_device(args.device)
        if args.curve:
            return curve(args, device)
        if args.also:
            return compare(args, device)
        ckpt = os.path.join(args.samples, "ckpt.pt")  # no run: told at once
        model, config = load_model(ckpt, device, args.raw, SCRIPT[args.translation],
                                   HINT[args.translation])
        if isinstance(model, MeanFlowUNet):
            die(f"{args.samples} is a mean flow (meanflow.py): score it with --also or --curve, "
                f"or its samples.pt")
        if args.guidance:
            return guidance_sweep(args, model, config, device, *load_classifier(args))
        if args.clip_x1:  # the field whose guess of x1 stays in the digits' range
            model = ClippedX1(model, get_schedule(config.get("schedule", "cosine")))
        if args.bpd:
            if config.get("conditional"):
                die(f"--bpd: {args.samples} is a conditional run; --bpd measures an "
                    f"unconditional model's density")
            return bits(args, model, device)
        if config.get("conditional"):
            die(f"{args.samples} is a conditional run: score it with --guidance W..., or draw "
                f"with its script's --sample and score samples.pt (its labels are beside it)")
        if args.path:
            return along_the_path(args, model, get_schedule(config.get("schedule", "cosine")),
                                  device, config.get("sigma", 0.0))
        return sweep(args, model, config, device, *load_classifier(args))
    given = [k for k in RUN_ONLY if getattr(args, k) != parser.get_default(k)]
    if given:
        die(f"--{given[0].replace('_', '-')} is for a run folder; {args.samples} is not one")
    x = images_to_score(args)  # before the classifier: a wrong path is told at once
    labels = labels_beside(args, len(x))
    r = score(*load_classifier(args), x)
    print("predicted digits  " + " ".join(f"{d}:{c}" for d, c in enumerate(r["counts"].tolist())))
    if labels is not None:  # a conditional model's samples: were they the digits asked for?
        r["asked"], per = asked(r["pred"], labels)
        print("read as the digit asked, per digit (%)  " +
              " ".join(f"{d}:{100 * p:.1f}" for d, p in enumerate(per.tolist())))
    if args.translation:
        r["table"], r["distance"] = translation_table(args, r["pred"], x)
    print(f"{line(r)} accuracy={r['accuracy']:.4f}")
    return r

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, exit status 130 (files: common.atomic_write)
        print(f"{os.path.basename(__file__)}: interrupted", file=sys.stderr)
        raise SystemExit(130)
