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

The file reads in that order: 1) statistics; the paper's algorithm as its authors ran it (one autograd Adam
loop per matrix, `reference_approximation`), then the same computed fast: 2) start, 3) gradient, 4) Adam;
5) report; then the
cache (6: in --cache-dir, else $INILORA_CACHE, else ~/.cache/inilora) that every later --init inilora run
reads, and 7) the command line.

Under torchrun (`torchrun --nproc_per_node N approximate.py ...`) the ranks share the matrices, balanced by
size; each starts its own from the draw one process would make, so the cache written (by rank 0) holds the
same A, B as a single process's.

Run:  python approximate.py --model minilm --rank 8 --steps 20000
      torchrun --nproc_per_node 2 approximate.py --model minilm    (2 processes)
"""
import argparse
import contextlib
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import models
from lib import distributed
from lib.artifacts import ArtifactError, check_tensors, save_artifact, sidecar_path, weights_fingerprint
from lib.cache import cache_root, check_writable, key_hash, lookup
from lib.common import choose_threads, pick_device, run_cli
from lib.distributed import World

# Shape legend: L stacked matrices of one shape, d_out rows (output features), d_in columns
# (input features), r rank, P all entries of all A's and B's. A is (r, d_in), B is (d_out, r),
# W is (d_out, d_in).

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
    tol: float | None = None  # early stop (see optimise()); None follows the paper
    tol_window: int = 1000  # steps over which --tol measures the improvement
    device: str | None = None  # None: cuda, then mps, then cpu
    optimum: bool = True  # report the Eckart-Young optimum (one float64 SVD per matrix)

    def settings(self):
        """Every setting that changes A, B: the cache is keyed by these."""
        return dict(rank=self.rank, steps=self.steps, lr=self.lr, lr_step=self.lr_step,
                    lr_gamma=self.lr_gamma, seed=self.seed, tol=self.tol,
                    tol_window=self.tol_window if self.tol is not None else None)


@dataclass
class Stack:
    """L targets of one shape and the work space of eq. 3; A, B, gA, gB are views into Flat."""
    names: list  # L names
    n: int  # d_out * d_in, the number of entries the MSE averages over
    W: torch.Tensor  # (L, d_out, d_in) float32 on the device
    W_norm2: torch.Tensor  # (L,) ||W||^2, from the float64 statistics
    A: torch.Tensor  # (L, r, d_in)
    B: torch.Tensor  # (L, d_out, r)
    gA: torch.Tensor  # (L, r, d_in) dL/dA
    gB: torch.Tensor  # (L, d_out, r) dL/dB
    AWt: torch.Tensor  # (L, r, d_out) A W^T = (W A^T)^T
    BtW: torch.Tensor  # (L, r, d_in) B^T W
    AAt: torch.Tensor  # (L, r, r) A A^T
    BtB: torch.Tensor  # (L, r, r) B^T B
    slices: list  # [slice(0, L)], or one slice per matrix for a stack too big for the CPU cache


@dataclass
class Flat:
    """Every A and B of every stack in one buffer, so that Adam is a handful of ops per step."""
    theta: torch.Tensor  # (P,) all A's and B's
    grad: torch.Tensor  # (P,) dL/dtheta
    m: torch.Tensor  # (P,) Adam's first moment
    v: torch.Tensor  # (P,) Adam's second moment
    denom: torch.Tensor  # (P,) work space of the Adam step


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
    smallest = min(sorted(weights), key=lambda name: min(weights[name].shape))
    largest = min(weights[smallest].shape)  # the largest rank every target allows
    checks = [
        (cfg.rank >= 1, f"rank={cfg.rank} must be at least 1; pass e.g. --rank 8."),
        (cfg.rank <= largest, f"rank={cfg.rank} does not fit target {smallest!r} of shape "
                              f"{tuple(weights[smallest].shape)}: the largest rank allowed is "
                              f"{largest}. Pass --rank {largest} or less."),
        (cfg.steps >= 0, f"steps={cfg.steps} is negative; expected 0 (A0, B0 only) or more."),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"lr={cfg.lr} must be a positive number, e.g. 5e-4."),
        (cfg.lr_step >= 1, f"lr_step={cfg.lr_step} must be at least 1 (StepLR's step_size)."),
        (0 < cfg.lr_gamma <= 1, f"lr_gamma={cfg.lr_gamma} must be in (0, 1]; 1 keeps lr fixed."),
        (cfg.tol is None or cfg.tol >= 0, f"tol={cfg.tol} must be >= 0; leave it out to run all steps."),
        (cfg.tol_window >= 1, f"tol_window={cfg.tol_window} must be at least 1 step."),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    pick_device(cfg.device)  # raises for a device that does not exist here
    return sorted(weights)




# -----------------------------------------------------------------------------
# 1) statistics: eq. 1-2, ||W||^2 for the loss, and the Eckart-Young optimum


def statistics(weights, names, r, optimum, svd_device):
    """{name: row} in float64 on CPU (so CPU and CUDA start alike), before the stacks exist (so the
    SVD work space never adds to their memory)."""
    stats = {}
    for name in tqdm(names, desc="statistics" + (" and SVDs" if optimum else "")):
        W64 = weights[name].detach().to("cpu", torch.float64)
        # eq. 1: mu_i, sigma_i; and ||W||^2 for the closed-form loss
        row = dict(shape=list(W64.shape), mu=W64.mean().item(), sigma=W64.std(correction=0).item(),
                   norm2=W64.square().sum().item())
        if optimum:
            # Eckart-Young: the best rank-r MSE is the energy beyond the r largest singular values
            S = torch.linalg.svdvals(W64.to(svd_device))  # (min(d_out, d_in),)
            row["optimal_mse"] = S[r:].square().sum().item() / W64.numel()
        stats[name] = row
    return stats


def pooled(stats):
    """(mu_bar, sigma_bar) of eq. 2: the means of mu_i and sigma_i over every target, in `stats`' order."""
    return (sum(row["mu"] for row in stats.values()) / len(stats),
            sum(row["sigma"] for row in stats.values()) / len(stats))


# -----------------------------------------------------------------------------
# eq. 3 as the paper's authors ran it: one matrix at a time, autograd, torch.optim.Adam and StepLR. Sections 2-4
# below compute exactly these steps for every matrix at once, without autograd (tests/test_approximate.py's
# test_batched_closed_form_equals_per_matrix_autograd_adam pins the two equal, step for step)


def reference_approximation(W, A0, B0, cfg, on_step=None):
    """eq. 3 for one W (d_out, d_in) from A0 (r, d_in), B0 (d_out, r): cfg.steps Adam steps at cfg.lr, StepLR
    (cfg.lr_step, cfg.lr_gamma). Returns (A, B); on_step(loss, A, B), if given, sees every step's loss (before
    the step) and the A, B after it (detached views: copy them to keep them)."""
    A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    opt = torch.optim.Adam([A, B], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    for _ in range(cfg.steps):
        loss = ((W - B @ A) ** 2).mean()  # L = mean((W - B A)^2): (d_out, r) @ (r, d_in) -> (d_out, d_in)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(loss.detach(), A.detach(), B.detach())
    return A.detach(), B.detach()

# -----------------------------------------------------------------------------
# 2) the start: the stacks, and A0, B0 ~ N(0, sigma_bar^2)


def make_stacks(weights, names, stats, r, device):
    """Stacks of same-shape matrices, in sorted-name order; every A and B lives in Flat.theta,
    stack after stack, A then B, and every gradient at the same place in Flat.grad."""
    shapes = {}
    for name in names:
        shapes.setdefault(tuple(weights[name].shape), []).append(name)
    numel = sum(len(group) * r * (d_out + d_in) for (d_out, d_in), group in shapes.items())
    flat = Flat(torch.empty(numel, device=device), *(torch.zeros(numel, device=device) for _ in range(4)))
    stacks, offset = [], 0
    for (d_out, d_in), group in shapes.items():
        L = len(group)
        views = {}
        for key, shape in (("A", (L, r, d_in)), ("B", (L, d_out, r))):
            size = math.prod(shape)
            views[key] = flat.theta[offset:offset + size].view(shape)
            views["g" + key] = flat.grad[offset:offset + size].view(shape)
            offset += size
        W = torch.empty(L, d_out, d_in, device=device)
        for l, name in enumerate(group):
            W[l].copy_(weights[name].detach())  # float32 on the device, no extra copy
        whole = device.type != "cpu" or 4 * L * d_out * d_in <= CPU_CACHE_BYTES
        stacks.append(Stack(
            names=group, n=d_out * d_in, W=W,
            W_norm2=torch.tensor([stats[name]["norm2"] for name in group], device=device),  # (L,)
            **views, AWt=torch.empty(L, r, d_out, device=device), BtW=torch.empty(L, r, d_in, device=device),
            AAt=torch.empty(L, r, r, device=device), BtB=torch.empty(L, r, r, device=device),
            slices=[slice(0, L)] if whole else [slice(l, l + 1) for l in range(L)]))
    assert offset == numel
    return stacks, flat


def draw_start(stacks, sigma_bar, r, seed, shapes):
    """A0, B0 ~ N(0, sigma_bar^2): drawn on CPU from one generator in sorted-name order over ALL the
    targets (`shapes`: {name: (d_out, d_in)}), A then B per matrix, and copied to the device for the
    stacks' own matrices, so every device, and every rank of a sharded run, starts identically."""
    where = {name: (stack, l) for stack in stacks for l, name in enumerate(stack.names)}
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(shapes):
        d_out, d_in = shapes[name]
        A0 = sigma_bar * torch.randn(r, d_in, generator=generator)  # (r, d_in)
        B0 = sigma_bar * torch.randn(d_out, r, generator=generator)  # (d_out, r)
        if name in where:  # another rank's matrix: drawn all the same, to keep the generator in step
            stack, l = where[name]
            stack.A[l].copy_(A0)
            stack.B[l].copy_(B0)


# -----------------------------------------------------------------------------
# 3) the closed-form gradient of eq. 3


def gradients(stacks, with_loss):
    """Writes dL_i/dA, dL_i/dB into every stack's gA, gB; returns the losses (stack order) if asked."""
    losses = []
    for stack in stacks:
        W, A, B, AWt, BtW, AAt, BtB = (stack.W, stack.A, stack.B, stack.AWt, stack.BtW, stack.AAt,
                                        stack.BtB)
        # W A^T and B^T W. A stack too big for the CPU's cache goes matrix by matrix, so that
        # the second read of W[l] hits the cache: 1.2x faster on 24 x 768x768, 1 thread
        for i in stack.slices:
            # (L, r, d_in) @ (L, d_in, d_out) -> (L, r, d_out), AWt = (W A^T)^T
            torch.bmm(A[i], W[i].mT, out=AWt[i])
            torch.bmm(B[i].mT, W[i], out=BtW[i])  # (L, r, d_out) @ (L, d_out, d_in) -> (L, r, d_in)
        torch.bmm(A, A.mT, out=AAt)  # (L, r, d_in) @ (L, d_in, r) -> (L, r, r)
        torch.bmm(B.mT, B, out=BtB)  # (L, r, d_out) @ (L, d_out, r) -> (L, r, r)
        c = 2.0 / stack.n
        # dL/dB = (2/n) (B (A A^T) - W A^T): (L, d_out, r) @ (L, r, r) -> (L, d_out, r)
        torch.baddbmm(AWt.mT, B, AAt, beta=-c, alpha=c, out=stack.gB)
        # dL/dA = (2/n) (B^T B A - B^T W): (L, r, r) @ (L, r, d_in) -> (L, r, d_in)
        torch.baddbmm(BtW, BtB, A, beta=-c, alpha=c, out=stack.gA)
        if with_loss:
            # n L = ||W||^2 - 2 <B, W A^T> + <B^T B, A A^T>   -> (L,)
            cross = (B.mT * AWt).sum(dim=(1, 2))
            quad = (BtB * AAt).sum(dim=(1, 2))
            losses.append((stack.W_norm2 - 2 * cross + quad) / stack.n)
    return torch.cat(losses).tolist() if with_loss else None


# -----------------------------------------------------------------------------
# 4) Adam with StepLR


def adam_step(flat, lr, k):
    """One torch.optim.Adam step over every A and B, as torch computes it (k = t + 1):
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        theta <- theta - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)"""
    flat.m.lerp_(flat.grad, 1 - BETA1)
    flat.v.mul_(BETA2).addcmul_(flat.grad, flat.grad, value=1 - BETA2)
    torch.sqrt(flat.v, out=flat.denom).div_((1 - BETA2**k) ** 0.5).add_(EPS)
    flat.theta.addcdiv_(flat.m, flat.denom, value=-lr / (1 - BETA1**k))


def read_losses(stacks, curve, t, lr):
    """Gradients, and losses at step t into the curve; raises if one is not finite; returns sum_i L_i."""
    losses = gradients(stacks, with_loss=True)
    names = [name for stack in stacks for name in stack.names]
    for name, loss in zip(names, losses):
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the approximation diverged: the loss of {name!r} is {loss} at step {t} (last "
                f"finite reading at step {curve['steps'][-1] if curve['steps'] else None}). Nothing "
                f"was returned or cached. Lower --lr (now {lr}) and run again.")
        curve["loss"][name].append(loss)
    curve["steps"].append(t)
    return sum(losses)


def optimise(stacks, flat, names, cfg, world=World()):
    """Minimises eq. 3 from the stacks' A0, B0; returns (steps run, loss curve). Every
    max(1, T // READINGS) steps, and after the last, the closed-form losses (float32) are read:
    a non-finite one stops the run, and with cfg.tol so does a total loss sum_i L_i that improved
    by less than tol (relative) over the last tol_window steps (rounded up to whole readings)."""
    curve = dict(steps=[], loss={name: [] for name in names})
    every = max(1, cfg.steps // READINGS)
    window = math.ceil(cfg.tol_window / every)  # readings in one --tol window
    totals, lr, t = [], cfg.lr, 0
    bar = tqdm(total=cfg.steps, desc="approximating", unit="step", dynamic_ncols=True)
    for t in range(cfg.steps):
        if t % every == 0:
            # sum_i L_i over every target: a sharded run adds up the ranks' shares, so all stop together
            total = read_losses(stacks, curve, t, cfg.lr)
            if world.size > 1:  # a tensor on the stacks' device: NCCL reduces only GPU tensors
                total = distributed.sum_tensor(torch.tensor([total], device=flat.theta.device), world).item()
            totals.append(total)
            bar.set_postfix(loss=f"{totals[-1] / len(names):.4e}", lr=f"{lr:.2e}")
            bar.update(t - bar.n)
            if (cfg.tol is not None and len(totals) > window
                    and totals[-1 - window] - totals[-1] <= cfg.tol * totals[-1 - window]):
                print(f"stopping early at step {t}: the total loss improved by less than "
                      f"tol={cfg.tol} over the last {window * every} steps")
                break
        else:
            gradients(stacks, with_loss=False)
        # StepLR: lr <- lr * gamma every lr_step steps (chained, as torch's StepLR computes it)
        if t and t % cfg.lr_step == 0:
            lr *= cfg.lr_gamma
        adam_step(flat, lr, k=t + 1)
    else:
        t = cfg.steps
        read_losses(stacks, curve, t, cfg.lr)
    bar.update(t - bar.n)
    bar.close()
    return t, curve


# -----------------------------------------------------------------------------
# 5) the report against Eckart-Young, and the whole approximation


def final_errors(weights, factors, stats, svd_device, optimum):
    """Adds to every row the final MSE (float64, one matrix at a time) and its ratio to the optimum."""
    for name, row in stats.items():
        W64 = weights[name].detach().to(svd_device, torch.float64)
        A, B = (x.to(svd_device, torch.float64) for x in factors[name])
        # W - B A: (d_out, r) @ (r, d_in) -> (d_out, d_in), one float64 temporary
        row["mse"] = torch.addmm(W64, B, A, alpha=-1).square_().sum().item() / W64.numel()
        if optimum:
            row["ratio"] = row["mse"] / row["optimal_mse"] if row["optimal_mse"] > 0 else None


def assign(weights, names, world):
    """This rank's targets: the largest first, each to the rank with the least work so far (entries), so
    the ranks' shares are balanced by size; all of them in one process."""
    load, mine = [0] * world.size, []
    for name in sorted(names, key=lambda name: (-weights[name].numel(), name)):
        rank = load.index(min(load))
        load[rank] += weights[name].numel()
        if rank == world.rank:
            mine.append(name)
    return [name for name in names if name in mine]


def approximate(weights, cfg, world=World()):
    """Fits B A to every weight by eq. 3. Returns ({name: (A, B)} on CPU in float32, report).
    Under torchrun (lib/distributed.py) each rank fits its share of the matrices, from the same start as one
    process would, and every rank returns all of them."""
    names = validate(weights, cfg)
    device, reason = pick_device(cfg.device)
    mine = assign(weights, names, world)
    share = f", {len(mine)} of them on rank {world.rank} of {world.size}" if world.size > 1 else ""
    print(f"approximating {len(names)} matrices at rank {cfg.rank} on {device} ({reason}), float32{share}")
    start = time.perf_counter()
    svd_device = device if device.type == "cuda" else torch.device("cpu")  # no float64 on MPS
    stats = statistics(weights, mine, cfg.rank, cfg.optimum, svd_device)  # 1), this rank's share ...
    stats = {name: row for part in distributed.gather(stats, world) for name, row in part.items()}
    stats = {name: stats[name] for name in names}  # ... then every target's, in one order on every rank
    mu_bar, sigma_bar = pooled(stats)  # eq. 2
    stacks, flat = make_stacks(weights, mine, stats, cfg.rank, device)  # 2)
    draw_start(stacks, sigma_bar, cfg.rank, cfg.seed, {name: tuple(weights[name].shape) for name in names})
    loop_start = time.perf_counter()
    steps_run, curve = optimise(stacks, flat, mine, cfg, world)  # 3) and 4)
    loop_seconds = time.perf_counter() - loop_start
    factors = {name: (stack.A[l].to("cpu", copy=True), stack.B[l].to("cpu", copy=True))
               for stack in stacks for l, name in enumerate(stack.names)}
    del stacks, flat  # the report's float64 temporaries need not sit beside them
    mine_stats = {name: stats[name] for name in mine}
    final_errors(weights, factors, mine_stats, svd_device, cfg.optimum)  # 5)
    parts = distributed.gather((factors, mine_stats, curve["loss"]), world)  # every rank gets every matrix
    factors = {name: f for part in parts for name, f in part[0].items()}
    stats = {name: {**stats[name], **part[1][name]} for part in parts for name in part[1]}
    curve["loss"] = {name: loss for part in parts for name, loss in part[2].items()}
    report = dict(
        device=str(device), device_reason=reason, mu_bar=mu_bar, sigma_bar=sigma_bar,
        steps_run=steps_run, stopped_early=steps_run < cfg.steps,
        seconds=time.perf_counter() - start, seconds_loop=loop_seconds, threads=torch.get_num_threads(),
        world_size=world.size, config=asdict(cfg), matrices={name: stats[name] for name in names},
        curve=dict(steps=curve["steps"], loss={name: curve["loss"][name] for name in names}))
    return {name: factors[name] for name in names}, report


# -----------------------------------------------------------------------------
# 6) load or approximate: computed once per model, weights and settings, then read from the cache
#
#     <cache_dir>/<model>-r<rank>-<key>.safetensors   A (r, d_in), B (d_out, r) of every target, float32
#     <cache_dir>/<model>-r<rank>-<key>.json          the settings and the approximation's report
#
# with <key> a hash of all that matters, in --cache-dir, else $INILORA_CACHE, else ~/.cache/inilora.

ARTIFACT_KIND = "inilora-approximation"  # the cache's format name in its sidecar
ARTIFACT_VERSION = 2  # bump when the cache's layout or meaning changes (1: its own sidecar code)


def default_cache_dir():
    return cache_root()


def cache_path(cache_dir, model_id, fingerprint, cfg):
    """The cache for these weights and settings (its sidecar: .json): the name hashes all that matters."""
    key = key_hash(dict(format_version=ARTIFACT_VERSION, model_id=model_id, weights_fingerprint=fingerprint,
                        settings=cfg.settings()))
    stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model_id)}-r{cfg.rank}-{key}"
    return Path(cache_dir) / f"{stem}.safetensors"


def read_factors(shapes, r, path):
    """lookup's `read`: {name: (A, B)} after checking A (r, d_in) and B (d_out, r) of every target, float32."""
    def read(tensors, meta):
        check_tensors(tensors, {f"{name}.{k}": shape for name, (d_out, d_in) in shapes.items()
                                for k, shape in (("A", (r, d_in)), ("B", (d_out, r)))}, path, "")
        if wrong := sorted(key for key, T in tensors.items() if T.dtype != torch.float32):
            raise ArtifactError(f"{str(path)!r} holds {wrong[:4]} in another dtype than float32")
        return {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in shapes}, meta["report"]
    return read


def load_or_approximate(model_id, weights, cfg, cache_dir=None):
    """{name: (A, B)} from the cache when model, weights and settings all match; else computed and
    cached. Says which happened and why."""
    return cached_approximation(model_id, weights, cfg, cache_dir)[0]


def cached_approximation(model_id, weights, cfg, cache_dir=None, world=World()):
    """load_or_approximate that also returns the report and the cache file's path. Under torchrun every
    rank calls it: the ranks share the matrices (approximate) and rank 0 alone writes."""
    names = validate(weights, cfg)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    check_writable(cache_dir)
    fingerprint = weights_fingerprint(weights)
    path = cache_path(cache_dir, model_id, fingerprint, cfg)
    expected = dict(model_id=model_id, weights_fingerprint=fingerprint, targets=names, settings=cfg.settings())
    shapes = {name: tuple(weights[name].shape) for name in names}
    found, reason = lookup(path, ARTIFACT_KIND, ARTIFACT_VERSION, expected, read=read_factors(shapes, cfg.rank, path))
    if found is not None:
        print(f"cache hit: {path}")
        return (*found, path)
    print(f"{reason}; approximating")
    factors, report = approximate(weights, cfg, world)
    if world.main:
        save_artifact(path, {f"{name}.{k}": t for name, (A, B) in factors.items() for k, t in (("A", A), ("B", B))},
                      dict(expected, report=report), ARTIFACT_KIND, ARTIFACT_VERSION)
    distributed.barrier(world)  # the file exists for every rank once this returns
    print(f"cached: {path}")
    return factors, report, path


# -----------------------------------------------------------------------------
# 7) command line


def target_weights(model_name, targets=None):
    """(model_id, {name: W0}, targets) of `model_name`, loaded as train.py loads it; targets None
    means the model family's default LoRA targets (docs/method.md "Default targets")."""
    loaded = models.load(model_name)
    targets = targets or loaded.targets
    linears = models.target_linears(loaded.model, tuple(targets))
    return loaded.model_id, {name: m.weight.detach() for name, m in linears.items()}, tuple(targets)


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


def parse_args(argv):
    d = ApproxConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm", help="model name or directory")
    p.add_argument("--targets", default=None,
                   help="comma-separated names of the linear layers to approximate; None: the model "
                        "family's LoRA targets (query,value for BERT/RoBERTa, q_proj,v_proj for decoders)")
    p.add_argument("--rank", type=int, default=d.rank, help="rank r of A (r, d_in) and B (d_out, r)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="Adam steps (eq. 3); 0 returns A0, B0 ~ N(0, sigma_bar^2)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--lr-step", type=int, default=d.lr_step, help="StepLR: decay lr every this many steps")
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="StepLR: lr factor per decay")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the draw of A0, B0")
    p.add_argument("--tol", type=float, default=d.tol,
                   help="stop early once the total loss improves by less than this fraction over "
                        "--tol-window steps; None runs all steps, as the paper does")
    p.add_argument("--tol-window", type=int, default=d.tol_window, help="window of --tol, in steps")
    p.add_argument("--device", default=d.device, help="cpu, cuda, mps; None: cuda, then mps, then cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; None: one per core that other programs leave free at start "
                        "(beside a busy neighbour torch's one per core can be several times slower)")
    p.add_argument("--cache-dir", default=None,
                   help="where A, B are cached; None: $INILORA_CACHE, else ~/.cache/inilora")
    p.add_argument("--no-optimum", action="store_true",
                   help="skip the Eckart-Young optimum in the report (one float64 SVD per matrix)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world, device = distributed.init(args.device)  # torchrun: this rank's GPU, or the CPU; else (.., None)
    if device is not None:
        args.device = str(device)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(sys.stdout if world.main else quiet):
            return run(args, world)  # rank 0 alone prints
    finally:
        distributed.finish(world)


def run(args, world):
    targets = None if args.targets is None else list(models.parse_targets(args.targets))
    if targets == []:
        raise ValueError(f"--targets {args.targets!r} names no layer; expected e.g. 'query,value' or 'q_proj,v_proj'.")
    cfg = ApproxConfig(rank=args.rank, steps=args.steps, lr=args.lr, lr_step=args.lr_step,
                       lr_gamma=args.lr_gamma, seed=args.seed, tol=args.tol,
                       tol_window=args.tol_window, device=args.device, optimum=not args.no_optimum)
    threads, threads_why = choose_threads(args.threads)
    print(f"CPU threads: {threads} ({threads_why})")
    cache_dir = default_cache_dir() if args.cache_dir is None else Path(args.cache_dir).expanduser()
    why = ("--cache-dir" if args.cache_dir else "$INILORA_CACHE" if os.environ.get("INILORA_CACHE")
           else "the default; move it with --cache-dir or $INILORA_CACHE")
    print(f"config: {asdict(cfg)}, model={args.model!r}")
    print(f"cache directory: {cache_dir} ({why})")
    model_id, weights, targets = target_weights(args.model, targets)
    print(f"targets: {','.join(targets)} ({len(weights)} matrices)")
    _, report, path = cached_approximation(model_id, weights, cfg, cache_dir, world)
    print(format_report(report))
    print(f"A, B and this report: {path} and {sidecar_path(path)}")
    return report


if __name__ == "__main__":
    run_cli(main)
