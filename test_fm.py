"""
Tests of nanoFM, in the order the README teaches: the handout's maths against closed forms,
each script end to end on small settings (MNIST-shaped data is written by the tests as IDX
files), each chapter, then the plumbing. Run:
    python -m pytest
"""
import argparse
import contextlib
import csv
import io
import math
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
from common import MLP, UNet, cosine, euler, fm_loss, get_schedule, linear

HERE = os.path.dirname(os.path.abspath(__file__))

class Killed(BaseException):
    """Raised in a test to stop a run dead, as a kill would (no handler catches it)."""

SCHEDULES = [linear, cosine]

# =============================================================================
# the handout's maths, against closed forms
# =============================================================================

# -----------------------------------------------------------------------------
# schedules (Eq. 5, questions 1 to 4)

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_border_conditions(schedule):
    alpha, beta, _, _ = schedule(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert alpha.tolist() == pytest.approx([1, 0], abs=1e-12)  # alpha_0 = 1, alpha_1 = 0
    assert beta.tolist() == pytest.approx([0, 1], abs=1e-12)   # beta_0 = 0,  beta_1 = 1

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_derivatives_match_finite_differences(schedule):
    t, h = torch.linspace(0.01, 0.99, 50, dtype=torch.float64), 1e-6
    _, _, dalpha, dbeta = schedule(t)
    (ap, bp, _, _), (am, bm, _, _) = schedule(t + h), schedule(t - h)
    torch.testing.assert_close(dalpha, (ap - am) / (2 * h), rtol=0, atol=1e-8)
    torch.testing.assert_close(dbeta, (bp - bm) / (2 * h), rtol=0, atol=1e-8)

def test_cosine_constants_are_the_smallest():
    # question 1: alpha_t = cos(a t), beta_t = sin(b t) with a = b = pi/2, at every t
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha, beta, _, _ = cosine(t)
    torch.testing.assert_close(alpha, torch.cos(math.pi / 2 * t), rtol=0, atol=1e-12)
    torch.testing.assert_close(beta, torch.sin(math.pi / 2 * t), rtol=0, atol=1e-12)
    # and no smaller a or b meets the border conditions alpha_1 = 0, beta_1 = 1
    smaller = torch.linspace(0.01, math.pi / 2 - 0.01, 200, dtype=torch.float64)
    assert (torch.cos(smaller) > 0).all() and (torch.sin(smaller) < 1).all()

def test_cosine_is_variance_preserving_and_linear_is_not():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    a, b, _, _ = cosine(t)
    torch.testing.assert_close(a ** 2 + b ** 2, torch.ones_like(t))  # Var X_t = 1 for all t
    a, b, _, _ = linear(t)
    torch.testing.assert_close(a ** 2 + b ** 2, (1 - t) ** 2 + t ** 2)  # question 3
    assert (a ** 2 + b ** 2)[50].item() == 0.5                            # 1/4 + 1/4 at t = 1/2

def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError,
                       match="unknown schedule 'sigmoid'; known schedules: linear, cosine"):
        get_schedule("sigmoid")

# -----------------------------------------------------------------------------
# the loss (Eq. 4, 6) and the moving average of the weights

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_loss_is_zero_for_the_exact_velocity(schedule):
    # from one point x0 to one point x1 the velocity is known: dalpha_t x0 + dbeta_t x1. The
    # field below is exact only at x = x_t = alpha_t x0 + beta_t x1 (it adds 7 (x - x_t)), so a
    # loss of 0 also checks that the model is fed the point of Eq. 5 at its own t.
    x0 = torch.tensor([[0.3, -1.2]], dtype=torch.float64).repeat(64, 1)
    x1 = torch.tensor([[2.0, 0.5]], dtype=torch.float64).repeat(64, 1)
    def exact(x, t):
        a, b, da, db = schedule(t[:, None])
        return da * x0 + db * x1 + 7 * (x - (a * x0 + b * x1))
    assert fm_loss(exact, x0, x1, schedule).item() == pytest.approx(0, abs=1e-24)
    # fed the wrong point (x0 instead of x_t) the same field gives a loss far from 0
    wrong = lambda model: (lambda x, t: model(x0, t))
    assert fm_loss(wrong(exact), x0, x1, schedule).item() > 0.1
    # off by (0.1, -0.2) everywhere: the mean squared error is (0.01 + 0.04) / 2
    off = lambda x, t: exact(x, t) + torch.tensor([0.1, -0.2], dtype=torch.float64)
    assert fm_loss(off, x0, x1, schedule).item() == pytest.approx(0.025)
    # the times given are the ones the model sees; without them, t ~ U(0, 1) of the same draws
    t, seen = torch.rand(64, dtype=torch.float64), []
    assert fm_loss(lambda x, s: seen.append(s) or exact(x, s), x0, x1, schedule, t).item() == \
        pytest.approx(0, abs=1e-24)
    assert seen[0] is t
    torch.manual_seed(3)
    fm_loss(lambda x, s: seen.append(s) or exact(x, s), x0, x1, schedule)
    torch.manual_seed(3)
    assert torch.equal(seen[1], torch.rand(64, dtype=torch.float64))

def test_update_ema_is_the_weighted_mean():
    torch.manual_seed(0)
    ema, model = MLP(n_hidden=8), MLP(n_hidden=8)
    before = [p.clone() for p in ema.parameters()]
    common.update_ema(ema, model, 0.75)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * p)

# -----------------------------------------------------------------------------
# Euler's sampler (Eq. 7)

@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_is_exact_on_a_constant_field(steps):
    c = torch.tensor([0.5, -2.0], dtype=torch.float64)
    x0 = torch.randn(5, 2, dtype=torch.float64)
    traj = euler(lambda x, t: c.expand_as(x), x0, steps, trajectory=True)
    assert traj.shape == (steps + 1, 5, 2)
    for i in range(steps + 1):
        torch.testing.assert_close(traj[i], x0 + c * i / steps)
    torch.testing.assert_close(euler(lambda x, t: c.expand_as(x), x0, steps), x0 + c)

@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_euler_reaches_a_single_target_exactly(steps):
    # linear schedule, mu_1 = one point x1: the exact field is (x1 - x) / (1 - t). Each Euler
    # step shrinks x1 - x by (1 - t_{i+1}) / (1 - t_i), so the last step lands on x1.
    # (The handout's Eq. 7 sums to N-1 and would stop one step short.)
    x1 = torch.tensor([1.5, -0.5], dtype=torch.float64)
    x0 = torch.randn(8, 2, dtype=torch.float64)
    field = lambda x, t: (x1 - x) / (1 - t[:, None])
    torch.testing.assert_close(euler(field, x0, steps), x1.expand(8, 2), rtol=0, atol=1e-12)

def test_euler_time_is_a_batch_vector_from_0_to_1():
    seen = []
    euler(lambda x, t: seen.append(t.clone()) or torch.zeros_like(x), torch.zeros(3, 2), 4)
    assert [s.tolist() for s in seen] == [[i / 4] * 3 for i in range(4)]

@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_euler_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="positive integer"):
        euler(lambda x, t: x, torch.zeros(2, 2), steps)

def test_euler_on_the_exact_gaussian_field_has_the_predicted_discretisation_error():
    # N(0, 1) -> N(1, 1), linear schedule, independent X_0, X_1: the exact velocity field is
    # v_t(x) = 1 + a_t (x - t) with a_t = (2t - 1) / ((1 - t)^2 + t^2) (README, question 6).
    # Euler keeps the mean exact and scales a deviation by (1 + h a_{t_i}) each step, so the
    # variance it reaches is prod_i (1 + h a_{t_i})^2 instead of 1.
    a = lambda t: (2 * t - 1) / ((1 - t) ** 2 + t ** 2)
    field = lambda x, t: 1 + a(t)[:, None] * (x - t[:, None])
    for steps in [2, 5, 10, 100]:
        x = euler(field, torch.tensor([[0.0], [1.0]], dtype=torch.float64), steps)
        predicted = math.prod((1 + a(i / steps) / steps) ** 2 for i in range(steps))
        assert x[0].item() == pytest.approx(1.0, abs=1e-12)                       # the mean: exact
        assert ((x[1] - x[0]) ** 2).item() == pytest.approx(predicted, rel=1e-12)  # the variance
    assert predicted == pytest.approx(0.9746, abs=1e-4)  # 100 steps: the number in the README

# -----------------------------------------------------------------------------
# the networks: the MLP of section 2, the U-Net of section 3

def test_mlp_shapes_and_negative_outputs():
    torch.manual_seed(0)
    model = MLP(d=2, n_hidden=32)
    assert [m.in_features for m in model.net if isinstance(m, torch.nn.Linear)] == [3, 32, 32, 32]
    x, t = torch.randn(1000, 2), torch.rand(1000)
    out = model(x, t)
    assert out.shape == (1000, 2)
    # the handout's final ReLU would make both of these impossible: velocities need both signs
    assert (out < 0).any()
    with torch.no_grad():
        model.net[-1].weight.neg_(), model.net[-1].bias.neg_()
    torch.testing.assert_close(model(x, t), -out)  # the output layer is affine, no ReLU

def test_unet_layers_and_parameter_count():
    model = UNet()
    conv = lambda cin, cout, k: cin * cout * k * k + cout
    double = lambda cin, cout: conv(cin, cout, 3) + conv(cout, cout, 3)
    expected = (double(2, 32) + double(32, 64) + double(64, 64)   # encoder and bottleneck
                + conv(64, 64, 2) + double(64, 32)                # up to 14x14
                + conv(32, 32, 2) + double(32, 32)                # up to 28x28
                + conv(32, 1, 1))                                 # 1x1 output
    assert sum(p.numel() for p in model.parameters()) == expected == 205_953
    shapes = {}
    for name in ["enc1", "enc2", "mid", "up2", "dec2", "up1", "dec1", "out"]:
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    model(torch.randn(3, 1, 28, 28), torch.rand(3))
    assert shapes == {"enc1": (32, 28, 28), "enc2": (64, 14, 14), "mid": (64, 7, 7),
                      "up2": (64, 14, 14), "dec2": (32, 14, 14), "up1": (32, 28, 28),
                      "dec1": (32, 28, 28), "out": (1, 28, 28)}
    assert model.enc1.net[0].in_channels == 2  # the image and the time map

def test_unet_forward_matches_the_handouts_network_written_out():
    # the same weights through a plain functional version of the handout's U-Net: the image
    # and the time map t in, two max-pools, additive skips, a 1x1 convolution out. Dropping a
    # skip, or feeding anything but t as the second channel, changes the output.
    torch.manual_seed(0)
    model = UNet().double()
    x, t = (torch.randn(3, 1, 28, 28, dtype=torch.float64),
            torch.tensor([0.0, 0.3, 0.9], dtype=torch.float64))
    def double(block, h):
        c1, c2 = block.net[0], block.net[2]
        h = F.relu(F.conv2d(h, c1.weight, c1.bias, padding=1))
        return F.relu(F.conv2d(h, c2.weight, c2.bias, padding=1))
    up = lambda m, h: F.conv_transpose2d(h, m.weight, m.bias, stride=2)
    tmap = t.view(3, 1, 1, 1) * torch.ones(3, 1, 28, 28, dtype=torch.float64)
    e1 = double(model.enc1, torch.cat([x, tmap], 1))
    e2 = double(model.enc2, F.max_pool2d(e1, 2))
    m = double(model.mid, F.max_pool2d(e2, 2))
    d2 = double(model.dec2, up(model.up2, m) + e2)
    d1 = double(model.dec1, up(model.up1, d2) + e1)
    expected = F.conv2d(d1, model.out.weight, model.out.bias)
    torch.testing.assert_close(model(x, t), expected, rtol=0, atol=1e-12)
    # and the time matters: the same images at other times give other velocities
    assert not torch.allclose(model(x, t), model(x, t.flip(0)))

def test_the_unconditional_unet_is_the_handouts_layer_for_layer():
    # without --conditional nothing of the label is there: the same tensors as ever, in the
    # same order (so the same initial weights for a seed), and the handout's forward pass
    torch.manual_seed(0)
    model = UNet()
    blocks = ["enc1", "enc2", "mid", "up2", "dec2", "up1", "dec1", "out"]
    assert [k.split(".")[0] for k in model.state_dict()] == \
        [b for b in blocks for _ in range(2 if b in ("up2", "up1", "out") else 4)]
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    e1 = model.enc1(torch.cat([x, t.view(3, 1, 1, 1).expand(3, 1, 28, 28)], 1))
    e2 = model.enc2(F.max_pool2d(e1, 2))
    d2 = model.dec2(model.up2(model.mid(F.max_pool2d(e2, 2))) + e2)
    assert torch.equal(model(x, t), model.out(model.dec1(model.up1(d2) + e1)))

# -----------------------------------------------------------------------------
# the README's code is this code

def readme_snippets():
    """The python blocks of the README's section 0, as written there."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    section = text[text.index("## 0. "):text.index("## 1. ")]
    return re.findall(r"```python\n(.*?)```", section, re.S)

@pytest.mark.parametrize("shape", [(64, 2), (8, 1, 28, 28)])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_readme_snippets_are_fm_loss_and_euler(shape, schedule):
    loss_block, euler_block = readme_snippets()
    torch.manual_seed(0)
    model = MLP() if len(shape) == 2 else UNet()
    x0, x1 = torch.randn(shape), torch.randn(shape)
    names = {"torch": torch, "model": model, "x0": x0, "x1": x1, "schedule": schedule, "steps": 5}
    torch.manual_seed(1)
    exec(loss_block, names)  # as written in the README
    torch.manual_seed(1)
    assert names["loss"].item() == fm_loss(model, x0, x1, schedule).item()
    with torch.no_grad():
        exec(euler_block, names)
    torch.testing.assert_close(names["x"], euler(model, x0, 5), rtol=0, atol=0)

# =============================================================================
# each script end to end, on small data
# =============================================================================

# -----------------------------------------------------------------------------
# the 2D scripts: moons.py, gaussian.py

def moon_distance(points, n=4000):
    """Distance of each point to the nearest point of the noise-free moons (centred as in
    moons.py)."""
    theta = torch.linspace(0, math.pi, n // 2)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    curve = torch.cat([upper, lower]) - torch.tensor([0.5, 0.25])
    return torch.cdist(points, curve).min(dim=1).values

def test_moons_training_learns_the_moons(tmp_path):
    import moons
    out = moons.main(["--iters", "1500", "--n-samples", "1000", "--steps", "50", "--gif", "0",
                      "--out", str(tmp_path)])
    losses = out["losses"]
    # the loss has a floor near 1 (the spread of X_1 - X_0 given X_t), far below the start
    assert sum(losses[-100:]) / 100 < 0.8 * sum(losses[:20]) / 20
    assert moon_distance(out["samples"]).median() < 0.1               # the moons' own noise is 0.05
    assert moon_distance(torch.randn(1000, 2)).median() > 0.3         # the source is far from them
    assert (tmp_path / "moons.png").stat().st_size > 10_000
    # the learned density integrates to 1 over the grid, and is high on the moons, low off them
    assert out["mass"] == pytest.approx(1, abs=0.03)
    g = torch.linspace(-2.5, 2.5, 100)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), dim=-1).reshape(-1, 2)
    on = moon_distance(grid) < 0.05
    assert out["log_p"].flatten()[on].mean() > out["log_p"].flatten()[~on].mean() + 3
    assert (tmp_path / "density.png").stat().st_size > 10_000

def test_gaussian_variance_follows_the_theory_along_the_flow(tmp_path):
    import gaussian
    results = gaussian.main(["--iters", "300", "--steps", "10", "--n-samples", "2000",
                             "--out", str(tmp_path)])
    for name in ["linear", "cosine"]:  # the generated points reach the target's mean (1, 1)
        assert results[name]["mean"].tolist() == pytest.approx([1, 1], abs=0.15)
    with open(tmp_path / "variance.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["schedule", "t", "var_measured", "var_theory"]
    assert [r[0] for r in rows[1:]] == ["linear"] * 11 + ["cosine"] * 11
    for name, block in [("linear", rows[1:12]), ("cosine", rows[12:])]:
        t = [float(r[1]) for r in block]
        assert t == pytest.approx([i / 10 for i in range(11)])
        theory = [float(r[3]) for r in block]
        assert theory == pytest.approx([(1 - s) ** 2 + s ** 2 if name == "linear" else 1
                                        for s in t], abs=1e-5)
    # the flow itself: linear dips towards 1/2 in the middle (its Euler value with 10 steps
    # on the exact field is 0.44), cosine stays near 1 all the way
    linear_var, cosine_var = [float(r[2]) for r in rows[1:12]], [float(r[2]) for r in rows[12:]]
    assert linear_var[5] == pytest.approx(0.44, abs=0.08) and max(linear_var[4:7]) < 0.6
    assert all(v == pytest.approx(1, abs=0.12) for v in cosine_var)
    # at t = 1 linear ends below 1 (Euler on the exact field, 10 steps: 0.7726), cosine at 1
    assert (linear_var[-1] == pytest.approx(0.77, abs=0.08)
            and cosine_var[-1] == pytest.approx(1, abs=0.12))
    assert (tmp_path / "variance.png").exists()
    # the learned flow as a density: the held-out points' mean log-density near the exact one
    # (-(1 + ln 2 pi) = -2.838 in expectation); learned - exact estimates -KL(p || q) <= 0.
    # (Here int div v dt = 2 log(1 / 1) = 0 along every path: the closed-form tests above,
    # and the moons' density, check that term.)
    for name in ["linear", "cosine"]:
        r = results[name]
        assert r["exact_log_p"] == pytest.approx(-1 - math.log(2 * math.pi), abs=0.03)
        assert r["log_p"] == pytest.approx(r["exact_log_p"], abs=0.05)

# -----------------------------------------------------------------------------
# mnist.py, on small IDX files written here (torchvision reads them as the real ones)

def write_idx(root, name, n_train=48, n_test=16, seed=0, classes=False):
    """root/name/raw/ with the four IDX files: random dots, labels 0..9. With classes=True
    each label also has its own bright bar, so that a classifier can learn them."""
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = (torch.rand(n, 28, 28, generator=g) > 0.8).to(torch.uint8) * 255
        labels = torch.arange(n, dtype=torch.uint8) % 10
        if classes:
            for i, k in enumerate(labels.tolist()):
                r, c = 3 + 12 * (k // 5), 1 + 5 * (k % 5)
                images[i, r:r + 8, c:c + 5] = 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, n, 28, 28)
                                                          + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n)
                                                          + labels.numpy().tobytes())
    return root

@pytest.fixture
def mnist_data(tmp_path):
    return write_idx(tmp_path / "data", "MNIST")

def run_mnist(data, out, *extra):
    import mnist
    return mnist.main(["--data", str(data), "--out", str(out), "--batch-size", "16",
                       "--nfe", "3", "--device", "cpu", *extra])

def expect_error(message, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert message in str(e.value.code) and "\n" not in str(e.value.code), e.value.code

def test_load_images_reads_idx_files_into_minus_one_one(mnist_data):
    x = common.load_images("MNIST", str(mnist_data))
    assert x.shape == (48, 1, 28, 28) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {-1.0, 1.0}  # 0 -> -1, 255 -> 1

def test_mnist_trains_writes_grid_and_checkpoint_then_samples(mnist_data, tmp_path, capsys):
    out = tmp_path / "out"
    run_mnist(mnist_data, out, "--epochs", "1", "--schedule", "linear")
    log = capsys.readouterr().out
    line = [l for l in log.splitlines() if l.startswith("epoch")][0]
    assert "epoch   1/1 | loss " in line and " img/s | " in line
    assert math.isfinite(float(line.split("loss ")[1].split()[0]))
    assert (out / "epoch001.png").exists()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["schedule"] == "linear"
    assert not list(out.glob("*.tmp*"))
    # the moving average of the weights, next to them
    assert ckpt["ema"].keys() == ckpt["model"].keys()
    assert not torch.equal(ckpt["ema"]["out.bias"], ckpt["model"]["out.bias"])

    run_mnist(mnist_data, out, "--sample", "10")
    x = torch.load(out / "samples.pt", weights_only=True)
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert (out / "samples.png").exists()

def test_mnist_resumed_after_a_kill_ends_with_the_same_weights(mnist_data, tmp_path, monkeypatch):
    import mnist
    extra = ["--t-dist", "logit-normal", "--lr", "2e-3", "--warmup", "5", "--clip", "1.0",
             "--t-mean", "0.3"]
    run_mnist(mnist_data, tmp_path / "a", "--epochs", "3", *extra)  # never interrupted
    # the same run, killed in the middle of epoch 2 (48 images / 16 = 3 steps an epoch)
    calls = {"n": 0}
    def dying_loss(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed  # as if the process were killed: nothing after this line runs
        return fm_loss(*a, **kw)
    monkeypatch.setattr(mnist, "fm_loss", dying_loss)
    with pytest.raises(Killed):
        run_mnist(mnist_data, tmp_path / "b", "--epochs", "3", *extra)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(mnist, "fm_loss", fm_loss)
    run_mnist(mnist_data, tmp_path / "b", "--epochs", "3", "--resume")
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k

def test_warmup_clip_and_the_mean_of_t_follow_their_definitions(mnist_data, tmp_path, monkeypatch):
    import mnist
    # warm-up: the learning rate of step n (from 1) is lr * n / warmup, then lr
    seen, norms, ts = [], [], []
    real_step = torch.optim.Adam.step
    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        norms.append(
            torch.cat([p.grad.flatten() for p in self.param_groups[0]["params"]]).norm().item())
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    real_draw = common.draw_t
    monkeypatch.setattr(mnist, "draw_t", lambda n, d, mean, device:
                        ts.append(mean) or real_draw(n, d, mean, device))
    run_mnist(mnist_data, tmp_path / "a", "--epochs", "2", "--warmup", "4", "--lr", "0.01",
              "--clip", "0.05", "--t-mean", "0.5")
    assert seen == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert set(ts) == {0.5}
    clipped, norms[:] = norms[:], []
    # the same first step without --clip: its gradient is longer than 0.05, and the clipped
    # run's Adam saw it scaled to exactly 0.05; no step saw more
    run_mnist(mnist_data, tmp_path / "b", "--epochs", "1", "--warmup", "4", "--lr", "0.01",
              "--t-mean", "0.5")
    assert norms[0] > 0.1 and clipped[0] == pytest.approx(0.05, rel=1e-4)
    assert max(clipped) <= 0.05 * (1 + 1e-4)
    # t ~ sigmoid(N(m, 1)): P(t > 1/2) = Phi(m)
    torch.manual_seed(0)
    t = common.draw_t(200_000, "logit-normal", 0.5)
    assert (t > 0.5).double().mean().item() == pytest.approx(0.6915, abs=0.003)

def test_learning_rate_warms_up_holds_then_cools_down_linearly():
    # 2 epochs of 4 steps, warmed up over 2 steps, the last epoch cooled down: steps 1 to 8
    rate = [common.learning_rate(n, 0.1, 2, 1, 2, 4) for n in range(8)]
    assert rate == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1, 0.075, 0.05, 0.025])
    assert [common.learning_rate(n, 0.1, None, None, 2, 4) for n in range(8)] == [0.1] * 8

@pytest.mark.parametrize("script", ["mnist", "translate"])
def test_a_run_cooled_down_on_resume_is_the_run_cooled_down_from_the_start(both_data, tmp_path,
                                                                           monkeypatch, script):
    run = {"mnist": run_mnist, "translate": run_translate}[script]
    seen = []
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: seen.append(
        self.param_groups[0]["lr"]) or real_step(self, *a, **k))
    # 3 steps an epoch (48 digits, or 40 garments, in batches of 16), the last 2 epochs cooled
    run(both_data, tmp_path / "a", "--epochs", "3", "--cooldown", "2", "--lr", "0.01")
    assert seen == pytest.approx([0.01] * 4 + [0.01 * k / 6 for k in (5, 4, 3, 2, 1)])
    fresh, seen[:] = seen[:], []
    run(both_data, tmp_path / "b", "--epochs", "1", "--lr", "0.01")  # no cooldown asked
    run(both_data, tmp_path / "b", "--epochs", "3", "--cooldown", "2", "--resume")
    assert seen == fresh
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert b["config"]["cooldown"] == 2 and b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    # what would have trained its epochs done at another rate is one line
    expect_error("ended with its cooldown (the last 2 of 3 epochs)", run, both_data,
                 tmp_path / "a", "--epochs", "4", "--resume")
    check = lambda saved, epochs, cooldown, done: common.check_cooldown(
        saved, argparse.Namespace(epochs=epochs, cooldown=cooldown), done, "c")
    expect_error("c is in its cooldown (the last 2 of 2 epochs): resume it with --epochs 2 "
                 "--cooldown 2", check, {"epochs": 2, "cooldown": 2}, 3, 2, 1)
    expect_error("a cooldown of 4 epochs is longer than the run's 3", check, {}, 3, 4, 0)
    # what goes on as it began: in its cooldown with its own settings; before it, longer
    assert check({"epochs": 3, "cooldown": 2}, 3, 2, 2) is None
    assert check({"epochs": 10, "cooldown": 2}, 12, 2, 5) is None
    run(both_data, tmp_path / "d", "--epochs", "2")
    expect_error(f"a cooldown of 2 epochs in 3 would have begun after epoch 1, and "
                 f"{tmp_path / 'd' / 'ckpt.pt'} holds 2 epochs without it: ask for --epochs 4 or "
                 f"more", run, both_data, tmp_path / "d", "--epochs", "3", "--cooldown", "2",
                 "--resume")
    expect_error("--cooldown 3 is longer than the run's --epochs 2", run, both_data,
                 tmp_path / "e", "--epochs", "2", "--cooldown", "3")
    assert not (tmp_path / "e").exists()

def test_reflow_and_meanflow_cool_down_as_mnist_py_does(mnist_data, tmp_path, monkeypatch):
    seen = []
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: seen.append(
        self.param_groups[0]["lr"]) or real_step(self, *a, **k))
    run_meanflow(mnist_data, tmp_path / "mf", "--epochs", "2", "--cooldown", "1", "--lr", "0.01")
    assert seen == pytest.approx([0.01] * 4 + [0.01 * 2 / 3, 0.01 / 3])  # 3 steps an epoch
    run_mnist(mnist_data, tmp_path / "teacher", "--epochs", "1")
    seen[:] = []
    run_reflow(tmp_path / "student", "--teacher", str(tmp_path / "teacher"), "--pairs", "32",
               "--epochs", "2", "--cooldown", "1", "--lr", "0.01")
    assert seen == pytest.approx([0.01] * 3 + [0.005])  # 2 steps an epoch

def test_ema_in_training_follows_its_warm_up_and_sampling_uses_it(mnist_data, tmp_path,
                                                                  monkeypatch):
    # record the weights after each of the 3 optimiser steps; the EMA starts from the initial ones
    import mnist
    snapshots = []
    real_update = common.update_ema
    def spy(ema, model, decay):
        snapshots.append((decay, [p.detach().clone() for p in model.parameters()]))
        real_update(ema, model, decay)
    monkeypatch.setattr(mnist, "update_ema", spy)
    torch.manual_seed(0)
    initial = [p.clone() for p in UNet().parameters()]  # run_mnist seeds 0 the same way
    run_mnist(mnist_data, tmp_path / "a", "--epochs", "1")
    assert [d for d, _ in snapshots] == pytest.approx([2 / 11, 3 / 12, 4 / 13])
    expected = initial
    for d, weights in snapshots:
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    for (name, _), e in zip(UNet().named_parameters(), expected):
        torch.testing.assert_close(ckpt["ema"][name], e)
    # sampling takes the average by default, the trained weights with --raw
    (ema_model, _), (raw_model, _) = (common.load_model(tmp_path / "a" / "ckpt.pt", "cpu", raw)
                                      for raw in (False, True))
    assert torch.equal(ema_model.out.bias, ckpt["ema"]["out.bias"])
    assert torch.equal(raw_model.out.bias, ckpt["model"]["out.bias"])
    # --ema 0: no average in the checkpoint
    run_mnist(mnist_data, tmp_path / "b", "--epochs", "1", "--ema", "0")
    assert "ema" not in torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)

def flow_cells(path, rows, cols, scale=2):
    """The 28x28 cells of flow.png (a band of 12 * scale pixels for the times on top), in [0, 1]."""
    from PIL import Image
    img = torch.tensor(np.array(Image.open(path)),
                       dtype=torch.float64)[12 * scale::scale, ::scale] / 255
    return png_cells_of(img, rows, cols)

def gif_frames(path):
    """The frames of a GIF in [0, 1], and how long each is shown (ms)."""
    from PIL import Image, ImageSequence
    frames = [(np.array(f.convert("L")), f.info["duration"])
              for f in ImageSequence.Iterator(Image.open(path))]
    return [torch.tensor(f, dtype=torch.float64) / 255 for f, _ in frames], [ms for _, ms in frames]

def png_cells_of(img, rows, cols):
    """The 28x28 cells (padding 2) of a picture (H, W) that make_grid/save_image laid out:
    (rows, cols, 28, 28)."""
    assert img.shape == (30 * rows + 2, 30 * cols + 2)
    return torch.stack([torch.stack([img[30 * r + 2:30 * r + 30, 30 * c + 2:30 * c + 30]
                                     for c in range(cols)])
                        for r in range(rows)])

def test_mnist_sample_with_nfe_writes_the_flow_from_noise_to_the_digits(mnist_data, tmp_path,
                                                                        capsys):
    out = tmp_path / "o"
    run_mnist(mnist_data, out, "--epochs", "1")
    capsys.readouterr()
    run_mnist(mnist_data, out, "--sample", "10", "--nfe", "6")
    solver, steps, grid = common.plan(6, "cosine")
    assert (f"{solver}, {steps} steps on the {grid} grid ({common.nfe(solver, steps)} "
            "network evaluations each)" in capsys.readouterr().out)
    x = torch.load(out / "samples.pt", weights_only=True)
    noise = common.to_unit(common.fixed_noise(10, 0))
    # flow.png: a row per sample (8), a column per time; the first column is the noise, the last
    # the digit
    cells = flow_cells(out / "flow.png", 8, steps + 1)
    torch.testing.assert_close(cells[:, 0], noise[:8, 0].double(), rtol=0, atol=0.5 / 255 + 1e-9)
    torch.testing.assert_close(cells[:, -1], x[:8, 0].double(), rtol=0, atol=0.5 / 255 + 1e-9)
    # flow.gif: the ten samples on their way, held at the end
    frames, ms = gif_frames(out / "flow.gif")
    assert len(frames) == steps + 1 and ms[-1] > 5 * ms[0]  # a frame a state, the last held
    first, last = (png_cells_of(f, 2, 8) for f in (frames[0], frames[-1]))
    torch.testing.assert_close(first.flatten(0, 1)[:10], noise[:, 0].double(),
                               rtol=0, atol=0.5 / 255 + 1e-9)
    torch.testing.assert_close(last.flatten(0, 1)[:10], x[:, 0].double(),
                               rtol=0, atol=0.5 / 255 + 1e-9)

def test_the_weights_alone_sample_but_do_not_resume(mnist_data, tmp_path, capsys):
    run_mnist(mnist_data, tmp_path / "run", "--epochs", "2")
    small = tmp_path / "weights"
    small.mkdir()
    (small / "ckpt.pt").write_bytes(
        (tmp_path / "run" / "epoch002.pt").read_bytes())  # what the repository keeps
    assert (small / "ckpt.pt").stat().st_size < 1_000_000
    ckpt = torch.load(small / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"script", "ema", "config", "epoch"} and ckpt["epoch"] == 2
    assert ckpt["script"] == "mnist.py"
    run_mnist(mnist_data, small, "--sample", "6")
    run_mnist(mnist_data, tmp_path / "run", "--sample", "6")
    assert torch.equal(torch.load(small / "samples.pt", weights_only=True),
                       torch.load(tmp_path / "run" / "samples.pt",
                                  weights_only=True))  # the averaged weights
    expect_error("holds weights only, no optimiser state: it can --sample, not --resume",
                 run_mnist, mnist_data, small, "--resume")
    expect_error("holds only the moving average of the weights; --raw needs a run's ckpt.pt",
                 run_mnist, mnist_data, small, "--sample", "6", "--raw")

@pytest.mark.parametrize("script", ["mnist", "translate"])
def test_handout_sets_the_handouts_recipe_and_a_setting_given_wins(both_data, tmp_path, script,
                                                                   monkeypatch):
    import importlib
    module = importlib.import_module(script)
    run = {"mnist": run_mnist, "translate": run_translate}[script]
    expected = {"t_dist": "uniform", "batch_size": 128, "ema": 0.0, "solver": "euler", "steps": 100,
                "grid": "uniform",
                **({"pairing": "random", "sigma": 0.0} if script == "translate" else {})}
    assert module.HANDOUT == expected
    # the same run as the explicit flags, but for --batch-size 16, given besides --handout
    run(both_data, tmp_path / "a", "--epochs", "1", "--handout", "--steps", "2")
    run(both_data, tmp_path / "b", "--epochs", "1", "--t-dist", "uniform", "--ema", "0", "--solver",
        "euler", "--steps", "2", "--grid", "uniform", "--pairing", "random",
        *(["--sigma", "0"] if script == "translate" else []))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert {k: a["config"][k] for k in expected} == {**expected, "batch_size": 16, "steps": 2}
    assert "ema" not in a and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # without a setting given, HANDOUT's own (batches of 128: one short batch of 48 here)
    # (its pictures' sampler recorded, not run: 100 Euler steps on the uniform grid)
    seen = []
    monkeypatch.setattr(module, "generate", lambda model, x0, steps, device, dtype, solver, ts,
                        **k: seen.append((solver, steps, ts)) or torch.zeros(len(x0), 1, 28, 28))
    module.main(["--data", str(both_data), "--out", str(tmp_path / "c"), "--device", "cpu",
                 "--epochs", "1", "--handout"])
    c = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)
    assert {k: c["config"][k] for k in expected} == expected and c["config"]["handout"] is True
    assert [(s, n) for s, n, _ in seen] == [("euler", 100)]
    assert torch.equal(seen[0][2], common.time_grid("uniform", 100))

def test_the_lines_of_mnist_py_the_readme_names_are_the_training_loop():
    with open(os.path.join(HERE, "README.md")) as f:
        first, last = map(int, re.search(r"`mnist.py` lines\s+(\d+)-(\d+)", f.read()).groups())
    with open(os.path.join(HERE, "mnist.py")) as f:
        lines = f.read().splitlines()[first - 1:last]
    assert lines[0].strip().startswith("for epoch in range(") and "update_ema(" in lines[-1]
    for part in ["for step, idx in", "x1 = x1_all[", "x0 = torch.randn_like(x1)", "t = draw_t(",
                 "fm_loss(", "loss.backward()", "opt.step()"]:
        assert any(part in line for line in lines), part

def test_mnist_bad_input_is_a_clear_error(mnist_data, tmp_path, monkeypatch):
    import torchvision
    # no data and no network: name the folder and the four files
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    empty = tmp_path / "empty"
    expect_error(f"MNIST is not in {empty / 'MNIST' / 'raw'} and could not be downloaded",
                 run_mnist, empty, tmp_path / "o1")
    expect_error("t10k-labels-idx1-ubyte there", run_mnist, empty, tmp_path / "o1")
    expect_error("invalid choice: 'sigmoid'", run_mnist, mnist_data, tmp_path / "o2",
                 "--schedule", "sigmoid")
    expect_error("argument --ema: invalid decay value: '1.5'", run_mnist, mnist_data,
                 tmp_path / "o2", "--ema", "1.5")
    expect_error("invalid choice: 'rk4'", run_mnist, mnist_data, tmp_path / "o2", "--solver", "rk4")
    expect_error("argument --lr: invalid positive_float value: '-0.001'", run_mnist, mnist_data,
                 tmp_path / "o2", "--lr", "-0.001")
    for flag, value, kind in [("--guidance", "inf", "non_negative_float"),
                              ("--guidance", "nan", "non_negative_float"),
                              ("--lr", "inf", "positive_float"),
                              ("--t-mean", "nan", "finite_float")]:
        expect_error(f"argument {flag}: invalid {kind} value: '{value}'", run_mnist, mnist_data,
                     tmp_path / "o2", flag, value)  # a number, and a finite one
    expect_error("no checkpoint at", run_mnist, mnist_data, tmp_path / "o3", "--sample", "4")
    expect_error("no checkpoint at", run_mnist, mnist_data, tmp_path / "o3", "--resume")
    # a checkpoint of another network, a corrupt file
    (tmp_path / "o4").mkdir()
    torch.save({"model": MLP().state_dict()}, tmp_path / "o4" / "ckpt.pt")
    expect_error("does not hold weights for this script's UNet", run_mnist, mnist_data,
                 tmp_path / "o4", "--sample", "4")
    expect_error("does not hold weights for this script's UNet", run_mnist, mnist_data,
                 tmp_path / "o4", "--resume")
    torch.save({"model": UNet().state_dict()}, tmp_path / "o4" / "ckpt.pt")  # weights, no settings
    expect_error("has no training settings to resume from", run_mnist, mnist_data,
                 tmp_path / "o4", "--resume")
    (tmp_path / "o4" / "ckpt.pt").write_bytes(b"not a checkpoint")
    expect_error("cannot read checkpoint", run_mnist, mnist_data, tmp_path / "o4", "--sample", "4")
    (tmp_path / "o4" / "ckpt.pt").write_bytes(
        bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).tolist()))
    expect_error("not a file that torch.save wrote, or a damaged one", run_mnist, mnist_data,
                 tmp_path / "o4", "--resume")
    # an existing run is never overwritten by a fresh one
    (tmp_path / "o4" / "ckpt.pt").write_bytes(b"not a checkpoint")
    expect_error("ckpt.pt exists: add --resume", run_mnist, mnist_data, tmp_path / "o4")
    assert (tmp_path / "o4" / "ckpt.pt").read_bytes() == b"not a checkpoint"

# -----------------------------------------------------------------------------
# translate.py: Fashion-MNIST -> MNIST

@pytest.fixture
def both_data(tmp_path):
    return write_idx(write_idx(tmp_path / "data", "MNIST"),
                     "FashionMNIST", n_train=40, n_test=24, seed=1)

def run_translate(data, out, *extra):
    import translate
    return translate.main(["--data", str(data), "--out", str(out), "--batch-size", "16",
                           "--nfe", "3", "--device", "cpu", *extra])

def png_cells(path, rows, cols):
    """The 28x28 cells of a picture that save_image wrote (padding 2), in [0, 1]:
    (rows, cols, 28, 28)."""
    from PIL import Image
    img = torch.tensor(np.array(Image.open(path).convert("L")), dtype=torch.float64) / 255
    return png_cells_of(img, rows, cols)

def training_starts(monkeypatch, data, out, *extra):
    """The x0 of every training batch of a translate.py run, (N, 784)."""
    starts = []
    def recording_loss(model, x0, x1, *rest):
        starts.append(x0.flatten(1))
        return fm_loss(model, x0, x1, *rest)
    import translate
    monkeypatch.setattr(translate, "fm_loss", recording_loss)
    run_translate(data, out, *extra)
    return torch.cat(starts)

def test_translate_starts_from_garments_and_writes_pictures(both_data, tmp_path, monkeypatch):
    garments = common.load_images("FashionMNIST", str(both_data)).flatten(1)
    out = tmp_path / "out"
    x0 = training_starts(monkeypatch, both_data, out, "--epochs", "1", "--sigma", "0")
    assert len(x0) == 48  # one start per MNIST training image
    # every x0 is a Fashion-MNIST training image (not noise, not a digit)
    assert (torch.cdist(x0, garments).min(dim=1).values == 0).all()
    # the picture: the 16 fixed test garments on top, their translations below
    test_garments = common.to_unit(common.load_images("FashionMNIST", str(both_data), train=False))
    cells = png_cells(out / "epoch001.png", 2, 16)
    torch.testing.assert_close(cells[0], test_garments[:16, 0].double(),
                               rtol=0, atol=0.5 / 255 + 1e-9)

    run_translate(both_data, out, "--sample", "10")
    x = torch.load(out / "samples.pt", weights_only=True)
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    cells = png_cells(out / "samples.png", 2, 10)  # sources above their translations
    torch.testing.assert_close(cells[0], test_garments[:10, 0].double(),
                               rtol=0, atol=0.5 / 255 + 1e-9)
    torch.testing.assert_close(cells[1], x[:, 0].double(), rtol=0, atol=0.5 / 255 + 1e-9)
    # 20 images: a full row of 16 pairs, then 4 pairs padded with black
    run_translate(both_data, out, "--sample", "20")
    x = torch.load(out / "samples.pt", weights_only=True)
    cells = png_cells(out / "samples.png", 4, 16)
    torch.testing.assert_close(cells[2, :4], test_garments[16:20, 0].double(),
                               rtol=0, atol=0.5 / 255 + 1e-9)
    torch.testing.assert_close(cells[3, :4], x[16:20, 0].double(), rtol=0, atol=0.5 / 255 + 1e-9)
    assert cells[2:, 4:].max() == 0
    expect_error("--sample 25: Fashion-MNIST has only 24 test images", run_translate, both_data,
                 out, "--sample", "25")

def test_translate_flow_starts_from_the_garments(both_data, tmp_path):
    out = tmp_path / "o"
    run_translate(both_data, out, "--epochs", "1", "--sigma", "0")  # the garments themselves
    run_translate(both_data, out, "--sample", "8", "--solver", "euler", "--steps", "12",
                  "--grid", "uniform")
    x = torch.load(out / "samples.pt", weights_only=True)
    garments = common.to_unit(common.load_images("FashionMNIST", str(both_data), train=False))
    cells = flow_cells(out / "flow.png", 8, 10)  # about ten of the 13 times
    torch.testing.assert_close(cells[:, 0], garments[:8, 0].double(), rtol=0, atol=0.5 / 255 + 1e-9)
    torch.testing.assert_close(cells[:, -1], x[:8, 0].double(), rtol=0, atol=0.5 / 255 + 1e-9)

def test_translate_sigma_starts_from_each_garment_plus_gaussian_noise(both_data, tmp_path,
                                                                     monkeypatch):
    garments = common.load_images("FashionMNIST", str(both_data)).flatten(1)
    out = tmp_path / "out"
    x0 = training_starts(monkeypatch, both_data, out, "--epochs", "1", "--sigma", "0.5")
    # the garments lie 1.28 apart (mean squared pixel), the noise 0.25 from its own
    noise = x0 - garments[torch.cdist(x0, garments).argmin(dim=1)]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 0.5) < 0.02
    # sampling starts from the test garments plus 0.5 times the noise of --seed
    test_garments = common.load_images("FashionMNIST", str(both_data), train=False)[:8]
    for seed in (0, 1):
        run_translate(both_data, out, "--sample", "8", "--seed", str(seed), "--solver", "euler",
                      "--steps", "12", "--grid", "uniform")
        cells = flow_cells(out / "flow.png", 8, 10)
        start = common.to_unit(test_garments + 0.5 * common.fixed_noise(8, seed))
        torch.testing.assert_close(cells[:, 0], start[:, 0].double(), rtol=0,
                                   atol=0.5 / 255 + 1e-9)
        cells = png_cells(out / "samples.png", 2, 8)  # above: the garments themselves
        torch.testing.assert_close(cells[0], common.to_unit(test_garments)[:, 0].double(),
                                   rtol=0, atol=0.5 / 255 + 1e-9)
    assert torch.equal(common.blur(test_garments, 0.0, 1), test_garments)

def test_translate_ot_pairing_reorders_the_same_garments_to_a_shorter_total(both_data, tmp_path,
                                                                            monkeypatch):
    import translate
    batches = {}
    def recording_loss(model, x0, x1, *rest):
        batches.setdefault(recording_loss.run, []).append((x0.flatten(1).clone(),
                                                           x1.flatten(1).clone()))
        return fm_loss(model, x0, x1, *rest)
    monkeypatch.setattr(translate, "fm_loss", recording_loss)
    for pairing in ["random", "ot"]:
        recording_loss.run = pairing
        run_translate(both_data, tmp_path / pairing, "--epochs", "1", "--pairing", pairing)
    cost = lambda x0, x1: (x0 - x1).pow(2).sum().item()
    for (r0, r1), (o0, o1) in zip(batches["random"], batches["ot"]):
        assert torch.equal(r1, o1)  # the same digits, in the same order
        assert sorted(map(tuple, r0.tolist())) == sorted(map(tuple, o0.tolist()))  # the same
                                                                                   # garments
        assert cost(o0, o1) <= cost(r0, r1) + 1e-6
    assert sum(cost(*b) for b in batches["ot"]) < sum(cost(*b) for b in batches["random"])

def test_translate_pairs_at_random_and_resumes_exactly(both_data, tmp_path, monkeypatch):
    import translate
    digits = common.load_images("MNIST", str(both_data)).flatten(1)
    garments = common.load_images("FashionMNIST", str(both_data)).flatten(1)
    pairs = []
    def recording_loss(model, x0, x1, *rest):
        pairs.extend(zip(torch.cdist(x1.flatten(1), digits).argmin(1).tolist(),
                         torch.cdist(x0.flatten(1), garments).argmin(1).tolist()))
        return fm_loss(model, x0, x1, *rest)
    monkeypatch.setattr(translate, "fm_loss", recording_loss)
    run_translate(both_data, tmp_path / "a", "--epochs", "2", "--pairing", "random")
    first, second = dict(pairs[:48]), dict(pairs[48:])
    assert sorted(first) == sorted(second) == list(range(48))  # every digit once an epoch
    # a digit meets another garment in the next epoch (random: 39 times in 40)
    assert sum(first[d] != second[d] for d in range(48)) >= 40
    # killed in the middle of epoch 2, resumed: the same weights as the run above
    calls = {"n": 0}
    def dying_loss(*a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        return fm_loss(*a)
    monkeypatch.setattr(translate, "fm_loss", dying_loss)
    with pytest.raises(Killed):
        run_translate(both_data, tmp_path / "b", "--epochs", "2", "--pairing", "random")
    monkeypatch.setattr(translate, "fm_loss", fm_loss)
    # as a checkpoint from before --pairing existed: it resumes with the random pairing it
    # trained with
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    del ckpt["config"]["pairing"]
    torch.save(ckpt, tmp_path / "b" / "ckpt.pt")
    run_translate(both_data, tmp_path / "b", "--epochs", "2", "--resume")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k])
               for k in a["model"])

def test_translate_without_fashion_mnist_is_a_clear_error(mnist_data, tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    expect_error(f"FashionMNIST is not in {mnist_data / 'FashionMNIST' / 'raw'}", run_translate,
                 mnist_data, tmp_path / "o")

# -----------------------------------------------------------------------------
# evaluate.py: the Frechet distance against closed forms, then the script

def random_covariance(d, seed):
    a = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)

def test_frechet_distance_closed_forms():
    from evaluate import frechet_distance
    s, mu = random_covariance(6, 0), torch.randn(6, dtype=torch.float64)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-9)
    # s2 = c^2 s1: (s1 s2)^(1/2) = c s1, so the distance is |dmu|^2 + (1 - c)^2 Tr(s1)
    shift = torch.tensor([1.0, -2.0, 0, 0, 0, 0.5], dtype=torch.float64)
    assert frechet_distance(mu, s, mu + shift, 9 * s) == pytest.approx(5.25 + 4 * s.trace().item(),
                                                                       rel=1e-9)
    # diagonal covariances: sum of (sqrt(a_i) - sqrt(b_i))^2
    a, b = (torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64),
            torch.tensor([9.0, 1.0, 0.25], dtype=torch.float64))
    z = torch.zeros(3, dtype=torch.float64)
    assert frechet_distance(z, torch.diag(a), z, torch.diag(b)) == pytest.approx(4 + 1 + 0)
    # 2x2 covariances that do not commute: Tr sqrt(s1 s2) = sqrt(Tr(s1 s2) + 2 sqrt(det s1 det s2)),
    # which the classic mistake Tr(sqrt(s1) sqrt(s2)) does not give
    s1 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    tr_sqrt = math.sqrt(torch.trace(s1 @ s2).item()
                        + 2 * math.sqrt(torch.det(s1).item() * torch.det(s2).item()))
    z2 = torch.zeros(2, dtype=torch.float64)
    assert frechet_distance(z2, s1, z2, s2) == pytest.approx(4 + 5 - 2 * tr_sqrt, rel=1e-9)
    # symmetric in its two arguments, also for covariances that do not commute
    s2 = random_covariance(6, 1)
    assert frechet_distance(mu, s, z.new_zeros(6), s2) == pytest.approx(
        frechet_distance(z.new_zeros(6), s2, mu, s), rel=1e-9)

def test_independence_chi2_closed_forms():
    from evaluate import independence_chi2
    # rows proportional to each other: exactly independent
    assert independence_chi2(torch.tensor([[10, 20, 30], [1, 2, 3]])) == (pytest.approx(0), 2)
    # each row all in its own column: chi2 = N (k - 1) for N samples and k classes
    assert independence_chi2(torch.eye(4, dtype=torch.long) * 25) == (pytest.approx(100 * 3), 9)
    # an empty row and column do not count
    assert independence_chi2(torch.tensor([[5, 0, 5], [0, 0, 0],
                                           [5, 0, 5]])) == (pytest.approx(0), 1)

def test_coverage_counts_effective_classes():
    from evaluate import coverage
    assert coverage(torch.arange(1000) % 10) == pytest.approx(1.0)
    assert coverage(torch.full((50,), 3)) == pytest.approx(0.1)
    assert coverage(torch.arange(1000) % 5) == pytest.approx(0.5)

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Small MNIST-like data whose classes can be learned, and evaluate.py's first call on
    200 of its training images ('real'), which trains and caches the classifier."""
    import evaluate
    tmp = tmp_path_factory.mktemp("evaluate")
    data = write_idx(write_idx(tmp / "data", "MNIST", n_train=300, n_test=200, classes=True),
                     "FashionMNIST", n_train=40, n_test=60, seed=1)
    run = lambda *args: evaluate.main([*args, "--data", str(data), "--classifier",
                                       str(tmp / "classifier.pt"), "--epochs", "8",
                                       "--device", "cpu"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        real = run("real", "--n", "200")
    return run, data, real, buf.getvalue()

def test_evaluate_real_images_score_near_zero_and_noise_far(evaluated, tmp_path, capsys):
    run, data, real, log = evaluated
    assert "(trained now): MNIST test accuracy 100.00%" in log  # the bars are easy to tell apart
    last = dict(kv.split("=") for kv in log.strip().splitlines()[-1].split())
    assert last.keys() == {"n", "fid", "confidence", "coverage", "accuracy"} and last["n"] == "200"
    assert real["confidence"] > 0.9 and real["coverage"] > 0.99 and real["fid"] < 5
    noise = run("noise", "--n", "200")
    assert "(cached)" in capsys.readouterr().out
    assert noise["fid"] > 100 * real["fid"]
    # a samples.pt that holds the very reference images scores 0
    test_images = common.load_images("MNIST", str(data), train=False)
    torch.save(common.to_unit(test_images), tmp_path / "samples.pt")
    same = run(str(tmp_path / "samples.pt"))
    assert same["n"] == 200 and same["fid"] == pytest.approx(0, abs=1e-6)
    assert same["counts"].tolist() == [20] * 10

def test_evaluate_translation_table(evaluated, tmp_path, capsys):
    import evaluate
    run = evaluated[0]
    torch.save(torch.rand(60, 1, 28, 28), tmp_path / "samples.pt")
    run(str(tmp_path / "samples.pt"), "--translation")
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("  ")]
    assert [r.split()[0] for r in rows] == ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                                            "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
    for r in rows:  # each row: ten shares that add up to 100 %, then its count (6 of each label)
        shares = [float(v) for v in r.split()[1:11]]
        assert sum(shares) == pytest.approx(100, abs=3) and r.split()[-1] == "6"
    # the printed chi2 is the table's, against independence, with (10 - 1) (digits seen - 1) dof
    table = torch.tensor([[round(float(v) * 6 / 100) for v in r.split()[1:11]] for r in rows])
    chi2, dof = evaluate.independence_chi2(table)
    assert dof == 9 * ((table.sum(0) > 0).sum().item() - 1)
    m = re.search(r"^chi2 = (\d+\.\d) with (\d+) degrees of freedom: about (\d+) \+- (\d+) if",
                  out, re.M)
    assert (m and float(m.group(1)) == pytest.approx(chi2, abs=0.05)
            and int(m.group(2)) == int(m.group(3)) == dof)
    assert int(m.group(4)) == round(math.sqrt(2 * dof))
    # a translation that is its own garment is at distance 0; the line says so, next to another's
    garments = common.load_images("FashionMNIST", str(evaluated[1]), train=False)
    torch.save(common.to_unit(garments), tmp_path / "same.pt")
    r = run(str(tmp_path / "same.pt"), "--translation")
    assert r["distance"] == pytest.approx(0, abs=1e-6)
    assert re.search(r"^distance from its own garment 0.0000, from another's \d+\.\d{4}",
                     capsys.readouterr().out, re.M)

def test_evaluate_sweeps_a_run_over_solvers_grids_and_network_evaluations(evaluated, tmp_path,
                                                                          capsys, monkeypatch):
    import shutil, evaluate
    run, data = evaluated[:2]
    out = tmp_path / "run"
    run_mnist(data, out, "--epochs", "1", "--limit", "48")
    rows = run(str(out), "--nfe", "1", "3", "--n", "20", "--seeds", "0", "1")
    assert len(rows) == 2 * 3 * 4 * 2  # noise sets x grids x solvers x budgets
    assert [(r["solver"], r["steps"], r["nfe"])
            for r in rows if r["seed"] == 0 and r["grid"] == "uniform"] == [
        ("euler", 1, 1), ("euler", 3, 3), ("heun", 1, 2), ("heun", 1, 2),
        ("midpoint", 1, 2), ("midpoint", 1, 2), ("heun-euler", 1, 1), ("heun-euler", 2, 3)]
    with open(out / "nfe.csv") as f:
        assert [r["fid"] for r in csv.DictReader(f)] == [str(r["fid"]) for r in rows]
    assert (out / "nfe.png").stat().st_size > 10_000
    # --raw scores the trained weights, not their average, into files of its own
    raw = run(str(out), "--nfe", "1", "--n", "20", "--raw", "--seeds", "0")
    assert len(raw) == 3 * 4 and raw[0]["fid"] != rows[0]["fid"]
    with open(out / "nfe-raw.csv") as f:
        assert [r["fid"] for r in csv.DictReader(f)] == [str(r["fid"]) for r in raw]
    with open(out / "nfe.csv") as f:
        assert len(list(csv.DictReader(f))) == 48
    # the sweep samples what mnist.py --sample draws, from the same noise
    euler3 = [r for r in rows
              if (r["seed"], r["grid"], r["solver"], r["nfe"]) == (1, "early", "euler", 3)][0]
    run_mnist(data, out, "--sample", "20", "--solver", "euler", "--steps", "3", "--grid", "early",
              "--seed", "1")
    assert run(str(out / "samples.pt"))["fid"] == pytest.approx(euler3["fid"], abs=1e-3)
    # --curve: the weights of every epoch, each with the sampler of --nfe 10
    run_mnist(data, out, "--epochs", "2", "--resume")
    curve = run(str(out), "--curve", "--n", "20", "--seeds", "0")
    assert [r["epoch"] for r in curve] == [1, 2]
    run_mnist(data, out, "--sample", "20", "--nfe", "10")  # the last epoch's averaged weights
    assert run(str(out / "samples.pt"))["fid"] == pytest.approx(curve[-1]["fid"], abs=1e-3)
    assert (out / "curve.png").stat().st_size > 10_000
    # --also: another run's curve beside it, the same numbers for the same weights
    shutil.copytree(out, tmp_path / "copy")
    os.remove(tmp_path / "copy" / "curve.csv")  # (scored afresh)
    both = run(str(out), "--curve", "--n", "20", "--seeds", "0", "--also", str(tmp_path / "copy"))
    with open(tmp_path / "copy" / "curve.csv") as f:
        assert ([float(r["fid"]) for r in csv.DictReader(f)] == [r["fid"] for r in both]
                == [r["fid"] for r in curve])
    # scores in curve.csv are read back, not sampled again, unless the weights are newer
    sampled = []
    real_generate = evaluate.generate
    monkeypatch.setattr(evaluate, "generate",
                        lambda *a, **k: sampled.append(1) or real_generate(*a, **k))
    assert run(str(out), "--curve", "--n", "20", "--seeds", "0") == curve and sampled == []
    later = os.path.getmtime(out / "curve.csv") + 10
    os.utime(out / "epoch002.pt", (later, later))
    assert run(str(out), "--curve", "--n", "20", "--seeds", "0") == curve and len(sampled) == 1
    # another noise set is sampled; so is epoch 2 again, its weights still newer than the csv
    rows = run(str(out), "--curve", "--n", "20", "--seeds", "0", "1")
    assert [r for r in rows if r["seed"] == 0] == curve and len(sampled) == 1 + 3
    # --path: along 100 Euler steps from the first noise set; at t = 1 nothing is left to guess
    path = run(str(out), "--path", "--n", "20", "--seeds", "0")
    assert [r["t"] for r in path] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                                      0.95, 0.99, 1.0]
    assert path[0]["rms"] == pytest.approx(common.fixed_noise(20, 0).pow(2).mean().sqrt().item(),
                                           rel=1e-5)
    assert path[-1]["decided"] is None and all(0 <= r["decided"] <= 1 for r in path[:-1])
    assert all(math.isfinite(r["dv/dt"]) for r in path[1:-1])
    printed = [l for l in capsys.readouterr().out.splitlines() if l.startswith("straightness ")]
    model, _ = common.load_model(out / "ckpt.pt", torch.device("cpu"))
    S = common.straightness(model, common.fixed_noise(20, 0))  # the same 100 Euler steps
    assert float(printed[-1].split()[1]) == pytest.approx(S, abs=1e-4)
    # a curve.csv cut short in its last row, or written in another precision: scored again
    before = os.path.getmtime(out / "epoch001.pt")
    os.utime(out / "epoch002.pt", (before, before))  # (no longer newer than the scores)
    run(str(out), "--curve", "--n", "20", "--seeds", "0", "1")
    text = (out / "curve.csv").read_text()
    (out / "curve.csv").write_text(text[:-5])
    sampled.clear()
    assert run(str(out), "--curve", "--n", "20", "--seeds", "0", "1") == rows and len(sampled) == 1
    # (each precision named, so that this holds whatever --dtype auto takes on this CPU)
    rows32 = run(str(out), "--curve", "--n", "20", "--seeds", "0", "--dtype", "float32")
    sampled.clear()
    assert run(str(out), "--curve", "--n", "20", "--seeds", "0", "--dtype", "float32") == rows32
    assert sampled == [] and [r["dtype"] for r in rows32] == ["float32"] * 2
    rows16 = run(str(out), "--curve", "--n", "20", "--seeds", "0", "--dtype", "bfloat16")
    assert len(sampled) == 2 and [r["dtype"] for r in rows16] == ["bfloat16"] * 2

def test_guess_x1_is_the_end_of_a_single_path():
    # through x_t = alpha x0 + beta x1 with velocity dalpha x0 + dbeta x1, the guess is x1
    x0, x1 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    for schedule in SCHEDULES:
        for t in [0.0, 0.1, 0.5, 0.9]:
            a, b, da, db = schedule(torch.tensor(t, dtype=torch.float64))
            guess = common.guess_x1(schedule, torch.tensor(t, dtype=torch.float64),
                                    a * x0 + b * x1, da * x0 + db * x1)
            torch.testing.assert_close(guess, x1)

def test_evaluate_path_of_a_translation_starts_from_the_garments(evaluated, tmp_path):
    run, data = evaluated[:2]
    run_translate(data, tmp_path / "t", "--epochs", "1", "--limit", "40", "--sigma", "0")
    path = run(str(tmp_path / "t"), "--path", "--translation", "--n", "20")
    garments = common.load_images("FashionMNIST", str(data), train=False)[:20]
    assert path[0]["rms"] == pytest.approx(garments.pow(2).mean().sqrt().item(), rel=1e-5)

def test_evaluate_curve_of_a_translation_scores_the_link_and_starts_as_translate_does(
        evaluated, tmp_path, capsys, monkeypatch):
    import csv, evaluate
    run, data = evaluated[:2]
    out = tmp_path / "t"
    run_translate(data, out, "--epochs", "2", "--limit", "40", "--sigma", "0.3")
    curve = run(str(out), "--curve", "--translation", "--n", "20")
    assert [r["epoch"] for r in curve] == [1, 2]
    # the last epoch's row: translate.py --sample --nfe 10 of the same weights, scored
    run_translate(data, out, "--sample", "20", "--nfe", "10")
    capsys.readouterr()
    r = run(str(out / "samples.pt"), "--translation")
    chi2 = float(re.search(r"^chi2 = (\d+\.\d)", capsys.readouterr().out, re.M).group(1))
    assert curve[-1]["fid"] == pytest.approx(r["fid"], abs=1e-3)
    assert curve[-1]["own"] == pytest.approx(r["distance"], abs=1e-4)
    assert curve[-1]["chi2"] == pytest.approx(chi2, abs=0.15) and curve[-1]["other"] > 0
    # read back, not sampled again; a curve.csv without the link (older) is scored again
    sampled = []
    real_generate = evaluate.generate
    monkeypatch.setattr(evaluate, "generate",
                        lambda *a, **k: sampled.append(1) or real_generate(*a, **k))
    assert run(str(out), "--curve", "--translation", "--n", "20") == curve and sampled == []
    with open(out / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "curve.csv", "w", newline="") as f:
        keep = ["epoch", "seed", "n", "sampler", "dtype", "fid", "confidence", "coverage"]
        writer = csv.DictWriter(f, fieldnames=keep, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert run(str(out), "--curve", "--translation", "--n", "20") == curve and len(sampled) == 2
    # --path too starts from the garments plus the run's --sigma noise
    path = run(str(out), "--path", "--translation", "--n", "20")
    garments = common.load_images("FashionMNIST", str(data), train=False)[:20]
    start = garments + 0.3 * common.fixed_noise(20, 0)
    assert path[0]["rms"] == pytest.approx(start.pow(2).mean().sqrt().item(), rel=1e-5)

def test_evaluate_bad_input_is_a_clear_error(tmp_path):
    import evaluate
    eval_data = write_idx(tmp_path / "data", "MNIST")
    run_evaluate = lambda data, tmp, *args: evaluate.main(
        [*args, "--data", str(data), "--classifier", str(tmp / "cls" / "classifier.pt"),
         "--device", "cpu"])
    s = tmp_path / "samples.pt"
    expect_error(f"no file or run folder {tmp_path / 'missing.pt'}", run_evaluate, eval_data,
                 tmp_path, str(tmp_path / "missing.pt"))
    expect_error("no checkpoint at", run_evaluate, eval_data, tmp_path,
                 str(tmp_path))  # a folder, no run
    for what in ("real", str(tmp_path)):  # images or a run folder: FID needs two images
        expect_error("--n 1: FID needs at least 2 images", run_evaluate, eval_data, tmp_path,
                     what, "--n", "1")
    expect_error("holds no epochNNN.pt", run_evaluate, eval_data, tmp_path, str(tmp_path),
                 "--curve")
    torch.save(torch.rand(5, 3, 32, 32), s)
    expect_error("does not hold images: expected a float tensor (N, 1, 28, 28), got (5, 3, 32, 32)",
                 run_evaluate, eval_data, tmp_path, str(s))
    torch.save(torch.rand(5, 1, 28, 28) * 2 - 1, s)
    expect_error("values in [0, 1]", run_evaluate, eval_data, tmp_path, str(s))
    torch.save(torch.rand(5, 1, 28, 28), s)
    expect_error("--n 9: ", run_evaluate, eval_data, tmp_path, str(s), "--n", "9")
    expect_error("--translation needs translate.py's samples.pt or run folder", run_evaluate,
                 eval_data, tmp_path, "real", "--translation")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "classifier.pt").write_bytes(b"garbage")
    expect_error("cannot read checkpoint", run_evaluate, eval_data, tmp_path, str(s))
    torch.save({"model": UNet().state_dict()}, tmp_path / "cls" / "classifier.pt")
    expect_error("is not an evaluate.py classifier", run_evaluate, eval_data, tmp_path, str(s))

def test_evaluate_refuses_what_it_would_ignore_and_images_that_are_not_finite(tmp_path):
    import evaluate
    s = tmp_path / "samples.pt"
    x = torch.rand(5, 1, 28, 28)
    x[2, 0, 3, 4] = float("nan")
    torch.save(x, s)
    ev = lambda *a: evaluate.main([*a, "--data", str(tmp_path), "--classifier",
                                   str(tmp_path / "c.pt")])
    expect_error(f"{s}: 1 values are not finite (NaN or infinite)", ev, str(s))
    torch.save(torch.rand(5, 1, 28, 28), s)
    for flags in [["--curve"], ["--path"], ["--raw"], ["--curve", "--also", "x"], ["--nfe", "4"],
                  ["--grids", "edm"], ["--seeds", "3"], ["--dtype", "float32"]]:
        expect_error(f"{flags[0]} is for a run folder; {s} is not one", ev, str(s), *flags)
    expect_error("--grids is not for runs side by side (--also without --curve)", ev,
                 str(tmp_path), "--also", "x", "--grids", "edm")
    expect_error("--raw and --curve: the epochs' files (epochNNN.pt) hold only the moving average",
                 ev, str(tmp_path), "--curve", "--raw")
    assert not (tmp_path / "c.pt").exists()

# =============================================================================
# the chapters, in the README's order
# =============================================================================

# -----------------------------------------------------------------------------
# where training draws t (section 3)

@pytest.mark.parametrize("t_dist,below_01", [("uniform", 0.1), ("logit-normal", 0.0140),
                                              ("u-shaped", 0.1725), ("tail", 0.0576),
                                              ("half-zero", 0.55), ("zero", 1.0),
                                              ("elbo", 0.0009)])
def test_the_distribution_of_t_in_training(t_dist, below_01):
    # P(t < 0.1): 0.1 for U(0, 1); Phi(logit(0.1)) = Phi(-2.197) = 0.0140 for sigmoid(N(0, 1));
    # density 4 cosh(4 (t - 1/2)) / (2 sinh 2): (e^0.4 - 1 + e^4 - e^3.6) / (2 (e^4 - 1)) = 0.1725;
    # half U(0, 1), half 1 - 0.001^u: 0.05 + 0.5 ln 0.9 / ln 0.001 = 0.0576, the mean
    # 1/4 + (1 - 0.999 / ln 1000) / 2 = 0.6777, and P(t > 0.99) = 0.005 + 0.5 * 1/3 = 0.1717;
    # half at 0, half U(0, 1): 0.5 + 0.5 * 0.1 = 0.55, and the mean 1/4; all at 0: 1, mean 0;
    # t / (1 - t) on [0, 0.999]: CDF (-t - ln(1 - t)) / Z, Z = ln 1000 - 0.999 = 5.9088, so
    # (ln(1 / 0.9) - 0.1) / Z = 0.0009, P(t > 0.99) = 1 - (ln 100 - 0.99) / Z = 0.3882, and the
    # mean (ln 1000 - 0.999 - 0.999^2 / 2) / Z = 0.9155
    torch.manual_seed(0)
    t = common.draw_t(200_000, t_dist)
    at_0 = {"half-zero": 0.5, "zero": 1.0}.get(t_dist, 0.0)  # the share exactly at t = 0
    assert 0 <= t.min() and t.max() < 1
    assert (t == 0).double().mean().item() == pytest.approx(at_0, abs=0.003)
    tol = 3e-4 if t_dist == "elbo" else 0.004  # 3.6 sd (elbo: 4.5 sd)
    assert (t < 0.1).double().mean().item() == pytest.approx(below_01, abs=tol)
    mean = {"half-zero": 0.25, "zero": 0.0, "tail": 0.6777, "elbo": 0.9155}.get(t_dist, 0.5)
    assert t.mean().item() == pytest.approx(mean, abs=0.003)
    if t_dist in ("tail", "elbo"):
        above = {"tail": 0.1717, "elbo": 0.3882}[t_dist]
        assert (t > 0.99).double().mean().item() == pytest.approx(above, abs=0.004)

@pytest.mark.parametrize("t_dist", ["uniform", "logit-normal", "tail", "elbo"])
def test_t_density_is_the_density_draw_t_draws_from(t_dist):
    # the share of 400,000 draws in each interval against t_density's integral over it
    torch.manual_seed(0)
    t = common.draw_t(400_000, t_dist, -0.5)
    edges = [0.05, 0.3, 0.6, 0.9, 0.99, 0.998]
    for lo, hi in zip(edges[:-1], edges[1:]):
        grid = torch.linspace(lo, hi, 100_001, dtype=torch.float64)
        mass = torch.trapezoid(common.t_density(grid, t_dist, -0.5), grid).item()
        assert ((t >= lo) & (t < hi)).double().mean().item() == pytest.approx(mass, abs=0.004)

def test_the_variance_of_the_bound_s_estimator_closed_forms():
    # x1 = 0 in d = 784 dimensions, linear path: the target is -x0 and L_t = g(t)^2 |x0|^2 / d
    # for a model that leaves g(t) of it, so E[L_t] = g^2 and E[L_t^2] = g^4 (1 + 2 / d). With
    # lambda = t / (1 - t) on [0, b], b = 1 - T, T = TAIL: Z = int lambda = ln(1 / T) - b.
    # g = 1 (the zero model): elbo's q = lambda / Z and the optimal one both leave 2 / d, and
    # U(0, 1) (1 + 2 / d) Z^-2 int lambda^2 - 1, int lambda^2 = 1 / T + 2 ln T - T;
    # g = 1 - t: the optimal q still 2 / d, elbo's (1 + 2 / d) Z A / B^2 - 1, where
    # A = int lambda g^4 = 1/20 - T^4 / 4 + T^5 / 5 and B = int lambda g^2 = b^2 / 2 - b^3 / 3
    class Left(torch.nn.Module):  # the model whose error is g(t) times the target's
        def __init__(self, g):
            super().__init__()
            self.g = g

        def forward(self, x, t):
            t = t.view(-1, 1, 1)
            return -x / (1 - t) * (1 - self.g(t))  # (1 - g) times -x0 = -x / (1 - t)
    T, d = common.TAIL, 784
    b, Z = 1 - T, math.log(1 / T) - (1 - T)
    x1 = torch.zeros(8, 1, d)
    v = common.bound_variance(Left(lambda t: torch.ones_like(t)), x1,
                              generator=torch.Generator().manual_seed(0))
    assert v["uniform"] == pytest.approx((1 + 2 / d) * (1 / T + 2 * math.log(T) - T) / Z ** 2
                                         - 1, rel=0.01)
    assert v["elbo"] == pytest.approx(2 / d, rel=0.15)
    assert v["optimal"] == pytest.approx(2 / d, rel=0.15)
    assert v["logit-normal"] > 1e6  # it almost never looks where lambda is large
    v = common.bound_variance(Left(lambda t: 1 - t), x1,
                              generator=torch.Generator().manual_seed(0))
    A, B = 1 / 20 - T ** 4 / 4 + T ** 5 / 5, b ** 2 / 2 - b ** 3 / 3
    assert v["elbo"] == pytest.approx((1 + 2 / d) * Z * A / B ** 2 - 1, rel=0.02)
    assert v["optimal"] == pytest.approx(2 / d, rel=0.15)
    # an error of 1 - t on every pixel, whatever x0: L_t = (1 - t)^2 exactly, so the optimal q
    # leaves no variance at all, elbo's Z A / B^2 - 1, U(0, 1)'s C / B^2 - 1 with C = int
    # lambda^2 (1 - t)^4 = b^3 / 3 - b^4 / 2 + b^5 / 5
    off = lambda x, t: -x / (1 - t.view(-1, 1, 1)) + (1 - t.view(-1, 1, 1))
    v = common.bound_variance(off, x1, generator=torch.Generator().manual_seed(0))
    C = b ** 3 / 3 - b ** 4 / 2 + b ** 5 / 5
    assert abs(v["optimal"]) < 1e-9
    assert v["elbo"] == pytest.approx(Z * A / B ** 2 - 1, rel=0.01)
    # (U(0, 1)'s integrand t^2 (1 - t)^3 dt/du lies mostly in the first 5 of the 64 times in u)
    assert v["uniform"] == pytest.approx(C / B ** 2 - 1, rel=0.05)

def test_importance_sampling_of_t_is_unbiased_and_learns_the_least_variance():
    # L_t = 1 - t, linear path: the bound's loss J / Z = int_0^b t dt / Z = b^2 / (2 Z), b = 1 - T
    torch.manual_seed(0)
    T = common.TAIL
    Z = math.log(1 / T) - (1 - T)
    learned = common.ImportanceT(history=500)
    t, w = learned.draw(200_000)
    assert torch.allclose(learned.probabilities(), torch.full((64,), 1 / 64, dtype=torch.float64))
    assert 0 <= t.min() and t.max() <= 1 - T
    assert (w * (1 - t)).mean().item() == pytest.approx((1 - T) ** 2 / (2 * Z), rel=0.01)
    assert w.mean().item() == pytest.approx(1, rel=0.01)  # L = 1: J / Z = 1
    loss = learned.weigh(t, w, 1 - t)  # every bin now holds 500 losses: q is learned
    assert loss.item() == pytest.approx((w * (1 - t)).mean().item())
    # p_k proportional to the root mean square of t L_t = t (1 - t) in bin k, 1% spread evenly
    u = (torch.arange(64, dtype=torch.float64) + 0.5) / 64
    mid = 1 - T ** u
    p = learned.probabilities()
    rms = (p - 0.01 / 64) / 0.99
    assert rms[1:].tolist() == pytest.approx((mid * (1 - mid) / (mid * (1 - mid)).sum()
                                              * rms.sum())[1:].tolist(), rel=0.01)
    t, w = learned.draw(200_000)
    estimate = w * (1 - t)
    assert estimate.mean().item() == pytest.approx((1 - T) ** 2 / (2 * Z), rel=0.01)
    # against "elbo"'s q = lambda / Z, whose weight is 1: the estimate is L_t itself
    elbo = 1 - common.draw_t(200_000, "elbo")
    assert estimate.var().item() < 0.01 * elbo.var().item()  # measured: 0.0016 times
    state = learned.state_dict()
    again = common.ImportanceT(history=500)
    again.load_state_dict(state)
    assert torch.equal(again.probabilities(), p)
    # the second moment, not the mean: L_t = (1 - t) B / s, B ~ Bernoulli(s), s = 1/2 in the
    # first 32 bins and 1 in the others: E[L_t] = 1 - t everywhere, E[L_t^2] = (1 - t)^2 / s
    learned = common.ImportanceT(history=2000)  # each bin's last 2000 of about 3,125
    t, w = learned.draw(200_000)
    s = torch.where(torch.log1p(-t) / math.log(T) < 0.5, 0.5, 1.0)
    learned.weigh(t, w, (1 - t) * (torch.rand(len(t)) < s) / s)
    rms = (learned.probabilities() - 0.01 / 64) / 0.99
    expect = mid * (1 - mid) * torch.where(u < 0.5, math.sqrt(2), 1.0)
    assert rms[1:].tolist() == pytest.approx((expect / expect.sum() * rms.sum())[1:].tolist(),
                                             rel=0.05)
    # fm_loss's reduce=False: each sample's loss, whose mean is the loss
    model, x0, x1 = common.MLP(), torch.randn(5, 2), torch.randn(5, 2)
    each = common.fm_loss(model, x0, x1, linear, t[:5], reduce=False)
    assert each.shape == (5,) and each.mean().item() == pytest.approx(
        common.fm_loss(model, x0, x1, linear, t[:5]).item())

def test_unknown_distribution_of_t_is_a_clear_error():
    with pytest.raises(ValueError,
                       match="unknown distribution of t 'beta'; known: uniform, logit-normal"):
        common.draw_t(2, "beta")

# -----------------------------------------------------------------------------
# more solvers and time grids (section 3, appendix D)

@pytest.mark.parametrize("solver,ratio",
                         [("euler", 2), ("heun", 4), ("midpoint", 4), ("heun-euler", 4)])
@pytest.mark.parametrize("grid", ["uniform", "early"])
def test_solver_order_of_accuracy(solver, ratio, grid):
    # dx/dt = t x, x(0) = 1: x(1) = e^(1/2). Halving the step divides the error by 2^order
    # (Heun with a last Euler step too: one step of local error O(h^2) keeps the order 2).
    field = lambda x, t: t[:, None] * x
    x0 = torch.ones(1, 1, dtype=torch.float64)
    errors = [abs(common.sample(field, x0, n, solver, ts=common.time_grid(grid, n)).item()
                  - math.exp(0.5))
              for n in [20, 40, 80]]
    assert errors[0] / errors[1] == pytest.approx(ratio, rel=0.07)
    assert errors[1] / errors[2] == pytest.approx(ratio, rel=0.04)

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("grid", ["uniform", "early", "edm"])
def test_every_time_grid_runs_from_exactly_0_to_exactly_1_and_increases(grid, schedule):
    for steps in [1, 2, 3, 5, 10, 25, 100]:
        t = common.time_grid(grid, steps, schedule)
        assert len(t) == steps + 1 and t[0].item() == 0 and t[-1].item() == 1
        assert (t[1:] > t[:-1]).all(), t
    u = torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64)
    torch.testing.assert_close(common.time_grid("early", 4), u ** 1.5)  # (i / steps)^1.5
    # the edm grid: sigma = alpha_t / beta_t evenly spaced in sigma^(1/7) from 80 to 0.002 in
    # steps - 1 steps, then t = 1 (sigma = 0); its first time is 0, not sigma = 80's
    t = common.time_grid("edm", 8, schedule)
    a, b, _, _ = common.get_schedule(schedule)(t[1:-1])
    root = (a / b) ** (1 / 7)
    step = (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 7
    torch.testing.assert_close(root[1:] - root[:-1], torch.full((6,), step, dtype=torch.float64))
    assert root[-1].item() == pytest.approx(0.002 ** (1 / 7))

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("grid", ["uniform", "early", "edm"])
def test_no_step_of_the_sampler_has_length_zero_in_float32(grid, schedule):
    # sample() works in the samples' precision: a grid that only increases in float64 would
    # waste network evaluations on steps of length 0 in float32
    for steps in [10, 25, 50, 100, 1000]:
        seen = []
        ts = common.time_grid(grid, steps, schedule)
        common.sample(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x),
                      torch.zeros(2, 1), steps, "euler", ts=ts)
        assert len(seen) == steps and all(b > a for a, b in zip(seen, seen[1:] + [1.0])), steps

def test_midpoint_is_exact_where_the_velocity_is_linear_in_t():
    # the midpoint rule integrates a line exactly, like the trapezoid rule
    a, b = (torch.tensor([0.5, -1.0], dtype=torch.float64),
            torch.tensor([2.0, 3.0], dtype=torch.float64))
    x0 = torch.randn(4, 2, dtype=torch.float64)
    for steps in [1, 3, 8]:
        torch.testing.assert_close(
            common.sample(lambda x, t: a + b * t[:, None], x0, steps, "midpoint"), x0 + a + b / 2)

@pytest.mark.parametrize("solver,times", [
    ("midpoint", [0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]),
    ("heun-euler", [0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]),  # Heun's, but no evaluation at t = 1
])
def test_where_the_solvers_evaluate_and_how_often(solver, times):
    seen = []
    common.sample(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x),
                  torch.zeros(3, 2), 4, solver)
    assert seen == pytest.approx(times)
    assert len(seen) == common.nfe(solver, 4)

@pytest.mark.parametrize("schedule,expected", [
    # the README's appendix D: (budget, solver, steps, grid), written out
    ("cosine", [(1, "euler", 1, "early"), (4, "euler", 4, "early"), (5, "euler", 5, "early"),
                (6, "heun-euler", 3, "early"), (10, "heun-euler", 5, "early"),
                (20, "heun-euler", 10, "early"), (100, "heun-euler", 50, "early")]),
    ("linear", [(1, "euler", 1, "early"), (2, "midpoint", 1, "early"), (4, "midpoint", 2, "early"),
                (10, "midpoint", 5, "early"), (49, "midpoint", 24, "early"),
                (50, "heun-euler", 25, "early"), (100, "heun-euler", 50, "early")]),
    ("reflow", [(1, "euler", 1, "uniform"), (2, "midpoint", 1, "early"),
                (4, "midpoint", 2, "early"), (20, "midpoint", 10, "early")]),
])
def test_nfe_picks_the_best_measured_sampler_and_explicit_settings_win(schedule, expected):
    reflowed = schedule == "reflow"  # a reflowed model's rows; its schedule is linear
    schedule = "linear" if reflowed else schedule
    for budget, solver, steps, grid in expected:
        assert common.plan(budget, schedule, reflowed=reflowed) == (solver, steps, grid), budget
        assert common.nfe(solver, steps) <= budget < common.nfe(solver, steps + 1)  # as many as fit
    best = common.plan(10, schedule, reflowed=reflowed)
    assert common.plan(10, schedule, solver="euler", reflowed=reflowed) == ("euler", 10, best[2])
    assert common.plan(10, schedule, steps=3, grid="uniform", reflowed=reflowed) == (
        best[0], 3, "uniform")

def test_heun_is_exact_where_the_velocity_is_linear_in_t_and_euler_is_not():
    # dx/dt = a + b t: x(1) = x0 + a + b / 2. The trapezoid rule integrates a line exactly;
    # Euler takes the left end of each step and falls short by b / (2 steps).
    a, b = (torch.tensor([0.5, -1.0], dtype=torch.float64),
            torch.tensor([2.0, 3.0], dtype=torch.float64))
    field = lambda x, t: a + b * t[:, None]
    x0 = torch.randn(4, 2, dtype=torch.float64)
    for steps in [1, 3, 8]:
        torch.testing.assert_close(common.sample(field, x0, steps, "heun"), x0 + a + b / 2)
        torch.testing.assert_close(common.sample(field, x0, steps, "euler"),
                                   x0 + a + b / 2 - b / (2 * steps))

def test_heun_calls_the_network_twice_a_step_at_both_ends():
    seen = []
    common.sample(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x),
                  torch.zeros(3, 2), 4, "heun")
    assert seen == pytest.approx([0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0])

def test_unknown_solver_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown solver 'rk4'; known solvers: "
                                         "euler, heun, midpoint, heun-euler"):
        common.sample(lambda x, t: x, torch.zeros(2, 2), 3, "rk4")

# -----------------------------------------------------------------------------
# optimal transport pairing (section 4)

def test_ot_pairing_is_the_permutation_of_least_total_squared_distance():
    import itertools
    g = torch.Generator().manual_seed(0)
    for n in [1, 2, 3, 5, 6]:
        for _ in range(20):
            x0, x1 = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
            cost = torch.cdist(x0, x1).pow(2)
            best = min(itertools.permutations(range(n)),
                       key=lambda q: sum(cost[q[j], j] for j in range(n)))
            assert tuple(common.ot_pairing(x0, x1).tolist()) == best
    # a batch whose best pairing is known: each x1 is a slightly moved, shuffled x0
    x0 = torch.randn(64, 1, 28, 28, generator=g)
    order = torch.randperm(64, generator=g)
    x1 = x0[order] + 0.01 * torch.randn(64, 1, 28, 28, generator=g)
    assert torch.equal(common.ot_pairing(x0, x1), order)

def test_ot_pairing_with_classes_pairs_within_each_class_alone():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)
    y = torch.randint(4, (40,), generator=g)
    order = common.ot_pairing(x0, x1, y)
    assert sorted(order.tolist()) == list(range(40)) and torch.equal(y[order], y)
    for c in range(4):  # within a class: its own least total distance
        i = (y == c).nonzero().squeeze(1)
        assert torch.equal(order[i], i[common.ot_pairing(x0[i], x1[i])])
    assert not torch.equal(order, common.ot_pairing(x0, x1))  # not the pairing across classes
    # a class of one keeps its own; two classes of two: the best of the 2 x 2 orders
    x0 = torch.tensor([[0.], [10.], [1.], [5.], [6.]])
    x1 = torch.tensor([[9.], [0.], [1.], [5.], [6.]])
    y = torch.tensor([2, 0, 0, 1, 1])
    assert common.ot_pairing(x0, x1, y).tolist() == [0, 2, 1, 3, 4]

@pytest.mark.parametrize("script", ["mnist", "translate"])
def test_a_conditional_run_pairs_by_ot_within_the_digits_classes(both_data, tmp_path,
                                                                monkeypatch, script):
    import importlib
    module = importlib.import_module(script)
    seen = []
    def recording(x0, x1, y=None):
        seen.append((x1.clone(), y))
        return common.ot_pairing(x0, x1, y)
    monkeypatch.setattr(module, "ot_pairing", recording)
    run = run_mnist if script == "mnist" else run_translate
    digits, classes = common.load_images("MNIST", str(both_data), labels=True)
    for conditional in ([], ["--conditional"]):
        seen.clear()
        run(both_data, tmp_path / str(len(conditional)), "--epochs", "1", "--pairing", "ot",
            *conditional)
        assert len(seen) == 3  # 48 digits in batches of 16
        for x1, y in seen:
            if conditional:  # the classes of these very digits
                which = torch.cdist(x1.flatten(1), digits.flatten(1)).argmin(dim=1)
                assert torch.equal(y, classes[which])
            else:
                assert y is None

# -----------------------------------------------------------------------------
# asking for a digit: the conditional U-Net and classifier-free guidance (section 6)

def test_the_conditional_unet_reads_the_label_as_maps_and_at_each_later_block():
    torch.manual_seed(0)
    plain, cond = UNet(), UNet(n_classes=10)
    # 10 more inputs to the first 3x3 convolution, and (10 + 1) x channels for 4 blocks
    assert sum(p.numel() for p in cond.parameters()) == 205_953 + 10 * 32 * 9 + 11 * 192
    assert all(torch.equal(table.weight, torch.zeros(11, c))
               for table, c in zip(cond.label, (32, 64, 64, 32)))  # they start at 0
    with torch.no_grad():  # as after training
        for table in cond.label:
            table.weight[:10].normal_()
    x, t = torch.randn(11, 1, 28, 28), torch.rand(11)
    y = torch.arange(11)  # 0..9, and 10: "no label"
    assert cond(x, t, y).shape == (11, 1, 28, 28)
    # "no label" is all ten maps and the vectors at 0: a U-Net whose label weights are cut out
    assert torch.equal(cond.label[0](torch.tensor([10])), torch.zeros(1, 32))
    with torch.no_grad():
        plain.load_state_dict({k: (v[:, :2] if k == "enc1.net.0.weight" else v)
                               for k, v in cond.state_dict().items() if "label" not in k})
    torch.testing.assert_close(cond(x, t, torch.full((11,), common.NO_LABEL)), plain(x, t))
    # and the later blocks read the label: with the label maps' weights at 0, y still counts
    with torch.no_grad():
        cond.enc1.net[0].weight[:, 2:] = 0
    x, t = x[:1].expand(2, -1, -1, -1), t[:1].expand(2)
    v = cond(x, t, torch.tensor([3, 7]))
    assert not torch.allclose(v[0], v[1])

def test_a_conditional_checkpoint_from_before_the_label_shifts_still_samples(tmp_path):
    torch.manual_seed(0)
    model = UNet(n_classes=10)  # its label shifts start at 0: the older U-Net exactly
    older = {k: v for k, v in model.state_dict().items() if not k.startswith("label.")}
    torch.save({"script": "mnist.py", "ema": older, "config": {"conditional": True}},
               tmp_path / "ckpt.pt")
    loaded, _ = common.load_model(str(tmp_path / "ckpt.pt"), torch.device("cpu"))
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([3, 10])
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y))  # (loaded: channels_last)

def test_guidance_mixes_the_two_fields_and_0_and_1_are_them_exactly():
    torch.manual_seed(0)
    model = UNet(n_classes=10).double()
    x, t = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    y = torch.tensor([3, 1, 4, 1])
    v_c, v_u = model(x, t, y), model(x, t, torch.full_like(y, common.NO_LABEL))
    for shape in ("constant", "ramp"):  # W = 1: the conditional field, either shape
        assert torch.equal(common.guided(model, y, 1, shape)(x, t), v_c)
    assert torch.equal(common.guided(model, y, 0, "constant")(x, t), v_u)
    torch.testing.assert_close(common.guided(model, y, 2.5, "constant")(x, t),
                               v_u + 2.5 * (v_c - v_u))
    # the ramp W(t) = 1 + (W - 1) t, the default
    w_t = (1 + 3 * t).view(4, 1, 1, 1)
    torch.testing.assert_close(common.guided(model, y, 4)(x, t), v_u + w_t * (v_c - v_u))
    ends = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # the conditional field, W
    v_c, v_u = model(x, ends, y), model(x, ends, torch.full_like(y, common.NO_LABEL))
    torch.testing.assert_close(common.guided(model, y, 4)(x, ends),
                               torch.stack([v_c[0], v_u[1] + 4 * (v_c[1] - v_u[1]), v_c[2],
                                            v_u[3] + 4 * (v_c[3] - v_u[3])]))
    torch.testing.assert_close(common.guided(model, y, 0)(x, ends), torch.stack(
        [v_c[0], v_u[1], v_c[2], v_u[3]]))  # ramp to 0: from the conditional field to v_u
    assert [common.evaluations_per_step(w, "constant") for w in (0, 1, 2.5)] == [1, 1, 2]
    assert [common.evaluations_per_step(w, "ramp") for w in (0, 1, 2.5)] == [2, 1, 2]
    with pytest.raises(ValueError, match="unknown guidance shape 'cosine'; known: ramp, constant"):
        common.guided(model, y, 2, "cosine")
    # what a sampling really evaluates: rows through the network = nfe x per x B
    rows = []
    def counted(x, t, labels):
        rows.append(len(x))
        return model(x, t, labels)
    for w, shape in [(4, "ramp"), (0, "ramp"), (1, "ramp"), (0, "constant"), (2, "constant")]:
        rows.clear()
        common.sample(common.guided(counted, y, w, shape), x, 3, "heun-euler")
        assert sum(rows) == common.nfe("heun-euler", 3) * common.evaluations_per_step(w, shape) * 4

def test_conditional_training_drops_the_label_at_the_rate_asked(mnist_data, tmp_path, monkeypatch):
    import mnist
    # drop_labels: each label "no label" with probability p, independently, the others kept:
    # the share of 200,000 within 4 standard deviations of p (0.1, the default, and 0.5)
    torch.manual_seed(0)
    y = torch.randint(0, 10, (200_000,))
    for p in (0.0, 0.1, 0.5, 1.0):
        kept = common.drop_labels(y, p)
        dropped = kept == common.NO_LABEL
        sd = math.sqrt(p * (1 - p) / len(y))
        assert dropped.double().mean().item() == pytest.approx(p, abs=4 * sd + 1e-12), p
        assert torch.equal(kept[~dropped], y[~dropped])
    # training: each batch's labels go through drop_labels with --label-drop (default 0.1), and
    # what it returns is what the network reads
    seen, asked = [], []
    real_forward, real_drop = UNet.forward, common.drop_labels
    def spy(self, x, t, y=None):
        if self.training and torch.is_grad_enabled():
            seen.append(y.clone())
        return real_forward(self, x, t, y)
    monkeypatch.setattr(UNet, "forward", spy)
    monkeypatch.setattr(mnist, "drop_labels", lambda y, p: asked.append(p) or real_drop(y, p))
    run_mnist(mnist_data, tmp_path / "default", "--epochs", "1", "--conditional", "--ema", "0")
    assert asked == [0.1] * 3  # 48 images, 3 batches of 16
    labels = common.load_images("MNIST", str(mnist_data), labels=True)[1]
    for drop in ("0", "1"):
        seen.clear()
        run_mnist(mnist_data, tmp_path / drop, "--epochs", "1", "--conditional", "--label-drop",
                  drop, "--ema", "0")
        y = torch.cat(seen)
        if drop == "0":  # every digit once, with its own class
            assert sorted(y.tolist()) == sorted(labels.tolist())
        else:
            assert y.tolist() == [common.NO_LABEL] * 48

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_velocity_is_affine_in_the_score(schedule):
    # section 6: for X_0 ~ N(0, I) independent of X_1, whatever X_1 is, v_t(x) = (dbeta / beta) x
    # + alpha (alpha dbeta - beta dalpha) / beta s_t(x), s_t the score of p_t. Checked on a
    # Gaussian mixture, where E[X_1 | x_t] and log p_t(x) both have closed forms.
    torch.manual_seed(0)
    d = 3
    m = 2 * torch.randn(4, d, dtype=torch.float64)                 # the components' means,
    s2 = torch.tensor([0.1, 0.5, 1.0, 0.02], dtype=torch.float64)  # variances (times I),
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)    # and weights
    x = (1.5 * torch.randn(50, d, dtype=torch.float64)).requires_grad_(True)
    for t in torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64):
        alpha, beta, dalpha, dbeta = schedule(t)
        var = alpha ** 2 + beta ** 2 * s2                           # X_t | k ~ N(beta m_k, var_k I)
        log_pk = (w.log() - d / 2 * torch.log(2 * math.pi * var)
                  - (x[:, None] - beta * m).pow(2).sum(-1) / (2 * var))  # (50, 4)
        score, = torch.autograd.grad(torch.logsumexp(log_pk, 1).sum(), x)
        post = torch.softmax(log_pk, 1).detach()                     # P(k | x_t)
        ex1_k = m + (beta * s2 / var)[:, None] * (x.detach()[:, None] - beta * m)  # E[X_1 | x, k]
        ex1 = (post[..., None] * ex1_k).sum(1)
        ex0 = (x.detach() - beta * ex1) / alpha
        v = dalpha * ex0 + dbeta * ex1                               # Eq. 6, exactly
        slope = alpha * (alpha * dbeta - beta * dalpha) / beta
        identity = dbeta / beta * x.detach() + slope * score
        torch.testing.assert_close(v, identity, rtol=1e-10, atol=1e-10)

def test_conditional_sampling_asks_for_each_digit_in_turn_and_writes_the_labels(mnist_data,
                                                                                tmp_path, capsys):
    import mnist
    out = tmp_path / "c"
    run_mnist(mnist_data, out, "--epochs", "1", "--conditional")
    ckpt = torch.load(out / "epoch001.pt", weights_only=True)
    assert ckpt["config"]["conditional"] is True
    capsys.readouterr()
    run_mnist(mnist_data, out, "--sample", "12", "--guidance", "2", "--nfe", "6")
    printed = capsys.readouterr().out
    assert "(6 network evaluations each, two per solver evaluation: guidance 2, ramp)" in printed
    assert torch.load(out / "samples-labels.pt", weights_only=True).tolist() == [*range(10), 0, 1]
    run_mnist(mnist_data, out, "--sample", "5", "--digit", "7")
    assert torch.load(out / "samples-labels.pt", weights_only=True).tolist() == [7] * 5
    from PIL import Image
    assert Image.open(out / "strip.png").size == (30 * 8 + 2, 30 * 5 + 2)  # a row per W
    assert "rows: guidance 1, 2, 4, 6, 8, ramp" in capsys.readouterr().out
    # the default budget: GUIDED_NFE when guided (10 steps of heun-euler: 19 solver
    # evaluations, two network evaluations each), 20 when W = 1 takes one
    for flags, expect in [([], "heun-euler, 10 steps on the early grid (38 network evaluations "
                           "each, two per solver evaluation: guidance 4, ramp)"),
                          (["--guidance-shape", "constant", "--guidance", "0"],
                           "heun-euler, 10 steps on the early grid (19 network evaluations each)"),
                          (["--guidance", "1"], "(19 network evaluations each)")]:
        mnist.main(["--data", str(mnist_data), "--out", str(out), "--device", "cpu", "--sample",
                    "3", *flags])  # run_mnist would give --nfe
        assert expect in capsys.readouterr().out
    # bad input, one line each
    expect_error("argument --digit: invalid choice: 12", run_mnist, mnist_data, out, "--sample",
                 "4", "--digit", "12")
    expect_error("argument --guidance: invalid non_negative_float value: '-1'", run_mnist,
                 mnist_data, out, "--sample", "4", "--guidance", "-1")
    run_mnist(mnist_data, tmp_path / "u", "--epochs", "1")
    expect_error("--digit: ", run_mnist, mnist_data, tmp_path / "u", "--sample", "4", "--digit",
                 "3")
    expect_error("is not a conditional model (mnist.py --conditional trains one)", run_mnist,
                 mnist_data, tmp_path / "u", "--sample", "4", "--guidance", "2")
    expect_error("--guidance: ", run_mnist, mnist_data, tmp_path / "u", "--resume", "--epochs", "2",
                 "--guidance", "2")  # resuming an unconditional run: refused, not ignored
    expect_error("--guidance-shape: ", run_mnist, mnist_data, tmp_path / "u", "--sample", "4",
                 "--guidance-shape", "constant")
    expect_error("--guidance-shape is for a conditional model: add --conditional", run_mnist,
                 mnist_data, tmp_path / "v", "--epochs", "1", "--guidance-shape", "constant")
    expect_error("argument --guidance-shape: invalid choice: 'cosine'", run_mnist, mnist_data,
                 out, "--sample", "4", "--guidance-shape", "cosine")

def test_a_resumed_conditional_run_samples_its_pictures_as_asked_now(mnist_data, tmp_path,
                                                                   capsys, monkeypatch):
    import mnist
    # the pictures' sampler, recorded as each run calls it (and not run: the lines say it)
    seen = []
    monkeypatch.setattr(mnist, "generate", lambda model, x0, steps, device, dtype, solver, ts,
                        **k: seen.append((solver, steps, k["w"], k["shape"]))
                        or torch.zeros(len(x0), 1, 28, 28))
    out = tmp_path / "c"
    run_mnist(mnist_data, out, "--epochs", "1", "--conditional", "--guidance-shape", "constant")
    assert "pictures: euler, 1 steps on the early grid (2 network evaluations)" in \
        capsys.readouterr().out  # --nfe 3 with guidance's two: one Euler step
    mnist.main(["--data", str(mnist_data), "--out", str(out), "--batch-size", "16", "--device",
                "cpu", "--resume", "--epochs", "2"])  # --nfe and the shape: today's defaults
    assert "pictures: heun-euler, 10 steps on the early grid (38 network evaluations)" in \
        capsys.readouterr().out
    run_mnist(mnist_data, out, "--resume", "--epochs", "3", "--guidance", "1")
    assert "pictures: euler, 3 steps on the early grid (3 network evaluations)" in \
        capsys.readouterr().out
    assert seen == [("euler", 1, 4.0, "constant"), ("heun-euler", 10, 4.0, "ramp"),
                    ("euler", 3, 1.0, "ramp")]

def test_translate_draws_a_chosen_digit_as_mnist_py_does(both_data, tmp_path, capsys):
    import translate
    out = tmp_path / "t"
    run_translate(both_data, out, "--epochs", "1", "--conditional")
    capsys.readouterr()
    translate.main(["--data", str(both_data), "--out", str(out), "--device", "cpu", "--sample",
                    "3", "--digit", "5", "--guidance-shape", "constant"])
    printed = capsys.readouterr().out
    assert "midpoint, 10 steps on the early grid (40 network evaluations each, two per solver " \
        "evaluation: guidance 4, constant)" in printed  # the linear schedule's sampler
    assert "rows: guidance 0, 1, 1.5, 2, 3, constant" in printed
    assert torch.load(out / "samples-labels.pt", weights_only=True).tolist() == [5] * 3
    # without --digit: digits.png, each of the first 8 garments, then it as 0, 1, ..., 9
    run_translate(both_data, out, "--sample", "8", "--digit", "3")
    threes = torch.load(out / "samples.pt", weights_only=True)
    run_translate(both_data, out, "--sample", "2")
    cells = png_cells(out / "digits.png", 8, 11)
    garments = common.to_unit(common.load_images("FashionMNIST", str(both_data), train=False))
    torch.testing.assert_close(cells[:, 0], garments[:8, 0].double(), rtol=0,
                               atol=0.5 / 255 + 1e-9)
    torch.testing.assert_close(cells[:, 4], threes[:, 0].double(), rtol=0, atol=0.5 / 255 + 1e-9)
    assert not torch.equal(cells[:, 4], cells[:, 5])  # a 3 is not a 4
    run_translate(both_data, tmp_path / "u", "--epochs", "1")
    expect_error("--guidance-shape: ", run_translate, both_data, tmp_path / "u", "--sample", "2",
                 "--guidance-shape", "ramp")
    expect_error("--guidance-shape is for a conditional model: add --conditional", run_translate,
                 both_data, tmp_path / "v", "--epochs", "1", "--guidance-shape", "ramp")

def test_evaluate_reads_the_labels_asked_and_sweeps_the_guidance(evaluated, tmp_path, capsys):
    run, data = evaluated[:2]
    out = tmp_path / "c"
    run_mnist(data, out, "--epochs", "1", "--limit", "48", "--conditional")
    # a samples.pt with its labels beside it: the share read as the digit asked
    run_mnist(data, out, "--sample", "20")
    labels = torch.load(out / "samples-labels.pt", weights_only=True)
    r = run(str(out / "samples.pt"))
    hits = (r["pred"] == labels).double()
    assert r["asked"] == pytest.approx(hits.mean().item())
    per = re.search(r"read as the digit asked, per digit \(%\)  (.*)", capsys.readouterr().out)
    assert [float(p.split(":")[1]) for p in per.group(1).split()] == pytest.approx(
        [100 * hits[labels == d].mean().item() for d in range(10)], abs=0.05)
    # the real test digits, their own labels beside them: all read as asked
    images, classes = common.load_images("MNIST", str(data), train=False, labels=True)
    torch.save(common.to_unit(images), tmp_path / "real.pt")
    torch.save(classes, tmp_path / "real-labels.pt")
    assert run(str(tmp_path / "real.pt"))["asked"] == 1.0
    # --guidance: each W and shape from the same noise, with mnist.py --sample's sampler
    rows = run(str(out), "--guidance", "0", "1", "2", "--guidance-shape", "ramp", "constant",
               "--n", "20", "--seeds", "0")
    assert [(r["shape"], r["guidance"], r["nfe"]) for r in rows] == [
        ("ramp", 0, 38), ("ramp", 1, 19), ("ramp", 2, 38),
        ("constant", 0, 19), ("constant", 1, 19), ("constant", 2, 38)]
    assert rows[1]["fid"] == rows[4]["fid"]  # W = 1: the conditional field, either shape
    assert rows[0]["fid"] != rows[3]["fid"]  # W = 0: from v_c to v_u (ramp) or v_u throughout
    assert (out / "guidance.png").stat().st_size > 10_000
    with open(out / "guidance.csv") as f:
        assert [float(r["fid"]) for r in csv.DictReader(f)] == [r["fid"] for r in rows]
    expect_error("is a conditional run: score it with --guidance", run, str(out))
    expect_error("is a conditional run: score it with --guidance", run, str(out), "--path")
    run_mnist(data, tmp_path / "u", "--epochs", "1", "--limit", "48")
    expect_error("is not a conditional run", run, str(tmp_path / "u"), "--guidance", "2")
    expect_error("--guidance-shape is for the sweep over --guidance W...: add --guidance", run,
                 str(out), "--guidance-shape", "constant")
    expect_error("--guidance-shape is for the sweep over --guidance W...: add --guidance", run,
                 str(out / "samples.pt"), "--guidance-shape", "ramp")
    expect_error("--nfe is for the sweep over solvers; --guidance samples with mnist.py --sample's",
                 run, str(out), "--guidance", "2", "--nfe", "4")

# -----------------------------------------------------------------------------
# reflow: straightness, reflow.py (section 7)

def test_straightness_is_0_for_straight_paths_and_the_closed_form_for_exponential_ones():
    # straight lines at constant speed to one point x*: v = (x* - x) / (1 - t), S = 0
    target = torch.randn(64, 5, dtype=torch.float64)
    to_target = lambda x, t: (target - x) / (1 - t.view(-1, 1))
    x0 = torch.randn(64, 5, dtype=torch.float64)
    assert common.straightness(to_target, x0, 10) == pytest.approx(0, abs=1e-12)
    # v = a x, a rate per dimension: x_t = x_0 e^(at), x_1 - x_0 = x_0 (e^a - 1), and
    # E x_0^2 = 1 in each: S_d = int_0^1 (a e^(at) - (e^a - 1))^2 dt = a (e^(2a) - 1) / 2 -
    # (e^a - 1)^2, and S is their mean over the dimensions (per dimension: not their sum)
    a = torch.tensor([0.8, 0.3, -0.5], dtype=torch.float64)
    exact = [r * (math.exp(2 * r) - 1) / 2 - (math.exp(r) - 1) ** 2 for r in a.tolist()]
    x0 = torch.randn(100_000, 3, dtype=torch.float64)
    x0 = x0 / x0.pow(2).mean(0).sqrt()  # E x_0^2 = 1 exactly, in each dimension
    S = common.straightness(lambda x, t: a * x, x0, 2000)
    assert S == pytest.approx(sum(exact) / 3, rel=2e-3)  # Euler's O(h) error
    # each point on its own cosine arc to its own x_1: no crossing, yet S > 0, in closed form
    # (common.arc_straightness), here for images (B, 1, 4, 4) whose ends are correlated
    x0 = torch.randn(2000, 1, 4, 4, dtype=torch.float64)
    x1 = 0.5 * x0 + torch.rand(2000, 1, 4, 4, dtype=torch.float64)
    h = math.pi / 2
    def arc(x, t):  # the arc through x at t that ends at x1: x0 = (x - sin x1) / cos
        c, s = torch.cos(h * t).view(-1, 1, 1, 1), torch.sin(h * t).view(-1, 1, 1, 1)
        return h * (c * x1 - s * (x - s * x1) / c)
    S = common.straightness(arc, x0, 2000)
    ends = x0.pow(2).mean() + x1.pow(2).mean()
    exact = ((math.pi ** 2 / 8 - 1) * ends - (math.pi / 2 - 2) * (x0 * x1).mean()).item()
    assert common.arc_straightness(x0, x1) == pytest.approx(exact, rel=1e-12)
    assert S == pytest.approx(exact, rel=5e-3) and S > 0.2

def run_reflow(out, *extra):
    import reflow
    return reflow.main(["--out", str(out), "--batch-size", "16", "--nfe", "3", "--device", "cpu",
                        *extra])

def test_reflow_learns_the_teachers_samples_of_its_noise_and_resume_reuses_them(
        mnist_data, tmp_path, monkeypatch):
    import reflow
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    run_mnist(mnist_data, teacher, "--epochs", "1")
    # the loss gets each pair's own noise and digit: record what the loop hands it
    seen = []
    def recording_loss(model, x0, x1, *rest):
        seen.append((x0.clone(), x1.clone()))
        return fm_loss(model, x0, x1, *rest)
    monkeypatch.setattr(reflow, "fm_loss", recording_loss)
    run_reflow(student, "--teacher", str(teacher), "--pairs", "12", "--epochs", "1", "--lr", "1e-9")
    # the pairs: fixed noise none of --sample's noise sets holds, and the teacher's samples of
    # it with its --nfe 20 sampler (float16: to 1e-3), within Euler's error of its flow
    pairs = torch.load(student / "pairs.pt", weights_only=True)
    x0 = common.fixed_noise(12, reflow.PAIR_SEED)
    assert pairs["teacher"] == str(teacher) and pairs["x1"].dtype == torch.float16
    assert not any(torch.equal(x0[:2], common.fixed_noise(2, seed)) for seed in range(10))
    model, config = common.load_model(teacher / "ckpt.pt", torch.device("cpu"))
    cpu, dtype = torch.device("cpu"), common.pick_dtype("auto", torch.device("cpu"))
    solver, steps, grid = common.plan(20, config["schedule"])
    ts = common.time_grid(grid, steps, config["schedule"])
    x1 = common.generate(model, x0, steps, cpu, dtype, solver, ts) * 2 - 1
    torch.testing.assert_close(pairs["x1"].float(), x1, rtol=0, atol=1e-3)
    fine = common.generate(model, x0, 400, cpu, torch.float32) * 2 - 1  # Euler, 400 steps
    assert (pairs["x1"].float() - fine).abs().mean() < 0.05
    # every pair once an epoch, each noise image with the digit the teacher carried it to
    got0, got1 = (torch.cat([p[i] for p in seen]) for i in (0, 1))
    assert len(got0) == 12
    match = torch.cdist(got0.flatten(1), x0.flatten(1)).argmin(1)  # which pair's noise
    assert sorted(match.tolist()) == list(range(12))
    torch.testing.assert_close(got0, x0[match], rtol=0, atol=0)
    torch.testing.assert_close(got1, pairs["x1"].float()[match], rtol=0, atol=0)
    # the student starts as the teacher (its averaged weights), with reflow.py's own settings
    ckpt = torch.load(student / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "reflow.py"
    assert ckpt["config"]["schedule"] == "linear" and ckpt["config"]["t_dist"] == "half-zero"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=0, atol=1e-6)
    # --resume reads the pairs back: the teacher is not needed, the file is not rewritten
    monkeypatch.setattr(reflow, "load_teacher", lambda *a: pytest.fail("asked for the teacher"))
    before = (student / "pairs.pt").stat().st_mtime_ns
    run_reflow(student, "--resume", "--epochs", "2")
    assert (student / "pairs.pt").stat().st_mtime_ns == before
    assert torch.load(student / "ckpt.pt", weights_only=True)["epoch"] == 2
    # its checkpoint samples with one Euler step with --nfe 1, from the noise of --seed
    run_reflow(student, "--sample", "4", "--nfe", "1")
    student_model, _ = common.load_model(student / "ckpt.pt", cpu)
    one_step = common.generate(student_model, common.fixed_noise(4, 0), 1, cpu, dtype, "euler",
                               common.time_grid("uniform", 1))
    assert torch.equal(torch.load(student / "samples.pt", weights_only=True), one_step)
    # a setting given wins over reflow.py's defaults
    monkeypatch.undo()
    run_reflow(tmp_path / "given", "--teacher", str(teacher), "--pairs", "12", "--epochs", "1",
               "--t-dist", "uniform")
    config = torch.load(tmp_path / "given" / "ckpt.pt", weights_only=True)["config"]
    assert (config["schedule"], config["t_dist"]) == ("linear", "uniform")
    # other pairs in OUT are never taken for these
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pairs.pt").write_bytes((student / "pairs.pt").read_bytes())
    expect_error("holds other pairs than those of --teacher", run_reflow, tmp_path / "other",
                 "--teacher", str(teacher), "--pairs", "10")

def test_a_reflow_run_of_mnist_py_is_reflow_py_s(mnist_data, tmp_path):
    # a student that mnist.py --pairing reflow wrote, before reflow.py (weights/mnist-reflow is
    # one): reflow.py samples and resumes it, mnist.py sends it there
    run_mnist(mnist_data, tmp_path / "teacher", "--epochs", "1")
    run_reflow(tmp_path / "old", "--teacher", str(tmp_path / "teacher"), "--pairs", "12",
               "--epochs", "1")
    ckpt = torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)
    ckpt["script"], ckpt["config"]["pairing"] = "mnist.py", "reflow"
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    assert common.written_by(ckpt) == "reflow.py"
    run_reflow(tmp_path / "old", "--sample", "4", "--nfe", "1")
    run_reflow(tmp_path / "old", "--resume", "--epochs", "2")
    assert torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)["script"] == "reflow.py"
    ckpt["epoch"] = 1
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    expect_error("is a run of reflow.py, not of mnist.py: use reflow.py", run_mnist, mnist_data,
                 tmp_path / "old", "--sample", "4")

def test_reflow_bad_input_is_one_line(mnist_data, tmp_path):
    expect_error(f"no checkpoint at {tmp_path / 'nothing' / 'ckpt.pt'}", run_reflow,
                 tmp_path / "o", "--teacher", str(tmp_path / "nothing"))
    expect_error("reflow.py needs --teacher RUN", run_reflow, tmp_path / "o")
    for flag in ("--pairing", "--conditional", "--dequantize", "--limit", "--data"):
        expect_error(f"unrecognized arguments: {flag}", run_reflow, tmp_path / "o", "--teacher",
                     str(tmp_path), flag)  # noise and the teacher's digits, nothing else
    expect_error("unrecognized arguments: --teacher", run_mnist, mnist_data, tmp_path / "o",
                 "--teacher", str(tmp_path))
    run_mnist(mnist_data, tmp_path / "cond", "--epochs", "1", "--conditional", "--limit", "16")
    expect_error("is a conditional run; reflow learns an unconditional one", run_reflow,
                 tmp_path / "o", "--teacher", str(tmp_path / "cond"))
    run_mnist(mnist_data, tmp_path / "wide", "--epochs", "1", "--width", "8", "--limit", "16")
    expect_error("is not the handout's U-Net (--width or --predict)", run_reflow,
                 tmp_path / "o", "--teacher", str(tmp_path / "wide"))
    run_translate(write_idx(mnist_data, "FashionMNIST", n_train=40, n_test=24, seed=1),
                  tmp_path / "t", "--epochs", "1", "--limit", "16")
    expect_error("is a run of translate.py, not of mnist.py or reflow.py", run_reflow,
                 tmp_path / "o", "--teacher", str(tmp_path / "t"))
    assert not (tmp_path / "o" / "ckpt.pt").exists()

def test_evaluate_sets_runs_side_by_side_with_their_own_samplers_and_straightness(evaluated,
                                                                                 tmp_path):
    run, data = evaluated[:2]
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    run_mnist(data, teacher, "--epochs", "1", "--limit", "48")
    run_reflow(student, "--epochs", "1", "--teacher", str(teacher), "--pairs", "16")
    rows = run(str(student), "--also", str(teacher), "--nfe", "1", "2", "--n", "20")
    # each run with the sampler mnist.py --sample --nfe K takes for it, on both noise sets
    samplers = {(str(d), k): "-".join(map(str, common.plan(k, schedule, reflowed=d == student)))
                for d, schedule in ((student, "linear"), (teacher, "cosine")) for k in (1, 2)}
    assert [(r["run"], r["nfe"], r["sampler"], r["seed"]) for r in rows] == [
        (str(d), k, samplers[str(d), k], seed) for d in (student, teacher) for k in (1, 2)
        for seed in (0, 1)]
    for d in (student, teacher):  # Liu et al.'s straightness, from the first noise set
        model, _ = common.load_model(d / "ckpt.pt", torch.device("cpu"))
        s = common.straightness(model, common.fixed_noise(20, 0))
        assert {r["straightness"] for r in rows if r["run"] == str(d)} == {round(s, 4)}
    with open(student / "compare.csv") as f:
        assert [r["fid"] for r in csv.DictReader(f)] == [str(r["fid"]) for r in rows]
    assert (student / "compare.png").stat().st_size > 10_000
    from PIL import Image  # 8 images a row: a row for each run and budget
    assert Image.open(student / "compare-samples.png").size == (8 * 30 + 2, 4 * 30 + 2)

# -----------------------------------------------------------------------------
# mean flows: the average velocity over an interval (section 7)

def test_the_mean_flow_identity_holds_for_fields_whose_flow_is_known():
    # dx/dt = a x: x_e = x e^(a (e - s)), so u(x, s, e) = x (e^(a h) - 1) / h, h = e - s (a x at
    # h = 0); dx/dt = c t: x_e = x + c (e^2 - s^2) / 2, u = c (e + s) / 2. For both the target
    # v + (e - s) du/ds, its total derivative taken by the Jacobian-vector product, is u itself
    torch.manual_seed(0)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    s = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.2], dtype=torch.float64)
    e = torch.tensor([1.0, 0.1, 0.9, 0.6, 1.0, 0.2], dtype=torch.float64)  # two with e = s
    col = lambda q: q.view(-1, 1, 1, 1)
    a, c = 0.7, -1.3
    def u_linear(x, s, e):
        h = col(e - s)
        safe = torch.where(h > 0, h, torch.ones_like(h))
        return x * torch.where(h > 0, torch.expm1(a * safe) / safe, torch.full_like(h, a))
    u, target = common.mean_flow_target(u_linear, x, s, e, a * x)
    torch.testing.assert_close(target, u, rtol=1e-12, atol=1e-12)
    u_time = lambda x, s, e: col(c * (e + s) / 2).expand_as(x)
    u, target = common.mean_flow_target(u_time, x, s, e, col(c * s).expand_as(x))
    torch.testing.assert_close(target, u, rtol=1e-12, atol=1e-12)
    # a wrong u (the instantaneous field held over the interval) misses it where e > s
    u, target = common.mean_flow_target(lambda x, s, e: a * x, x, s, e, a * x)
    assert (target - u).flatten(1).abs().amax(1)[[0, 2]].min() > 0.1
    # and one jump of the exact u is the exact flow: x_0 -> x_0 e^a
    field = lambda x, s, e: u_linear(x, s, e)
    torch.testing.assert_close(common.mean_flow_sample(field, x, 1), x * math.exp(a))
    torch.testing.assert_close(common.mean_flow_sample(field, x, 3), x * math.exp(a))

def test_the_jacobian_vector_product_matches_finite_differences():
    torch.manual_seed(0)
    model = common.MeanFlowUNet().double()
    x, v = torch.randn(3, 1, 28, 28, dtype=torch.float64), torch.randn(3, 1, 28, 28,
                                                                        dtype=torch.float64)
    s = torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64)
    e = torch.tensor([0.9, 0.5, 0.4], dtype=torch.float64)
    u, target = common.mean_flow_target(model, x, s, e, v)  # v + (e - s) du/ds
    torch.testing.assert_close(u, model(x, s, e))
    # du/ds along (v, 1, 0): x and s move together, e stays. The U-Net is linear between the
    # kinks of its ReLUs and max-pools, so a step small enough to cross none gives it exactly
    eps = 1e-8
    fd = (model(x + eps * v, s + eps, e) - model(x - eps * v, s - eps, e)) / (2 * eps)
    h = (e - s).view(-1, 1, 1, 1)
    apart = e > s
    torch.testing.assert_close(((target - v) / h)[apart], fd[apart], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target[~apart], v[~apart])  # e = s: the target is v
    # at e = s the network is a flow matching network of s: its loss there is fm_loss
    x0, x1 = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.randn(4, 1, 28, 28,
                                                                          dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    loss, mse = common.mean_flow_loss(model, x0, x1, linear, t, t, p=0.0)
    assert loss.item() == pytest.approx(mse.item()) == pytest.approx(
        fm_loss(lambda x, t: model(x, t, t), x0, x1, linear, t).item())

def test_mean_flow_intervals_are_drawn_as_the_paper_draws_them():
    torch.manual_seed(0)
    s, e = common.draw_interval(200_000, ratio=0.25, mean=0.4, std=1.0)
    assert (s <= e).all() and 0 < s.min() and e.max() < 1
    assert (e > s).double().mean().item() == pytest.approx(0.25, abs=0.004)
    # each time alone: sigmoid(N(0.4, 1)), P(t < 1/2) = Phi(-0.4) = 0.3446; s, the smaller of
    # two, P(s < 1/2) = 1 - (1 - 0.3446)^2 = 0.5705 where the two differ
    apart = e > s  # about 50,000: 4 standard deviations of the share are 0.009
    assert (s[apart] < 0.5).double().mean().item() == pytest.approx(0.5705, abs=0.009)

def run_meanflow(data, out, *extra):
    import meanflow
    return meanflow.main(["--data", str(data), "--out", str(out), "--batch-size", "16",
                          "--device", "cpu", *extra])

def test_meanflow_trains_samples_resumes_and_is_scored_beside_a_flow(evaluated, tmp_path,
                                                                    monkeypatch):
    import meanflow
    run, data = evaluated[:2]
    out = tmp_path / "mf"
    # the loss gets intervals s <= e, some apart, some not
    seen = []
    def recording_loss(model, x0, x1, schedule, s, e, p):
        seen.append((s, e))
        return common.mean_flow_loss(model, x0, x1, schedule, s, e, p)
    monkeypatch.setattr(meanflow, "mean_flow_loss", recording_loss)
    run_meanflow(data, out, "--epochs", "2", "--limit", "48")
    monkeypatch.undo()
    s = torch.cat([a for a, _ in seen])
    e = torch.cat([b for _, b in seen])
    assert len(s) == 96 and (s <= e).all() and (e > s).any() and (e == s).any()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "meanflow.py" and ckpt["epoch"] == 2
    assert ckpt["config"]["ratio"] == 0.25 and ckpt["config"]["norm_p"] == 1.0
    # resumed after epoch 1, it ends with the same weights
    run_meanflow(data, tmp_path / "b", "--epochs", "1", "--limit", "48")
    run_meanflow(data, tmp_path / "b", "--epochs", "2", "--resume")
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], b["model"][k]) for k in ckpt["model"])
    # --sample: --nfe jumps of the averaged weights from the noise of --seed
    run_meanflow(data, out, "--sample", "6", "--nfe", "2")
    model, _ = common.load_model(out / "ckpt.pt", torch.device("cpu"))
    expected = common.to_unit(common.mean_flow_sample(model, common.fixed_noise(6, 0), 2))
    torch.testing.assert_close(torch.load(out / "samples.pt", weights_only=True), expected)
    # evaluate.py: beside a flow, each sampled its own way, and a curve of its epochs
    run_mnist(data, tmp_path / "flow", "--epochs", "1", "--limit", "48")
    rows = run(str(out), "--also", str(tmp_path / "flow"), "--nfe", "1", "2", "--n", "20",
               "--seeds", "0")
    assert [(r["sampler"], r["nfe"]) for r in rows[:2]] == [("meanflow-1", 1), ("meanflow-2", 2)]
    run_meanflow(data, out, "--sample", "20", "--nfe", "2")  # what the row at 2 scored
    assert run(str(out / "samples.pt"))["fid"] == pytest.approx(rows[1]["fid"], abs=1e-3)
    curve = run(str(out), "--curve", "--n", "20", "--seeds", "0")
    assert [(r["epoch"], r["sampler"]) for r in curve] == [(1, "meanflow-10"), (2, "meanflow-10")]
    for flags in ([], ["--path"], ["--bpd"]):
        expect_error("is a mean flow (meanflow.py): score it with --also or --curve", run,
                     str(out), *flags)
    expect_error("is a run of meanflow.py, not of mnist.py: use meanflow.py", run_mnist, data,
                 out, "--sample", "4")

# -----------------------------------------------------------------------------
# the flow as a density (section 8)

def gaussian_flow(m0, s0, m1, s1, schedule):
    """The exact marginal field carrying N(m0, s0^2 I) to N(m1, s1^2 I) along Eq. 5 with
    independent X_0, X_1: X_t ~ N(mu_t, sigma_t^2 I), mu_t = alpha m0 + beta m1, sigma_t^2 =
    alpha^2 s0^2 + beta^2 s1^2, and v_t(x) = mu_t' + (sigma_t' / sigma_t)(x - mu_t), whose
    divergence is d sigma_t' / sigma_t. Returns the field and log p_t(x)."""
    def parts(t, x):
        a, b, da, db = (u.view(-1, *[1] * (x.dim() - 1)).to(x.dtype) for u in schedule(t))
        sigma = (a * a * s0 * s0 + b * b * s1 * s1).sqrt()
        dsigma = (a * da * s0 * s0 + b * db * s1 * s1) / sigma
        return a * m0 + b * m1, da * m0 + db * m1, sigma, dsigma
    def field(x, t):
        mu, dmu, sigma, dsigma = parts(t, x)
        return dmu + dsigma / sigma * (x - mu)
    def log_p(x, t):
        mu, _, sigma, _ = parts(t.expand(len(x)), x)
        d = x[0].numel()
        return (-0.5 * ((x - mu) / sigma).flatten(1).pow(2).sum(1)
                - d * sigma.flatten(1)[:, 0].log() - d / 2 * math.log(2 * math.pi))
    return field, log_p

@pytest.mark.parametrize("d", [2, 784])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_log_likelihood_of_a_gaussian_flow_is_the_closed_form(d, schedule):
    g = torch.Generator().manual_seed(0)
    m1 = torch.linspace(-1, 1, d, dtype=torch.float64)
    field, log_p = gaussian_flow(0.5, 1.5, m1, 0.3, schedule)
    x1 = m1 + 0.3 * torch.randn(8, d, generator=g, dtype=torch.float64)
    t0, t1 = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    # the field's divergence, exact (2D) or by Hutchinson (784: exact too for this field,
    # whose Jacobian is a multiple of I), is d sigma_t' / sigma_t
    probe = None if d == 2 else common.rademacher(x1.shape, g).double()
    t = torch.tensor(0.3, dtype=torch.float64)
    v, div = common.divergence(field, x1, t, probe)
    a, b, da, db = schedule(t)
    sigma, sigma_dsigma = (a * a * 2.25 + b * b * 0.09).sqrt(), a * da * 2.25 + b * db * 0.09
    assert torch.allclose(v, field(x1, t.expand(8))) and div == pytest.approx(
        [d * sigma_dsigma.item() / sigma.item() ** 2] * 8, rel=1e-9)
    # log p_1(x_1) = log p_0(x_0) - int div: the closed form, to O(1/steps^2)
    errors = [(common.log_likelihood(field, x1, steps, probe, lambda x: log_p(x, t0))
               - log_p(x1, t1)).abs().max().item() for steps in (50, 100)]
    assert errors[1] < 4e-4 * d  # nats: under 0.0006 bits per dimension
    assert errors[0] / errors[1] == pytest.approx(4, rel=0.1)  # the midpoint rule's order 2

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_log_likelihood_of_a_target_as_narrow_as_a_grey_level(schedule):
    # s' = 0.005, the half-width of a dequantised pixel's bin: the field contracts fast near
    # t = 1, where log_likelihood's grid is dense (uniform steps: 0.42 and 0.66 bits per
    # dimension off)
    d = 784
    m1 = torch.linspace(-1, 1, d, dtype=torch.float64)
    field, log_p = gaussian_flow(0.0, 1.0, m1, 0.005, schedule)
    x1 = m1 + 0.005 * torch.randn(8, d, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64)
    t0, t1 = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    probe = common.rademacher(x1.shape).double()  # exact here: the Jacobian is a multiple of I
    log_p1 = common.log_likelihood(field, x1, 100, probe, lambda x: log_p(x, t0))
    error = (log_p1 - log_p(x1, t1)).abs().max().item() / (d * math.log(2))
    assert error < 0.001  # bits per dimension

def test_log_likelihood_of_a_linear_field_and_its_fixed_probe():
    # dx/dt = A x carries x_0 to x_1 = e^A x_0, with div v = tr A all along: log p_1(x_1) =
    # log N(e^-A x_1; 0, I) - tr A. A is not a multiple of I, so Hutchinson's z^T A z differs
    # from tr A, by the same amount at every step when the probe is fixed along the path.
    g = torch.Generator().manual_seed(0)
    d = 5
    A = 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64)
    field = lambda x, t: x @ A.T
    x1 = torch.randn(4, d, generator=g, dtype=torch.float64)
    exact = (common.standard_normal_log_density(x1 @ torch.linalg.matrix_exp(-A).T)
             - A.trace())
    log_p = common.log_likelihood(field, x1, 100)
    assert (log_p - exact).abs().max().item() < 2e-3
    probe = common.rademacher(x1.shape, g).double()
    estimate = common.log_likelihood(field, x1, 100, probe)
    zAz = torch.einsum("bi,ij,bj->b", probe, A, probe)
    assert not torch.allclose(zAz, A.trace().expand(4))
    assert torch.allclose(estimate - log_p, A.trace() - zAz, atol=1e-10)

def test_hutchinsons_estimate_is_unbiased_on_a_linear_field():
    g = torch.Generator().manual_seed(0)
    d, k = 20, 20000
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(k, d, generator=g, dtype=torch.float64)
    probe = common.rademacher(x.shape, g).double()
    _, est = common.divergence(lambda x, t: x @ A.T, x, torch.tensor(0.0), probe)
    # z^T A z = tr A + sum_{i != j} z_i z_j A_ij: mean tr A, variance 2 sum_{i != j} S_ij^2
    S = (A + A.T) / 2
    var = 2 * (S.pow(2).sum() - S.diag().pow(2).sum()).item()
    assert est.var().item() == pytest.approx(var, rel=0.05)
    assert abs(est.mean().item() - A.trace().item()) < 4 * math.sqrt(var / k)
    # each probe's estimate is z^T A z exactly, and the exact divergence is tr A
    assert torch.allclose(est, torch.einsum("bi,ij,bj->b", probe, A, probe))
    _, exact = common.divergence(lambda x, t: x @ A.T, x[:3], torch.tensor(0.0))
    assert torch.allclose(exact, A.trace().expand(3))

def test_exact_divergence_of_a_nonlinear_2d_field():
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64)
    field = lambda x, t: torch.stack([x[:, 0] ** 2 * x[:, 1] * t, torch.sin(x[:, 1])], 1)
    _, div = common.divergence(field, x, torch.tensor(2.0, dtype=torch.float64))
    assert div.tolist() == pytest.approx((2 * 2 * x[:, 0] * x[:, 1] + torch.cos(x[:, 1])).tolist())

def test_dequantisation_stays_in_each_grey_levels_bin_and_a_uniform_density_is_8_bits():
    pixels = torch.arange(256).float().view(1, 1, 16, 16)
    x = pixels / 127.5 - 1                       # load_images' scale
    y = common.dequantize(x.expand(1000, -1, -1, -1), torch.Generator().manual_seed(0))
    assert ((y - x).abs() <= 1 / 255).all()      # within half a level of its own value
    assert (y - x).std().item() == pytest.approx(2 / 255 / math.sqrt(12), rel=0.02)  # uniform
    # the uniform density on the 256 bins' union, [-1 - 1/255, 1 + 1/255]^d: 8 bits a pixel
    for d in (784, 2):
        assert common.bits_per_dim(torch.tensor(-d * math.log(2 + 2 / 255)), d).item() == \
            pytest.approx(8)

def test_dequantize_trains_on_each_digit_moved_within_its_grey_levels_bins(mnist_data, tmp_path,
                                                                          monkeypatch):
    import mnist
    targets = []
    def recording_loss(model, x0, x1, *rest, **kw):
        targets.append(x1.flatten(1))
        return fm_loss(model, x0, x1, *rest, **kw)
    monkeypatch.setattr(mnist, "fm_loss", recording_loss)
    run_mnist(mnist_data, tmp_path / "o", "--epochs", "2", "--dequantize")
    x1 = torch.cat(targets)
    digits = common.load_images("MNIST", str(mnist_data)).flatten(1)
    nearest = torch.cdist(x1, digits).argmin(1)
    moved = x1 - digits[nearest]
    assert len(x1) == 96 and (moved.abs() <= 1 / 255 + 1e-6).all()  # within its bin
    assert moved.std().item() == pytest.approx(2 / 255 / math.sqrt(12), rel=0.05)  # uniform there
    assert not torch.equal(moved[:48].flatten().sort().values,  # afresh each epoch
                           moved[48:].flatten().sort().values)

def linear_unet(lam, bias):
    """A U-Net whose field is v(x, t) = lam x + bias, exactly: the first block's convolutions
    pass relu(x) and relu(-x) through two channels, the skip carries them to the last block,
    which passes them on, and the output is lam relu(x) - lam relu(-x) + bias; every other
    weight is 0."""
    model = UNet()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        first, second = model.enc1.net[0], model.enc1.net[2]
        first.weight[0, 0, 1, 1], first.weight[1, 0, 1, 1] = 1, -1  # x, -x (3x3 centre)
        for conv in (second, model.dec1.net[0], model.dec1.net[2]):
            conv.weight[0, 0, 1, 1] = conv.weight[1, 1, 1, 1] = 1    # passed on
        model.out.weight[0, :2, 0, 0] = torch.tensor([lam, -lam])
        model.out.bias.fill_(bias)
    return model

@pytest.mark.parametrize("sched", SCHEDULES)
def test_the_clipped_field_ends_at_the_clipped_guess(sched):
    # the field of the paths through x that all end at one image e: v = dalpha x0 + dbeta e,
    # x0 = (x - beta e) / alpha. Its guess of x1 is e; clipped, it is the field that ends at
    # e clipped to [lo, hi], and inside [lo, hi] the field itself
    def ending_at(e):
        def field(x, t):
            a, b, da, db = sched(t.view(-1, 1))
            return da * (x - b * e) / a + db * e
        return field
    g = torch.Generator().manual_seed(0)
    e = 2 * torch.randn(1, 40, generator=g, dtype=torch.float64)  # about 60% outside [-1, 1]
    lo, hi = -1 - 1 / 255, 1 + 1 / 255
    assert ((e < lo) | (e > hi)).any() and ((e > lo) & (e < hi)).any()
    x, t = torch.randn(6, 40, generator=g, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    clipped = common.ClippedX1(ending_at(e), sched)
    torch.testing.assert_close(clipped(x, t), ending_at(e.clamp(lo, hi))(x, t))
    torch.testing.assert_close(common.guess_x1(sched, t.view(-1, 1), x, clipped(x, t)),
                               e.clamp(lo, hi).expand(6, -1))
    inside = e.clamp(-0.9, 0.9)
    torch.testing.assert_close(common.ClippedX1(ending_at(inside), sched)(x, t),
                               ending_at(inside)(x, t))
    # at t = 1 (alpha = 0) the model's own field, with a finite divergence: no 0 / 0
    field = lambda x, t: -x + 0.1 * torch.sin(3 * x)
    one = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(common.ClippedX1(field, sched)(x, one), field(x, one))
    v, div = common.divergence(common.ClippedX1(field, sched), x, torch.tensor(1.0).double())
    assert torch.isfinite(v).all() and torch.isfinite(div).all()

def linear_run(folder, lam):
    """A run folder of mnist.py, linear schedule, whose field is dx/dt = lam x (linear_unet)."""
    folder.mkdir(exist_ok=True)
    torch.save({"script": "mnist.py", "ema": linear_unet(lam, 0.0).state_dict(),
                "config": {"schedule": "linear"}}, folder / "ckpt.pt")
    return str(folder)

def test_evaluate_bpd_clipped_of_a_field_whose_guess_stays_in_range(evaluated, tmp_path, capsys):
    # dx/dt = -x (linear schedule): run back from x_1, x_t = x_1 e^(1 - t), and the guess of x1,
    # x + (1 - t) v = t e^(1 - t) x_1, is never larger than x_1: clipping leaves the field alone,
    # so --clip gives the closed form log p_1(x_1) = log N(e x_1; 0, I) + 784
    run, data = evaluated[:2]
    out = linear_run(tmp_path / "run", -1.0)
    capsys.readouterr()
    r = run(out, "--bpd", "--n", "4", "--steps", "40", "--clip-x1")
    assert ", the guess of x1 clipped;" in capsys.readouterr().out
    x1 = common.dequantize(common.load_images("MNIST", str(data), train=False)[r["digits"]],
                           torch.Generator().manual_seed(0)).double()
    log_p = common.standard_normal_log_density(x1 * math.e) + 784
    exact = math.log2(127.5) - log_p / (784 * math.log(2))
    assert r["bpd"] == pytest.approx(exact.mean().item(), abs=3e-3)  # float32, 40 steps
    assert r["bpd"] == run(out, "--bpd", "--n", "4", "--steps", "40")["bpd"]  # untouched
    # dx/dt = -3 x: the guess (1 - 3 (1 - t)) e^(3 (1 - t)) x_1 leaves the range: --clip-x1 bends it
    out = linear_run(tmp_path / "run", -3.0)
    plain = run(out, "--bpd", "--n", "2", "--steps", "20")["bpd"]
    assert run(out, "--bpd", "--n", "2", "--steps", "20", "--clip-x1")["bpd"] != pytest.approx(
        plain, abs=0.01)

def test_evaluate_bpd_importance_weighted_over_dequantisations(evaluated, tmp_path, capsys):
    # dx/dt = -x (linear schedule): log p_1(x_1) = log N(e x_1; 0, I) + 784 for any x_1, so
    # each of the K draws' figures, their mean and the bound weighted over them, bits_per_dim
    # of log mean_k p_k, are closed forms; the weighted one is below the mean (Jensen)
    run, data = evaluated[:2]
    out = linear_run(tmp_path / "run", -1.0)
    capsys.readouterr()
    r = run(out, "--bpd", "--n", "4", "--steps", "40", "--draws", "3")
    assert "3 dequantisations of each digit: importance-weighted over them " in \
        capsys.readouterr().out
    g = torch.Generator().manual_seed(0)  # --seed 0: the first draw, the probe, the others
    x = common.load_images("MNIST", str(data), train=False)[r["digits"]]
    draws = [common.dequantize(x, g)]
    common.rademacher(x.shape, g)
    draws += [common.dequantize(x, g) for _ in range(2)]
    log_p = torch.stack([common.standard_normal_log_density(x1.double() * math.e) + 784
                         for x1 in draws])  # (3, 4)
    each = math.log2(127.5) - log_p / (784 * math.log(2))
    weighted = math.log2(127.5) - (log_p.logsumexp(0) - math.log(3)) / (784 * math.log(2))
    assert r["bpd"] == pytest.approx(each.mean().item(), abs=3e-3)  # float32, 40 steps
    assert r["weighted"] == pytest.approx(weighted.mean().item(), abs=3e-3)
    gain = (each.mean(0) - weighted).mean().item()
    assert gain > 1e-4 and r["bpd"] - r["weighted"] == pytest.approx(gain, rel=0.05)
    with open(os.path.join(out, "bpd.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(row["bpd_weighted"]) for row in rows] == pytest.approx(weighted.tolist(),
                                                                         abs=3e-3)
    assert r["bpd"] == pytest.approx(  # the first draw alone is --draws 1's figure
        run(out, "--bpd", "--n", "4", "--steps", "40")["bpd"] + (each.mean() - each[0].mean())
        .item(), abs=1e-4)
    expect_error("--draws is for --bpd", run, out, "--draws", "2")

def test_evaluate_bpd_gives_every_draw_of_a_digit_the_same_probe(evaluated, tmp_path,
                                                                 monkeypatch):
    # the field dx/dt = -x makes any probe exact, so the figures cannot show it: look at the
    # probes log_likelihood is given, and the points
    import evaluate
    run = evaluated[0]
    seen = []
    def spy(model, x1, steps, probe=None, *rest):
        seen.append((x1.clone(), probe.clone()))
        return common.log_likelihood(model, x1, steps, probe, *rest)
    monkeypatch.setattr(evaluate, "log_likelihood", spy)
    run(linear_run(tmp_path / "run", -1.0), "--bpd", "--n", "3", "--steps", "4", "--draws", "3")
    assert len(seen) == 6  # 3 draws at 2 and at 4 steps
    assert all(torch.equal(probe, seen[0][1]) for _, probe in seen)
    assert not torch.equal(seen[0][0], seen[1][0])  # three dequantisations, one probe

def test_evaluate_bpd_stopped_goes_on_to_the_figures_of_a_run_without_a_stop(
        evaluated, tmp_path, monkeypatch, capsys):
    # more images than BPD_CHUNK: RUN/bpd-part.pt keeps the figures after each chunk; the same
    # command, stopped, integrates only the rest, with the same points and probes, and writes
    # the very bpd.csv of a run without a stop
    import evaluate
    run = evaluated[0]
    monkeypatch.setattr(evaluate, "BPD_CHUNK", 3)
    flags = ["--bpd", "--n", "8", "--steps", "4", "--draws", "2"]
    seen = []
    def spy(model, x1, steps, probe=None, *rest):
        seen.append((steps, x1.clone(), probe.clone()))
        if len(seen) == stop_at:
            raise KeyboardInterrupt
        return common.log_likelihood(model, x1, steps, probe, *rest)
    monkeypatch.setattr(evaluate, "log_likelihood", spy)
    stop_at = None
    whole = linear_run(tmp_path / "whole", -0.5)
    r = run(whole, *flags)
    everything, seen = seen, []
    assert [len(x1) for _, x1, _ in everything] == [3] * 8 + [2] * 4  # 2 steps x 2 draws each
    with open(os.path.join(whole, "bpd.csv")) as f:
        expected = f.read()
    assert not os.path.exists(os.path.join(whole, "bpd-part.pt"))
    out = linear_run(tmp_path / "run", -0.5)
    part = os.path.join(out, "bpd-part.pt")
    # stopped while the first chunk's figures are being written: no file, and none claimed
    real_save = evaluate.atomic_save
    def stopped_save(obj, path):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "atomic_save", stopped_save)
    with pytest.raises(KeyboardInterrupt):
        run(out, *flags)
    assert not os.path.exists(part) and "keeps them" not in capsys.readouterr().err
    monkeypatch.setattr(evaluate, "atomic_save", real_save)
    stop_at, seen = 6, []  # in the second chunk
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(out, *flags)
    assert e.value.code == 130
    assert "interrupted after 3 of 8 images; " in capsys.readouterr().err
    kept = torch.load(part, weights_only=True)
    assert kept["done"] == 3
    # another command, or other weights, is told in one line, and the file is kept; a --bpd of
    # one chunk leaves it alone
    for other in (["--draws", "3"], ["--steps", "6"], ["--seed", "1"], ["--clip-x1"],
                  ["--first"]):
        expect_error("holds an unfinished --bpd of other images, settings, weights or device",
                     run, out, "--bpd", "--n", "8", "--steps", "4", "--draws", "2", *other)
    linear_run(tmp_path / "run", -1.0)
    expect_error("holds an unfinished --bpd of other images", run, out, *flags)
    linear_run(tmp_path / "run", -0.5)
    stop_at, seen = None, []
    run(out, "--bpd", "--n", "2", "--steps", "4")
    assert os.path.exists(part)
    seen = []
    r2 = run(out, *flags)
    assert "going on from" in capsys.readouterr().out
    assert len(seen) == 8 and all(
        s == s2 and torch.equal(x, x2) and torch.equal(z, z2)
        for (s, x, z), (s2, x2, z2) in zip(seen, everything[4:]))
    with open(os.path.join(out, "bpd.csv")) as f:
        assert f.read() == expected
    assert (r2["bpd"], r2["weighted"], r2["half"]) == (r["bpd"], r["weighted"], r["half"])
    assert r2["seconds"] >= kept["seconds"]  # the time of the whole score, both parts
    assert not os.path.exists(part)

def blend_of(field, sched):
    """The network a Blend needs to give `field`: F = beta x1_hat + (1 - beta) v, x1_hat the
    field's guess of x1."""
    def net(x, t, y=None):
        v = field(x, t)
        beta = sched(t.view(-1, *[1] * (x.dim() - 1)))[1]
        return beta * common.guess_x1(sched, t.view(-1, *[1] * (x.dim() - 1)), x, v) + \
            (1 - beta) * v
    return net

@pytest.mark.parametrize("sched", SCHEDULES)
def test_blend_of_the_exact_field_is_the_field_and_its_likelihood_the_closed_form(sched):
    # the exact field carrying N(0, I) to a Gaussian as narrow as a grey level, predicted as
    # a blend: Blend gives the field back wherever training looks, t <= 1 - TAIL, and the
    # field at 1 - TAIL beyond it (at t = 1 it would divide by 0)
    d = 784
    m1 = torch.linspace(-1, 1, d, dtype=torch.float64)
    field, log_p = gaussian_flow(0.0, 1.0, m1, 0.005, sched)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.7, 0.99, 1 - common.TAIL], dtype=torch.float64)
    blend = common.Blend(blend_of(field, sched), sched).double()
    torch.testing.assert_close(blend(x, t), field(x, t))
    last = torch.full((5,), 1 - common.TAIL, dtype=torch.float64)
    torch.testing.assert_close(blend(x, torch.ones(5, dtype=torch.float64)), field(x, last))
    # and its density, with the field held only past 1 - 1e-7: the closed form
    x1 = m1 + 0.005 * torch.randn(8, d, generator=g, dtype=torch.float64)
    t0, t1 = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    probe = common.rademacher(x1.shape).double()  # exact here: the Jacobian is a multiple of I
    held = common.Blend(blend_of(field, sched), sched, t_max=1 - 1e-7).double()
    log_p1 = common.log_likelihood(held, x1, 100, probe, lambda x: log_p(x, t0))
    assert (log_p1 - log_p(x1, t1)).abs().max().item() / (d * math.log(2)) < 0.001

@pytest.mark.parametrize("sched", SCHEDULES)
def test_fm_loss_of_a_blend_weighs_the_error_of_its_prediction_by_one_over_c_squared(sched):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * (1 - common.TAIL)
    out = torch.randn(6, 10, generator=g, dtype=torch.float64)  # any prediction F
    net = lambda x, t, y=None: out
    a, b, da, db = (s.view(-1, 1) for s in sched(t))
    xt = a * x0 + b * x1
    target = b * x1 + (1 - b) * (da * x0 + db * x1)  # the blend of x1 and the velocity
    c = 1 - b + b * a / (a * db - da * b)
    if sched is common.linear:
        torch.testing.assert_close(c, 1 - t.view(-1, 1) ** 2)
    loss = common.fm_loss(common.Blend(net, sched), x0, x1, sched, t)
    assert loss.item() == pytest.approx(((out - target) / c).pow(2).mean().item(), rel=1e-9)
    # and Blend's velocity turned back into a blend is the prediction
    v = common.Blend(net, sched)(xt, t)
    torch.testing.assert_close(b * common.guess_x1(sched, t.view(-1, 1), xt, v) + (1 - b) * v, out)

def test_blend_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = common.make_unet(predict="blend", schedule="linear")
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 0.99])
    plain = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = model(x, t)
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)

def test_mnist_importance_and_width_train_and_resume_exactly(mnist_data, tmp_path, monkeypatch):
    # a narrow U-Net (--width 8) trained with t from ImportanceT (2 bins of 2 losses, so that q
    # is learned within the first epoch): 2 epochs straight, and 1 then --resume 1 more, end
    # with the same weights and the same learned sampler
    import mnist
    monkeypatch.setattr(mnist, "ImportanceT", lambda: common.ImportanceT(n_bins=2, history=2))
    flags = ["--schedule", "linear", "--dequantize", "--importance", "--width", "8",
             "--limit", "32"]
    run_mnist(mnist_data, tmp_path / "a", "--epochs", "2", *flags)
    run_mnist(mnist_data, tmp_path / "b", "--epochs", "1", *flags)
    run_mnist(mnist_data, tmp_path / "b", "--epochs", "2", "--resume")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["model"]["enc1.net.0.weight"].shape[0] == 8 and b["config"]["width"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["importance"]["seen"].sum() == 2 * 32 and torch.equal(a["importance"]["sq"],
                                                                   b["importance"]["sq"])
    learned = common.ImportanceT(n_bins=2, history=2)
    learned.load_state_dict(b["importance"])
    assert learned.probabilities()[0] != 0.5  # learned, not the even start
    # what it cannot do is one line, and no run folder
    expect_error("--importance weighs t by the linear schedule's bound: add --schedule linear",
                 run_mnist, mnist_data, tmp_path / "c", "--importance")
    for flag in ("--t-dist", "--t-mean"):
        expect_error("--importance draws t itself: leave out --t-dist and --t-mean", run_mnist,
                     mnist_data, tmp_path / "c", "--importance", "--schedule", "linear", flag,
                     "tail" if flag == "--t-dist" else "0")
    expect_error("--width 1000000 needs", run_mnist, mnist_data, tmp_path / "c", "--width",
                 "1000000")
    assert not (tmp_path / "c").exists()
    model, _ = common.load_model(str(tmp_path / "b" / "ckpt.pt"), torch.device("cpu"))
    assert model.out.weight.shape == (1, 8, 1, 1)  # the width the run was trained with

def test_mnist_predicts_a_blend_resumes_samples_and_is_scored(evaluated, tmp_path, capsys):
    run, data = evaluated[:2]
    out = tmp_path / "blend"
    flags = ["--schedule", "linear", "--predict", "blend", "--dequantize", "--t-dist", "tail"]
    capsys.readouterr()
    run_mnist(data, out, "--epochs", "1", "--limit", "32", "--dtype", "bfloat16", *flags)
    assert "dtype float32," in capsys.readouterr().out  # Blend runs in float32: said so
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["predict"] == "blend" and "net.out.weight" in ckpt["ema"]
    run_mnist(data, out, "--epochs", "2", "--resume")  # the blend again, from its settings
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 2
    model, _ = common.load_model(str(out / "ckpt.pt"), torch.device("cpu"))
    assert isinstance(model, common.Blend) and model.schedule is common.linear
    run_mnist(data, out, "--sample", "4")
    assert torch.load(out / "samples.pt", weights_only=True).shape == (4, 1, 28, 28)
    r = run(str(out), "--bpd", "--n", "2", "--steps", "4")
    assert math.isfinite(r["bpd"])

def test_evaluate_sweeps_the_clipped_field(evaluated, tmp_path):
    # dx/dt = -3 x from the noise: the guess of x1, (1 - 3 (1 - t)) x, leaves the digits' range,
    # so --clip-x1 samples another field: ClippedX1's, from the same noise
    run = evaluated[0]
    out = tmp_path / "run"
    out.mkdir()
    model = linear_unet(-3.0, 0.0)
    torch.save({"script": "mnist.py", "ema": model.state_dict(), "config": {"schedule": "linear"}},
               out / "ckpt.pt")
    flags = ["--nfe", "4", "--grids", "uniform", "--n", "20", "--seeds", "0", "--dtype", "float32"]
    plain, clipped = run(str(out), *flags), run(str(out), *flags, "--clip-x1")
    with open(out / "nfe-clip.csv") as f:
        assert [r["fid"] for r in csv.DictReader(f)] == [str(r["fid"]) for r in clipped]
    assert plain[0]["solver"] == clipped[0]["solver"] == "euler"
    x = common.generate(common.ClippedX1(model, common.linear), common.fixed_noise(20, 0), 4,
                        torch.device("cpu"), torch.float32, "euler",
                        common.time_grid("uniform", 4, "linear"))
    torch.save(x, tmp_path / "samples.pt")
    assert run(str(tmp_path / "samples.pt"))["fid"] == pytest.approx(clipped[0]["fid"], abs=1e-3)
    assert clipped[0]["fid"] != pytest.approx(plain[0]["fid"], abs=1e-3)

def test_evaluate_bpd_of_a_run(evaluated, tmp_path, capsys):
    import evaluate
    run, data = evaluated[:2]
    # a run whose flow is known: dx/dt = lam x + b carries x_0 = (x_1 + b / lam) e^-lam - b / lam
    # to x_1, with div v = 784 lam all along (Hutchinson's estimate too: the Jacobian is lam I),
    # so log p_1(x_1) = log N(x_0; 0, I) - 784 lam
    lam, b = 0.5, 0.2
    model = linear_unet(lam, b)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(x, torch.rand(3)), lam * x + b)
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"script": "mnist.py", "ema": model.state_dict(), "config": {"schedule": "linear"}},
               out / "ckpt.pt")
    images = common.load_images("MNIST", str(data), train=False)  # 200 test digits here
    def closed_form(index):
        g = torch.Generator().manual_seed(0)  # --seed 0: the dequantisation's draws
        x1 = common.dequantize(images[index], g).double()
        x0 = (x1 + b / lam) * math.exp(-lam) - b / lam
        log_p = common.standard_normal_log_density(x0) - 784 * lam
        return math.log2(127.5) - log_p / (784 * math.log(2))
    capsys.readouterr()
    r = run(str(out), "--bpd", "--n", "6", "--steps", "40")
    printed = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"bpd \d+\.\d{4} \+- \d+\.\d{4} \(standard error over the images, "
                    r"dequantisations and probes; 40 midpoint steps moved it by "
                    r"[+-]\d+\.\d{4} from 20\)$", printed[-1]), printed[-1]
    # six digits in the fixed random order, none of the first 100 (the settings' digits)
    assert r["digits"] == evaluate.bpd_order(200)[:6].tolist() and min(r["digits"]) >= 100
    exact = closed_form(r["digits"])
    assert r["bpd"] == pytest.approx(exact.mean().item(), abs=1e-3)
    assert r["half"] == pytest.approx(exact.mean().item(), abs=4e-3)  # 20 midpoint steps
    assert r["se"] == pytest.approx(exact.std().item() / math.sqrt(6), rel=0.02)
    assert r["median"] == pytest.approx(exact.quantile(0.5).item(), abs=1e-3)
    assert r["holes"] == [i for i, v in zip(r["digits"], exact.tolist()) if v > 4]
    with open(out / "bpd.csv") as f:  # each digit's figure
        rows = list(csv.DictReader(f))
    assert [int(row["digit"]) for row in rows] == r["digits"]
    assert [float(row["bpd"]) for row in rows] == pytest.approx(exact.tolist(), abs=2e-3)
    # --first: the first N; --n 200: all the test digits, whatever the order
    assert run(str(out), "--bpd", "--n", "4", "--steps", "40", "--first")["digits"] == [0, 1, 2, 3]
    named = run(str(out), "--bpd", "--steps", "40", "--digits", "150", "5", "199")
    assert named["digits"] == [150, 5, 199]  # --digits: those, in that order
    assert named["bpd"] == pytest.approx(closed_form([150, 5, 199]).mean().item(), abs=1e-3)
    assert sorted(evaluate.bpd_order(200).tolist()) == list(range(200))
    assert evaluate.bpd_order(200)[-100:].tolist() == list(range(100))  # the first 100 last
    expect_error("--bpd is for one run folder of digits alone", run, str(out), "--bpd", "--curve")
    expect_error("--steps is for --bpd", run, str(out), "--steps", "10")
    expect_error("--n 201: MNIST has only 200 test images", run, str(out), "--bpd", "--n", "201")
    expect_error("--dtype is for sampling; --bpd integrates in float32", run, str(out), "--bpd",
                 "--dtype", "float32")
    expect_error("--steps 1: --bpd compares the figure with half the steps", run, str(out),
                 "--bpd", "--steps", "1")
    expect_error("--bpd is for a run folder", run, "real", "--bpd")
    expect_error("--first is for --bpd", run, str(out), "--first")
    expect_error("--digits is for --bpd", run, str(out), "--digits", "1", "2")
    expect_error("--clip-x1 is for --bpd or the sweep of one run folder of digits", run,
                 str(out), "--clip-x1", "--curve")
    expect_error("--first and --digits: --digits names the test images", run, str(out), "--bpd",
                 "--first", "--digits", "1", "2")
    expect_error("--digits: MNIST's test images are 0 to 199", run, str(out), "--bpd", "--digits",
                 "1", "200")
    expect_error("--digits: a standard error needs at least 2 images", run, str(out), "--bpd",
                 "--digits", "7")
    run_mnist(data, tmp_path / "cond", "--epochs", "1", "--limit", "16", "--conditional")
    expect_error("is a conditional run; --bpd measures an unconditional model's density", run,
                 str(tmp_path / "cond"), "--bpd")

# =============================================================================
# the plumbing
# =============================================================================

# -----------------------------------------------------------------------------
# bad input: one line, a non-zero exit, nothing lost

@pytest.mark.parametrize("script,args,message", [
    ("moons.py", ["--schedule", "sigmoid"], "invalid choice: 'sigmoid'"),
    ("gaussian.py", ["--out", "README.md/run"], "cannot write to the folder README.md/run"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(script, args, message):
    # as a user sees it: a process of its own, its exit status and stderr (die: SystemExit)
    r = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True,
                       text=True, cwd=HERE)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

@pytest.mark.parametrize("script,args,message", [
    ("moons", ["--steps", "0"], "argument --steps: invalid positive_int value: '0'"),
    ("gaussian", ["--iters", "-5"], "argument --iters: invalid positive_int value: '-5'"),
    ("moons", ["--lr", "0"], "argument --lr: invalid positive_float value: '0'"),
    ("moons", ["--device", "cuda:7"], "is not available on this machine"),
])
def test_the_2d_scripts_refuse_bad_settings_in_one_line(script, args, message):
    # the same SystemExit as above, from the script's main() in this process (a process each
    # would take seconds to import torch)
    import importlib
    expect_error(message, importlib.import_module(script).main, args)

@pytest.mark.parametrize("damage,message", [
    ("truncate", "is damaged (1000 bytes, not an IDX file of the size its header gives)"),
    ("flip a header bit", "is damaged (37648 bytes, not an IDX file of the size its header gives)"),
    ("random bytes", "is damaged (37648 bytes, not an IDX file of the size its header gives)"),
])
def test_damaged_data_is_named_in_one_line(mnist_data, tmp_path, damage, message):
    f = mnist_data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[:1000]
    elif damage == "flip a header bit":
        data[11] ^= 0x04  # 28 rows -> 24
    else:
        data = bytearray(torch.randint(0, 256, (len(data),),
                                       generator=torch.Generator().manual_seed(3),
                                       dtype=torch.uint8).numpy().tobytes())
    f.write_bytes(bytes(data))
    expect_error(f"{f} {message}; delete it so that it is downloaded again, or copy it again",
                 run_mnist, mnist_data, tmp_path / "o", "--epochs", "1")

def test_a_file_of_the_official_size_with_another_md5_is_damaged(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    f = raw / "t10k-labels-idx1-ubyte"  # the official test labels are 10,000 bytes after the header
    f.write_bytes(struct.pack(">II", 0x0801, 10000) + bytes(10000))
    expect_error(f"{f} is damaged (the official file's size, but not its MD5)", common.load_images,
                 "MNIST", str(tmp_path))

def test_impossible_requests_are_one_line_and_leave_the_checkpoint(mnist_data, tmp_path,
                                                                   monkeypatch):
    run_mnist(mnist_data, tmp_path / "o", "--epochs", "1")
    before = (tmp_path / "o" / "ckpt.pt").read_bytes()
    # more samples than memory can hold
    expect_error("--sample 100000000 needs 584.1 GiB of memory", run_mnist, mnist_data,
                 tmp_path / "o", "--sample", "100000000")
    # an output folder that cannot be written (a path under a regular file)
    (tmp_path / "file").write_text("not a folder")
    expect_error(f"cannot write to the folder {tmp_path / 'file' / 'run'}", run_mnist, mnist_data,
                 tmp_path / "file" / "run")
    # a full disk while saving the next checkpoint
    def full_disk(obj, f, *a, **k):
        open(f, "wb").write(b"half a checkpoint")  # what a full disk leaves behind
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    expect_error(f"cannot write {tmp_path / 'o' / 'ckpt.pt'} ([Errno 28] No space left on device); "
                 "what was there is unchanged",
                 run_mnist, mnist_data, tmp_path / "o", "--epochs", "2", "--resume")
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == before
    assert not list((tmp_path / "o").glob("*.tmp*"))

def test_a_training_batch_that_cannot_fit_is_refused_before_any_step(mnist_data, tmp_path,
                                                                     monkeypatch):
    import mnist
    # what a step needs: each layer's output and its gradient, in float32, for each image
    per_image = common.step_memory(UNet(), 1)
    assert common.step_memory(UNet(), 64) == 64 * per_image
    assert 2 * 4 * 300_000 < per_image < 2 * 4 * 400_000  # the U-Net's maps: about 350,000 numbers
    assert common.step_memory(UNet(n_classes=10), 1) > per_image  # the label's maps too
    # a full MNIST batch of 60,000 images needs more than this machine's 24 GiB
    assert common.step_memory(UNet(), 60_000) > 24 * 2**30
    monkeypatch.setattr(common, "free_memory", lambda device: 20 * per_image)  # 20 images' room
    monkeypatch.setattr(mnist, "fm_loss", lambda *a, **kw: pytest.fail("a step was taken"))
    expect_error(f"--batch-size 32 needs {32 * per_image / 2**30:.1f} GiB of memory", run_mnist,
                 mnist_data, tmp_path / "o", "--batch-size", "32", "--epochs", "1")
    assert not (tmp_path / "o" / "ckpt.pt").exists()
    # a batch larger than the data is a step over all of it: 48 images here
    expect_error(f"--batch-size 1000 needs {48 * per_image / 2**30:.1f} GiB", run_mnist,
                 mnist_data, tmp_path / "o", "--batch-size", "1000", "--epochs", "1")

# -----------------------------------------------------------------------------
# long runs: progress, divergence, Ctrl-C, resuming, checkpoints

def test_progress_inside_an_epoch_at_least_every_tenth(mnist_data, tmp_path, capsys):
    run_mnist(mnist_data, tmp_path / "o", "--epochs", "2",
              "--batch-size", "4")  # 48 images: 12 steps an epoch
    lines = capsys.readouterr().out.splitlines()
    for epoch in (1, 2):
        shown = [int(re.search(r"step (\d+)/12 ", l).group(1)) for l in lines
                 if l.endswith(" in the run") and f" of epoch {epoch}/2 |" in l]
        gaps = [b - a for a, b in zip([0] + shown, shown + [12])]
        assert shown and max(gaps) <= 2, shown  # a line at least every tenth of the epoch
                                                # (12 / 10 steps)
        last = max(i for i, l in enumerate(lines)
                   if l.startswith("  step ") and f" of epoch {epoch}/2 |" in l)
        assert lines[last + 1].startswith(f"epoch   {epoch}/2 | loss ")  # then the epoch's own line
    # each progress line: the running loss, images/s, the time left in the epoch and in the run
    m = re.search(r"\| loss (\S+) \| (\d+) img/s \| (\d+):(\d\d):(\d\d) left in the epoch, "
                  r"(\d+):(\d\d):(\d\d) in the run$",
                  [l for l in lines if l.startswith("  step ")][0])
    assert m and math.isfinite(float(m.group(1)))

def test_progress_counts_hours_past_a_day(capsys):
    import time
    common.progress(1, 10, 1, 10, 64, 32.0, time.time() - 1000)  # 1000 s a step, 9 and 99 left
    line = capsys.readouterr().out
    assert "02:30:00 left in the epoch, 27:30:00 in the run" in line, line

def test_progress_in_a_long_epoch_prints_every_tenth_into_a_file(capsys):
    import time
    for step in range(1, 1001):
        common.progress(1, 3, step, 1000, 64 * step, 0.5 * 64 * step, time.time() - 1)
    lines = capsys.readouterr().out.splitlines()
    assert [int(l.split("step ")[1].split("/")[0]) for l in lines] == list(range(100, 1000, 100))
    assert all(" | loss 0.5000 | " in l for l in lines)

def test_a_diverging_run_stops_at_once_and_keeps_the_last_good_checkpoint(mnist_data, tmp_path,
                                                                          monkeypatch):
    import mnist
    # a huge learning rate: one line naming the step, a non-zero exit, no checkpoint of bad weights
    with pytest.raises(SystemExit) as e:
        run_mnist(mnist_data, tmp_path / "huge", "--epochs", "3", "--lr", "1e6")
    assert ("the run diverged; try a smaller --lr than 1e+06" in str(e.value.code)
            and "\n" not in str(e.value.code))
    ckpt = tmp_path / "huge" / "ckpt.pt"
    assert not ckpt.exists() or all(torch.isfinite(v).all()
                                    for v in torch.load(ckpt, weights_only=True)["model"].values())
    # a run that diverges in its second epoch leaves the first epoch's checkpoint as it was
    run_mnist(mnist_data, tmp_path / "late", "--epochs", "1")
    before = (tmp_path / "late" / "ckpt.pt").read_bytes()
    calls = {"n": 0}
    def nan_later(*a, **kw):
        calls["n"] += 1
        return fm_loss(*a, **kw) * (float("nan") if calls["n"] == 2 else 1)
    monkeypatch.setattr(mnist, "fm_loss", nan_later)
    expect_error("the loss is nan at step 2 of epoch 2: the run diverged", run_mnist, mnist_data,
                 tmp_path / "late", "--epochs", "3", "--resume")
    assert (tmp_path / "late" / "ckpt.pt").read_bytes() == before
    assert not list((tmp_path / "late").glob("*.tmp*"))

def test_ctrl_c_names_the_checkpoint_and_the_resume_command_then_resumes_exactly(mnist_data,
                                                                                 tmp_path):
    import signal, shlex, time
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(HERE, "mnist.py"), "--data", str(mnist_data),
           "--out", str(out), "--batch-size", "4", "--steps", "1", "--epochs", "300",
           "--device", "cpu"]
    # SIGINT as a terminal gives it, even when the tests run in the background (bash's `&`
    # starts them with SIGINT ignored, and a child would inherit that)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not (out / "epoch002.pt").exists() and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(r"interrupted in epoch \d+; \S+ckpt.pt holds epoch \d+; "
                     r"continue with: python mnist.py ", err), err
    assert not list(out.glob("*.tmp*"))
    saved = torch.load(out / "ckpt.pt", weights_only=True)["epoch"]
    # the printed command continues the run; with --epochs cut to saved + 1 it ends as a run
    # never stopped
    again = shlex.split(err.split("continue with: ")[1])
    assert again[:2] == ["python", "mnist.py"] and again[again.index("--out") + 1] == str(out)
    assert again[again.index("--device") + 1] == "cpu"  # a device given is kept; the sampler
                                                        # settings need not be
    again[again.index("--epochs") + 1] = str(saved + 1)
    import mnist
    mnist.main(again[2:])
    run_mnist(mnist_data, tmp_path / "straight", "--batch-size", "4", "--steps", "1",
              "--epochs", str(saved + 1))
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (out, tmp_path / "straight"))
    assert a["epoch"] == b["epoch"] == saved + 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

def test_resume_reads_and_writes_the_folder_given(mnist_data, tmp_path):
    import shutil
    run_mnist(mnist_data, tmp_path / "a", "--epochs", "1")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    before = {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()}
    run_mnist(mnist_data, tmp_path / "b", "--epochs", "2", "--resume")
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["epoch"] == 2
    assert (tmp_path / "b" / "epoch002.png").exists()
    assert {f.name: f.read_bytes()
            for f in (tmp_path / "a").iterdir()} == before  # the original run: untouched

def test_resume_with_nothing_left_to_do_is_one_line(both_data, tmp_path):
    run_mnist(both_data, tmp_path / "m", "--epochs", "2")
    run_translate(both_data, tmp_path / "t", "--epochs", "2")
    before = (tmp_path / "m" / "ckpt.pt").read_bytes()
    for run, d in [(run_mnist, "m"), (run_translate, "t")]:
        for epochs in ["1", "2"]:
            expect_error(f"holds 2 epochs already: nothing to do for --epochs {epochs}; "
                         "ask for more than 2",
                         run, both_data, tmp_path / d, "--resume", "--epochs", epochs)
    assert (tmp_path / "m" / "ckpt.pt").read_bytes() == before

def test_a_kill_while_a_checkpoint_is_written_leaves_the_last_one_whole(mnist_data, tmp_path,
                                                                        monkeypatch):
    run_mnist(mnist_data, tmp_path / "a", "--epochs", "2")  # never interrupted
    real_save, calls = torch.save, {"n": 0}
    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2's ckpt.pt (each epoch writes ckpt.pt, then epochNNN.pt)
            buf = io.BytesIO()
            real_save(obj, buf)
            open(f, "wb").write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise Killed  # killed half way through the write: nothing after this line runs,
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", dying_save)
    monkeypatch.setattr(os, "remove", lambda path: None)  # not even atomic_write's clean-up
    with pytest.raises(Killed):
        run_mnist(mnist_data, tmp_path / "b", "--epochs", "2")
    monkeypatch.undo()
    b = tmp_path / "b"
    assert (b / "ckpt.tmp.pt").stat().st_size > 0  # the half-written file, under its temporary name
    assert torch.load(b / "ckpt.pt", weights_only=True)["epoch"] == 1  # the last checkpoint, whole
    run_mnist(mnist_data, b, "--epochs", "2", "--resume")
    assert not list(b.glob("*.tmp*"))  # the next write replaced it
    x, y = (torch.load(d / "ckpt.pt", weights_only=True) for d in (tmp_path / "a", b))
    assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])

@pytest.mark.parametrize("script", ["mnist", "translate"])
def test_a_checkpoint_older_than_a_setting_resumes_with_what_it_trained_with(both_data, tmp_path,
                                                                             script):
    # a run from before --t-dist, --t-mean, --warmup, --clip, --pairing, --cooldown (--sigma;
    # --dequantize, --predict, --width, --importance) trained with what common.OLDER says, not
    # today's defaults; it resumes as the run that gave them explicitly
    run = {"mnist": run_mnist, "translate": run_translate}[script]
    older = common.OLDER[f"{script}.py"]
    assert older == {"t_dist": "uniform", "t_mean": 0.0, "warmup": None, "clip": None,
                     "pairing": "random", "conditional": False, "label_drop": 0.1,
                     "cooldown": None,
                     **({"sigma": 0.0} if script == "translate" else
                        {"dequantize": False, "predict": "v", "width": 32,
                         "importance": False})}
    flags = ["--t-dist", "uniform", "--t-mean", "0", "--pairing", "random",
             *(["--sigma", "0"] if script == "translate" else [])]  # (no warm-up, no clipping)
    run(both_data, tmp_path / "straight", "--epochs", "2", *flags)
    run(both_data, tmp_path / "old", "--epochs", "1", *flags)
    ckpt = torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)
    for k in [*older, "script"]:
        (ckpt["config"] if k in ckpt["config"] else ckpt).pop(k)
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    run(both_data, tmp_path / "old", "--epochs", "2", "--resume")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("old", "straight"))
    assert {k: a["config"][k] for k in older} == older
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

def test_a_checkpoint_names_the_script_that_wrote_it_and_the_other_script_refuses_it(both_data,
                                                                                     tmp_path):
    import evaluate
    run_mnist(both_data, tmp_path / "m", "--epochs", "1")
    run_translate(both_data, tmp_path / "t", "--epochs", "1")
    for d, script in [("m", "mnist.py"), ("t", "translate.py")]:
        for f in ["ckpt.pt", "epoch001.pt"]:
            assert torch.load(tmp_path / d / f, weights_only=True)["script"] == script
    m, t = tmp_path / "m", tmp_path / "t"
    expect_error(f"{t / 'ckpt.pt'} is a run of translate.py, not of mnist.py: use translate.py",
                 run_mnist, both_data, t, "--sample", "4")
    expect_error("is a run of translate.py, not of mnist.py",
                 run_mnist, both_data, t, "--resume", "--epochs", "2")
    expect_error("is a run of mnist.py, not of translate.py",
                 run_translate, both_data, m, "--sample", "4")
    expect_error("is a run of mnist.py, not of translate.py",
                 run_translate, both_data, m, "--resume", "--epochs", "2")
    # evaluate.py: a run folder of the other kind, for a sweep, --path and --curve
    ev = lambda *a: evaluate.main([*a, "--data", str(both_data), "--device", "cpu",
                                   "--classifier", str(tmp_path / "c.pt")])
    for extra in [[], ["--path"], ["--curve"]]:
        expect_error("is a run of translate.py, not of mnist.py, reflow.py or meanflow.py: "
                     "add --translation for translate.py's runs", ev, str(t), *extra)
        expect_error("is a run of mnist.py, not of translate.py: "
                     "--translation is for translate.py's runs", ev, str(m),
                     "--translation", *extra)
    assert not (tmp_path / "c.pt").exists()  # each told before a classifier was trained

# -----------------------------------------------------------------------------
# the machine: device and precision

@pytest.mark.parametrize("avx512_bf16,amx,auto", [(True, False, torch.bfloat16),
                                                 (False, True, torch.bfloat16),
                                                 (False, False, torch.float32)])
def test_dtype_auto_is_bf16_only_on_a_cpu_that_computes_it(monkeypatch, avx512_bf16, amx, auto):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert common.pick_dtype("auto", torch.device("cpu")) == auto
    assert common.pick_dtype("auto", torch.device("cuda")) == torch.float32  # GPUs: float32
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        assert common.pick_dtype(name, torch.device("cpu")) == dtype  # a precision named wins

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mnist_on_cuda_trains_samples_and_its_checkpoint_loads_on_a_cpu(mnist_data, tmp_path,
                                                                        capsys):
    # the suite runs on the CPU (the references above are CPU arithmetic); this is the GPU's path
    run_mnist(mnist_data, tmp_path, "--epochs", "2", "--device", "cuda")
    assert capsys.readouterr().out.startswith("device cuda")
    ckpt = common.load_checkpoint(tmp_path / "ckpt.pt")  # onto the CPU, as a user's laptop would
    assert ckpt["epoch"] == 2 and all(v.device.type == "cpu" and v.isfinite().all()
                                      for v in ckpt["ema"].values())
    run_mnist(mnist_data, tmp_path, "--sample", "10", "--device", "cuda")
    x = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert x.shape == (10, 1, 28, 28) and x.min() >= 0 and x.max() <= 1 and x.std() > 0.05

# -----------------------------------------------------------------------------
# what the project says stays true: the scripts' settings in step, the README, the code

# mnist.py's and translate.py's settings: the same flags, types and choices; the defaults
# differ only here, each for its reason
DIFFERENCES = {  # dest: (mnist.py's default, translate.py's, why)
    "epochs": (20, 100, "the handout: a translation needs about 100 epochs"),
    "batch_size": (32, 64, "32 measured on mnist.py (README, 'What was tried'); "
                           "translate.py's runs were made at 64"),
    "t_dist": ("logit-normal", "uniform", "measured on each (README, appendix A and section 4)"),
    "pairing": ("random", "ot", "OT: FID 79.0 against 95.0 for translate.py (--schedule cosine "
                                "--sigma 0); for noise it ends level (README)"),
    "schedule": ("cosine", "linear", "translate.py with --sigma 0.3: FID 45.0, 52.3 against 54.4 "
                                     "after 10 epochs (README, section 4)"),
}

# and each script's own settings: the likelihood of digits (evaluate.py --bpd) is mnist.py's;
# noise on a Gaussian source would only change its variance
MNIST_ONLY = {"dequantize": "each digit moved within its grey levels' bins",
              "predict": "section 8's blend, made for the density of digits",
              "width": "section 8's wider U-Net, a lever on the density of digits",
              "importance": "section 8's t for the diffusion bound of the likelihood"}
TRANSLATE_ONLY = {"sigma": "Gaussian noise on the garments"}

def settings(parser):
    """A script's settings: for each, its flags, type, choices, nargs, kind and default."""
    return {a.dest: (a.option_strings, a.type, a.choices, a.nargs, type(a).__name__, a.default)
            for a in parser._actions}

def test_mnist_and_translate_take_the_same_settings_but_for_the_listed_defaults():
    import mnist, translate
    m, t = settings(mnist.parser), settings(translate.parser)
    assert m.keys() | TRANSLATE_ONLY.keys() == t.keys() | MNIST_ONLY.keys()
    for dest in t.keys() - TRANSLATE_ONLY.keys():
        assert m[dest][:5] == t[dest][:5], dest
        if dest in DIFFERENCES:
            assert (m[dest][5], t[dest][5]) == DIFFERENCES[dest][:2], dest
        else:
            assert m[dest][5] == t[dest][5], dest

def test_meanflow_takes_mnist_py_s_settings_but_for_its_own():
    import mnist, meanflow
    m, f = settings(mnist.parser), settings(meanflow.parser)
    assert f.keys() - m.keys() == {"ratio", "t_std", "norm_p"}
    own = {"schedule": "linear", "t_mean": 0.4, "out": "out/mnist-meanflow", "nfe": 1}
    for dest in f.keys() - {"ratio", "t_std", "norm_p", "help"}:
        assert f[dest][:3] == m[dest][:3], dest
        assert f[dest][5] == own.get(dest, m[dest][5]), dest

def test_reflow_takes_mnist_py_s_settings_but_for_its_own():
    # the student's recipe: mnist.py's flags for what it shares, the same types and choices;
    # its own defaults for the schedule, t and OUT; no data, labels or pairing of its own
    import mnist, reflow
    m, r = settings(mnist.parser), settings(reflow.parser)
    assert r.keys() - m.keys() == {"teacher", "pairs"}
    assert m.keys() - r.keys() == {"data", "limit", "handout", "pairing", "dequantize", "predict",
                                   "width", "importance", "conditional", "label_drop",
                                   "guidance", "guidance_shape", "digit"}
    own = {"schedule": "linear", "t_dist": "half-zero", "out": "out/mnist-reflow", "nfe": 20}
    for dest in r.keys() - {"teacher", "pairs", "help"}:
        assert r[dest][:5] == m[dest][:5], dest
        assert r[dest][5] == own.get(dest, m[dest][5]), dest

@pytest.mark.parametrize("name", ["README.md", "RESULTS.md"])
def test_every_flag_the_readme_and_the_results_name_exists(name):
    import evaluate, gaussian, meanflow, mnist, moons, reflow, translate
    known = {o for p in (evaluate.parser, gaussian.parser, meanflow.parser, mnist.parser,
                         moons.parser, reflow.parser, translate.parser)
             for a in p._actions for o in a.option_strings}
    with open(os.path.join(HERE, name)) as f:
        text = f.read()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    assert named and named <= known, named - known
    assert not re.search(r"commit [0-9a-f]{7}", text)  # no commit is evidence: every command runs

def test_no_line_of_the_code_is_longer_than_100_characters():
    for name in ["common.py", "moons.py", "gaussian.py", "mnist.py", "translate.py", "reflow.py",
                 "meanflow.py", "evaluate.py", "test_fm.py"]:
        with open(os.path.join(HERE, name)) as f:
            long = [i for i, line in enumerate(f, 1) if len(line.rstrip("\n")) > 100]
        assert not long, (name, long)
