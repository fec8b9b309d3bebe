"""IniLoRA's weight approximation (paper Section 3): fit B A to every target W0, then cache it.

For the target matrices W^i (the query and value projections by default) the paper draws

    mu_i = mean(W^i),  sigma_i = sqrt(mean((W^i - mu_i)^2))                          (1)
    mu_bar = mean_i mu_i,  sigma_bar = mean_i sigma_i                                 (2)

and starts from A0 (r, d_in), B0 (d_out, r) ~ N(0, sigma_bar^2) (mean 0: "the weight means are
near zero", Section 4.1). It then minimises, for every matrix at once,

    L_i = mean((W^i - B A)^2)   by Adam, lr 5e-4, StepLR(5000, 0.9), 20000 steps      (3)

(the paper writes (3) as gradient descent on ||W0 - B A||_F^2; Section 4.1 and the authors'
code use the mean squared error, Adam and StepLR, and so does this file).
The gradient of (3) has a closed form (n = d_out * d_in):

    dL/dB = (2/n) (B (A A^T) - W A^T),   dL/dA = (2/n) (B^T B A - B^T W)
    n L   = ||W||^2 - 2 <B, W A^T> + <B^T B, A A^T>

so no (d_out, d_in) residual is ever formed: a step reads W twice (for A W^T and B^T W) and does
only r x r work besides. Matrices of one shape are stacked into (L, d_out, d_in) and updated
together with bmm; Adam is element-wise, so one Adam over the stack is one Adam per matrix.
The report compares every final L_i to the best rank-r error (Eckart-Young, Section 4.3.2).

Run:  python3 approximate.py --model minilm --rank 8 --steps 20000
"""
import argparse
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from tqdm import tqdm

from common import pick_device, run_cli, write_atomic

# Shape legend: L stacked matrices of one shape, d_out rows (output features), d_in columns
# (input features), r rank. A is (r, d_in), B is (d_out, r), W is (d_out, d_in).

FORMAT_VERSION = 1  # of the cache files; bump when their layout or meaning changes
READINGS = 200  # loss readings per run: the loss curve, the finiteness check and --tol use them
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as in the authors' code
CPU_CACHE_BYTES = 16 * 2**20  # on CPU, a bigger stack is read matrix by matrix (see gradients)


@dataclass
class ApproxConfig:
    rank: int = 8  # r
    steps: int = 20000  # T in eq. 3; 0 returns A0, B0 (the paper's "IniLoRA (Iter=0)")
    lr: float = 5e-4  # alpha in eq. 3
    lr_step: int = 5000  # StepLR step_size
    lr_gamma: float = 0.9  # StepLR gamma
    seed: int = 0  # seeds the draw of A0, B0
    tol: float | None = None  # early stop (see approximate()); None follows the paper
    tol_window: int = 1000  # steps over which --tol measures the improvement
    device: str | None = None  # None: cuda, then mps, then cpu
    optimum: bool = True  # report the Eckart-Young optimum (one float64 SVD per matrix)

    def settings(self):
        """Every setting that changes A, B: the cache is keyed by these."""
        return dict(rank=self.rank, steps=self.steps, lr=self.lr, lr_step=self.lr_step,
                    lr_gamma=self.lr_gamma, seed=self.seed, tol=self.tol,
                    tol_window=self.tol_window if self.tol is not None else None)


def validate(weights, cfg):
    """Raises ValueError for a setting or weight that cannot be approximated; returns sorted names."""
    if not weights:
        raise ValueError("no target matrices were given: pass a dict with at least one 2-D weight.")
    for name in sorted(weights):
        W = weights[name]
        if W.dim() != 2 or not W.is_floating_point():
            raise ValueError(f"target {name!r} is a {W.dim()}-D {W.dtype} tensor of shape "
                             f"{tuple(W.shape)}; expected a 2-D floating-point weight (d_out, d_in).")
        if not torch.isfinite(W).all():
            raise ValueError(f"target {name!r} contains inf or nan values; the approximation needs "
                             "finite weights: check the checkpoint it was loaded from.")
        if not 1 <= cfg.rank <= min(W.shape):
            raise ValueError(f"rank={cfg.rank} does not fit target {name!r} of shape "
                             f"{tuple(W.shape)}: expected 1 <= rank <= {min(W.shape)}. Pass a "
                             "smaller --rank.")
    checks = [
        (cfg.steps >= 0, f"steps={cfg.steps} is negative; expected 0 (A0, B0 only) or more."),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"lr={cfg.lr} must be a positive number, e.g. 5e-4."),
        (cfg.lr_step >= 1, f"lr_step={cfg.lr_step} must be at least 1 (StepLR's step_size)."),
        (0 < cfg.lr_gamma <= 1, f"lr_gamma={cfg.lr_gamma} must be in (0, 1]; 1 keeps lr fixed."),
        (cfg.tol is None or cfg.tol >= 0, f"tol={cfg.tol} must be >= 0, or None to run all steps."),
        (cfg.tol_window >= 1, f"tol_window={cfg.tol_window} must be at least 1 step."),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    pick_device(cfg.device)  # raises for a device that does not exist here
    return sorted(weights)


def weights_fingerprint(weights):
    """Short sha256 over the sorted names, shapes and float32 bytes of the weights."""
    h = hashlib.sha256()
    for name in sorted(weights):
        W = weights[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(W.shape)};".encode())
        h.update(W.numpy())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# the approximation


def approximate(weights, cfg):
    """Fits B A to every weight by eq. 3. Returns ({name: (A, B)} on CPU in float32, report).

    Every max(1, T // READINGS) steps (and after the last step) the losses are read, from the
    closed form in float32 (exact up to float32 rounding relative to ||W||^2 / n): they make the
    report's loss curve, stop the run if one is not finite, and, with cfg.tol, stop it early at
    a reading at step t >= tol_window where the total loss sum_i L_i improved by less than
    tol (relative) since the reading tol_window steps before (rounded up to whole readings).
    The report's final `mse` is computed directly in float64.
    """
    names = validate(weights, cfg)
    device, reason = pick_device(cfg.device)
    print(f"approximating {len(names)} matrices at rank {cfg.rank} on {device} ({reason}), float32")
    start = time.perf_counter()
    r = cfg.rank

    # one float64 pass over the matrices, before the stacks exist (it is on CPU, so CPU and CUDA
    # runs start from the same sigma_bar): eq. 1, ||W||^2 for the loss, and the Eckart-Young
    # optimum: the best rank-r MSE is the energy beyond the r largest singular values
    svd_device = device if device.type == "cuda" else torch.device("cpu")  # no float64 on MPS
    stats = {}
    for name in tqdm(names, desc="statistics" + (" and SVDs" if cfg.optimum else "")):
        W64 = weights[name].detach().to("cpu", torch.float64)
        row = dict(shape=list(W64.shape), mu=W64.mean().item(), sigma=W64.std(correction=0).item(),
                   norm2=W64.square().sum().item())
        if cfg.optimum:
            S = torch.linalg.svdvals(W64.to(svd_device))  # (min(d_out, d_in),)
            row["optimal_mse"] = S[r:].square().sum().item() / W64.numel()
        stats[name] = row
    del W64
    # eq. 2
    mu_bar = sum(row["mu"] for row in stats.values()) / len(names)
    sigma_bar = sum(row["sigma"] for row in stats.values()) / len(names)

    # stacks of same-shape matrices, in sorted-name order; A, B, their gradients and Adam's
    # moments each live in one flat buffer so that the Adam update is a handful of ops per step
    shapes = {}
    for name in names:
        shapes.setdefault(tuple(weights[name].shape), []).append(name)
    numel = sum(len(group) * r * (d_out + d_in) for (d_out, d_in), group in shapes.items())
    theta = torch.empty(numel, device=device)  # all A's and B's
    grad, m, v, denom = (torch.zeros(numel, device=device) for _ in range(4))
    stacks, offset = [], 0
    for (d_out, d_in), group in shapes.items():
        L = len(group)
        s = dict(names=group, n=d_out * d_in, W=torch.empty(L, d_out, d_in, device=device))
        whole = device.type != "cpu" or 4 * L * d_out * d_in <= CPU_CACHE_BYTES
        s["slices"] = [slice(0, L)] if whole else [slice(l, l + 1) for l in range(L)]
        for l, name in enumerate(group):
            s["W"][l].copy_(weights[name].detach())  # float32 on the device, no extra copy
        s["W_norm2"] = torch.tensor([stats[name]["norm2"] for name in group], device=device)  # (L,)
        for key, shape in (("A", (L, r, d_in)), ("B", (L, d_out, r))):
            size = math.prod(shape)
            s[key] = theta[offset:offset + size].view(shape)
            s["g" + key] = grad[offset:offset + size].view(shape)
            offset += size
        s["AWt"] = torch.empty(L, r, d_out, device=device)
        s["BtW"] = torch.empty(L, r, d_in, device=device)
        s["AAt"] = torch.empty(L, r, r, device=device)
        s["BtB"] = torch.empty(L, r, r, device=device)
        stacks.append(s)
    assert offset == numel

    # A0, B0 ~ N(0, sigma_bar^2): drawn on CPU from one generator in sorted-name order,
    # A then B per matrix, then copied to the device, so every device starts identically
    generator = torch.Generator().manual_seed(cfg.seed)
    A0 = {}
    for name in names:
        d_out, d_in = weights[name].shape
        A0[name] = (sigma_bar * torch.randn(r, d_in, generator=generator),
                    sigma_bar * torch.randn(d_out, r, generator=generator))
    for s in stacks:
        for l, name in enumerate(s["names"]):
            s["A"][l].copy_(A0[name][0])
            s["B"][l].copy_(A0[name][1])

    def gradients(with_loss):
        """Writes dL_i/dA, dL_i/dB into grad; returns the (L,) losses of every stack if asked."""
        losses = []
        for s in stacks:
            W, A, B, AWt, BtW, AAt, BtB = (s[k] for k in ("W", "A", "B", "AWt", "BtW", "AAt", "BtB"))
            # W A^T and B^T W. A stack too big for the CPU's cache goes matrix by matrix, so that
            # the second read of W[l] hits the cache: 1.2x faster on 24 x 768x768, 1 thread
            for i in s["slices"]:
                # (L, r, d_in) @ (L, d_in, d_out) -> (L, r, d_out), AWt = (W A^T)^T
                torch.bmm(A[i], W[i].mT, out=AWt[i])
                torch.bmm(B[i].mT, W[i], out=BtW[i])  # (L, r, d_out) @ (L, d_out, d_in) -> (L, r, d_in)
            torch.bmm(A, A.mT, out=AAt)  # (L, r, d_in) @ (L, d_in, r) -> (L, r, r)
            torch.bmm(B.mT, B, out=BtB)  # (L, r, d_out) @ (L, d_out, r) -> (L, r, r)
            c = 2.0 / s["n"]
            # dL/dB = (2/n) (B (A A^T) - W A^T): (L, d_out, r) @ (L, r, r) -> (L, d_out, r)
            torch.baddbmm(AWt.mT, B, AAt, beta=-c, alpha=c, out=s["gB"])
            # dL/dA = (2/n) (B^T B A - B^T W): (L, r, r) @ (L, r, d_in) -> (L, r, d_in)
            torch.baddbmm(BtW, BtB, A, beta=-c, alpha=c, out=s["gA"])
            if with_loss:
                # n L = ||W||^2 - 2 <B, W A^T> + <B^T B, A A^T>   -> (L,)
                cross = (B.mT * AWt).sum(dim=(1, 2))
                quad = (BtB * AAt).sum(dim=(1, 2))
                losses.append((s["W_norm2"] - 2 * cross + quad) / s["n"])
        return torch.cat(losses).tolist() if with_loss else None  # one device sync per reading

    order = [name for s in stacks for name in s["names"]]
    curve_steps, curve = [], {name: [] for name in names}

    def read(t, prev_t):
        losses = gradients(with_loss=True)
        for name, loss in zip(order, losses):
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the approximation diverged: the loss of {name!r} is {loss} at step {t} "
                    f"(last finite reading at step {prev_t}). Nothing was returned or cached. "
                    f"Lower --lr (now {cfg.lr}) and run again.")
            curve[name].append(loss)
        curve_steps.append(t)
        return sum(losses)

    # eq. 3 by Adam with StepLR
    every = max(1, cfg.steps // READINGS)
    window = math.ceil(cfg.tol_window / every)  # readings in one --tol window
    totals, lr, t = [], cfg.lr, 0
    loop_start = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="approximating", unit="step", dynamic_ncols=True)
    for t in range(cfg.steps):
        if t % every == 0:
            totals.append(read(t, curve_steps[-1] if curve_steps else None))
            bar.set_postfix(loss=f"{totals[-1] / len(names):.4e}", lr=f"{lr:.2e}")
            bar.update(t - bar.n)
            if cfg.tol is not None and len(totals) > window:
                if totals[-1 - window] - totals[-1] <= cfg.tol * totals[-1 - window]:
                    print(f"stopping early at step {t}: the total loss improved by less than "
                          f"tol={cfg.tol} over the last {window * every} steps")
                    break
        else:
            gradients(with_loss=False)
        # StepLR: lr <- lr * gamma every lr_step steps (chained, as torch's StepLR computes it)
        if t and t % cfg.lr_step == 0:
            lr *= cfg.lr_gamma
        # Adam, as torch.optim.Adam computes it (k = t + 1):
        #   m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        #   theta <- theta - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)
        k = t + 1
        m.lerp_(grad, 1 - BETA1)
        v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        torch.sqrt(v, out=denom).div_((1 - BETA2**k) ** 0.5).add_(EPS)
        theta.addcdiv_(m, denom, value=-lr / (1 - BETA1**k))
    else:
        t = cfg.steps
        read(t, curve_steps[-1] if curve_steps else None)
    bar.update(t - bar.n)
    bar.close()
    loop_seconds = time.perf_counter() - loop_start

    factors = {name: (s["A"][l].to("cpu", copy=True), s["B"][l].to("cpu", copy=True))
               for s in stacks for l, name in enumerate(s["names"])}
    del stacks, theta, grad, m, v, denom

    # the report: the final MSE exactly (float64, one matrix at a time) against the optimum
    for name in names:
        W64 = weights[name].detach().to(svd_device, torch.float64)
        A, B = (x.to(svd_device, torch.float64) for x in factors[name])
        # W - B A: (d_out, r) @ (r, d_in) -> (d_out, d_in), one float64 temporary
        row = stats[name]
        row["mse"] = torch.addmm(W64, B, A, alpha=-1).square_().sum().item() / W64.numel()
        if cfg.optimum:
            row["ratio"] = row["mse"] / row["optimal_mse"] if row["optimal_mse"] > 0 else None
    report = dict(
        device=str(device), device_reason=reason, mu_bar=mu_bar, sigma_bar=sigma_bar,
        steps_run=t, stopped_early=t < cfg.steps, seconds=time.perf_counter() - start,
        seconds_loop=loop_seconds, threads=torch.get_num_threads(), config=asdict(cfg),
        matrices=stats, curve=dict(steps=curve_steps, loss=curve))
    return factors, report


# -----------------------------------------------------------------------------
# the cache: <cache_dir>/<model>-r<rank>-<key>.safetensors (A, B) + .json sidecar (settings, report)


def default_cache_dir():
    return Path(os.environ.get("INILORA_CACHE") or "~/.cache/inilora").expanduser()


def cache_paths(cache_dir, model_id, fingerprint, cfg):
    """The cache files for these weights and settings: the name hashes everything that matters."""
    keyed = dict(format_version=FORMAT_VERSION, model_id=model_id,
                 weights_fingerprint=fingerprint, settings=cfg.settings())
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model_id)}-r{cfg.rank}-{key}"
    return Path(cache_dir) / f"{stem}.safetensors", Path(cache_dir) / f"{stem}.json"


def check_writable(cache_dir):
    """Raises ValueError now, before any computation, if the cache could not be written later."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as e:
        raise ValueError(f"the cache directory {str(cache_dir)!r} is not writable "
                         f"({e.strerror or e}). Pass --cache-dir (or set INILORA_CACHE) to a "
                         "writable directory.") from None


def _difference(found, expected):
    if isinstance(found, dict) and isinstance(expected, dict):
        keys = sorted(k for k in expected.keys() | found.keys() if found.get(k) != expected.get(k))
        return ", ".join(f"{k}={found.get(k)!r} (expected {expected.get(k)!r})" for k in keys)
    return f"{found!r} (expected {expected!r})"


def read_cache(st_path, js_path, expected, shapes, r):
    """Returns ({name: (A, B)}, report), or (None, a sentence saying why the cache is not used)."""
    if not st_path.exists() and not js_path.exists():
        return None, f"cache miss: nothing cached yet at {st_path}"
    try:
        sidecar = json.loads(js_path.read_text())
        assert isinstance(sidecar, dict), "the sidecar is not a JSON object"
    except FileNotFoundError:
        return None, f"cache damaged: its sidecar {js_path} is missing (an interrupted write?)"
    except (OSError, ValueError, AssertionError) as e:
        return None, f"cache damaged: {js_path} is not a readable sidecar ({e})"
    for key, value in expected.items():
        if sidecar.get(key) != value:
            return None, (f"cache mismatch: {js_path} has {key} "
                          f"{_difference(sidecar.get(key), value)}")
    try:
        data = st_path.read_bytes()
    except OSError as e:
        return None, f"cache damaged: {st_path} cannot be read ({e.strerror or e})"
    if hashlib.sha256(data).hexdigest() != sidecar.get("safetensors_sha256"):
        return None, (f"cache damaged: {st_path} does not match the checksum in its sidecar "
                      "(truncated or overwritten)")
    try:
        tensors = safetensors_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        return None, f"cache damaged: {st_path} is not a valid safetensors file ({e})"
    wanted = {f"{name}.{k}": shape for name, (d_out, d_in) in shapes.items()
              for k, shape in (("A", (r, d_in)), ("B", (d_out, r)))}
    if set(tensors) != set(wanted):
        return None, (f"cache damaged: {st_path} lacks {sorted(wanted.keys() - tensors.keys())} "
                      f"and has unexpected {sorted(tensors.keys() - wanted.keys())}")
    for key, shape in wanted.items():
        T = tensors[key]
        if tuple(T.shape) != shape or T.dtype != torch.float32 or not torch.isfinite(T).all():
            return None, (f"cache damaged: {key} in {st_path} is a {T.dtype} {tuple(T.shape)} "
                          f"tensor; expected finite float32 {shape}")
    return {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in shapes}, sidecar["report"]


def load_or_approximate(model_id, weights, cfg, cache_dir=None):
    """{name: (A, B)} from the cache when model, weights and settings all match; else computed and
    cached. Says which happened and why."""
    return cached_approximation(model_id, weights, cfg, cache_dir)[0]


def cached_approximation(model_id, weights, cfg, cache_dir=None):
    """load_or_approximate that also returns the report and the cache file's path."""
    names = validate(weights, cfg)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    check_writable(cache_dir)
    fingerprint = weights_fingerprint(weights)
    st_path, js_path = cache_paths(cache_dir, model_id, fingerprint, cfg)
    expected = dict(format_version=FORMAT_VERSION, model_id=model_id,
                    weights_fingerprint=fingerprint, targets=names, settings=cfg.settings())
    shapes = {name: tuple(weights[name].shape) for name in names}
    factors, report = read_cache(st_path, js_path, expected, shapes, cfg.rank)
    if factors is not None:
        print(f"cache hit: {st_path}")
        return factors, report, st_path
    print(f"{report}; approximating")
    factors, report = approximate(weights, cfg)
    # safetensors first, the sidecar (which holds its checksum) last: a cache only looks valid
    # once both are complete
    data = safetensors_save({f"{name}.{k}": t for name, (A, B) in factors.items()
                             for k, t in (("A", A), ("B", B))})
    write_atomic(st_path, data)
    sidecar = dict(expected, safetensors_sha256=hashlib.sha256(data).hexdigest(), report=report)
    write_atomic(js_path, json.dumps(sidecar, indent=1, allow_nan=False).encode())
    print(f"cached: {st_path}")
    return factors, report, st_path


# -----------------------------------------------------------------------------
# command line


def format_report(report):
    rows = [f"{'matrix':<44} {'shape':>9} {'mse':>11} {'optimum':>11} {'ratio':>9}"]
    for name, row in report["matrices"].items():
        optimum = f"{row['optimal_mse']:11.4e}" if "optimal_mse" in row else f"{'-':>11}"
        ratio = f"{row['ratio']:9.6f}" if row.get("ratio") is not None else f"{'-':>9}"
        shape = "x".join(map(str, row["shape"]))
        rows.append(f"{name:<44} {shape:>9} {row['mse']:11.4e} {optimum} {ratio}")
    rows.append(f"sigma_bar {report['sigma_bar']:.4e} (mu_bar {report['mu_bar']:.1e}) | "
                f"{report['steps_run']} steps in {report['seconds']:.1f} s "
                f"({report['seconds_loop']:.1f} s of Adam) on {report['device']}, "
                f"{report['threads']} CPU threads")
    return "\n".join(rows)


def main(argv=None):
    d = ApproxConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="model name or directory (default: minilm)")
    p.add_argument("--targets", default="query,value",
                   help="comma-separated names of the linear layers to approximate")
    p.add_argument("--rank", type=int, default=d.rank, help="rank r of A (r, d_in) and B (d_out, r)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="Adam steps (eq. 3); 0 returns A0, B0 ~ N(0, sigma_bar^2)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--lr-step", type=int, default=d.lr_step, help="StepLR: decay lr every this many steps")
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="StepLR: lr factor per decay")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the draw of A0, B0")
    p.add_argument("--tol", type=float, default=None,
                   help="stop early once the total loss improves by less than this fraction over "
                        "--tol-window steps (default: off, run all steps as the paper does)")
    p.add_argument("--tol-window", type=int, default=d.tol_window, help="window of --tol, in steps")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda, then mps, then cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core); on a CPU shared with "
                        "other busy processes 1 thread can be several times faster")
    p.add_argument("--cache-dir", default=None,
                   help="where A, B are cached (default: $INILORA_CACHE or ~/.cache/inilora)")
    p.add_argument("--no-optimum", action="store_true",
                   help="skip the Eckart-Young optimum in the report (one float64 SVD per matrix)")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        raise ValueError(f"--targets {args.targets!r} names no layer; expected e.g. 'query,value'.")
    cfg = ApproxConfig(rank=args.rank, steps=args.steps, lr=args.lr, lr_step=args.lr_step,
                       lr_gamma=args.lr_gamma, seed=args.seed, tol=args.tol,
                       tol_window=args.tol_window, device=args.device, optimum=not args.no_optimum)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be at least 1.")
        torch.set_num_threads(args.threads)
    cache_dir = default_cache_dir() if args.cache_dir is None else Path(args.cache_dir).expanduser()
    print(f"config: {asdict(cfg)}, model={args.model!r}, targets={targets}, cache_dir={str(cache_dir)!r}")
    import model as model_lib  # imported here: the functions above need only a dict of tensors

    net, _, model_id = model_lib.load_model(args.model)
    weights = {name: linear.weight.detach()
               for name, linear in model_lib.target_linears(net, targets).items()}
    _, report, path = cached_approximation(model_id, weights, cfg, cache_dir)
    print(format_report(report))
    print(f"A, B and this report: {path} and {path.with_suffix('.json')}")
    return report


if __name__ == "__main__":
    run_cli(main)
