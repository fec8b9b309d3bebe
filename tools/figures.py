"""The paper's figures, one subcommand each: a PNG, and the plotted numbers as a CSV beside it.

  approx     the approximation loss L_i(t) = mean((W^i - B A)^2) of every target matrix against its
             Eckart-Young optimum sum_{j>r} S_j^2 / n, from approximate.py's cache (Fig. 2)
  subspace   the principal angles between col(B) and W0's top-r left singular subspace U_r (and
             between row(A) and V_r) against approximation steps: does IniLoRA reach PiSSA's start?
             cos(theta_k) = the k-th singular value of Q_B^T U_r, Q_B an orthonormal basis of col(B)
  alpha-std  best dev score against IniLoRA-α's standard deviation σ_α, from run directories (Fig. 3)
  init-hist  histograms of A0 / B0 entries per initialiser on one target matrix, and the singular
             values of s B0 A0 against W0's (Fig. 4)
  curves     training loss and dev metric of any runs, from their metrics.jsonl (Fig. 5)
  weight-change  ||s (B A - B0 A0)||_F / ||W0||_F against step, the mean over a run's layers and their range,
             from the "update" train.py logs (no figure of the paper: is IniLoRA-α's gain a bigger step?)

Each writes OUT (default runs/figures/NAME.png) and OUT with .csv. matplotlib draws headless (Agg).

Run: python -m tools.figures init-hist --model minilm
     python -m tools.figures curves runs/minilm-rotten-tomatoes-*
"""
import argparse
import csv
import io
import json
import re
from pathlib import Path

import torch

import inilora
from approximate import ApproxConfig, cached_approximation, target_weights
from data.prepare import TASKS
from lib import runs
from lib.common import run_cli, write_atomic
from models import parse_targets

# Shapes: W0 (d_out, d_in), A (r, d_in), B (d_out, r), U_r (d_out, r), V_r (d_in, r).

# -----------------------------------------------------------------------------
# output: the PNG and its CSV, both written atomically


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise OSError("figures.py needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt
    return plt


def save(fig, out, header, rows):
    """Writes the figure to `out` (PNG) and `rows` under `header` to `out` with .csv; returns both paths."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {str(out)!r} must end in .png (the numbers go beside it as .csv).")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(out, png.getvalue())
    write_atomic(out.with_suffix(".csv"), text.getvalue().encode())
    print(f"wrote {out} and {out.with_suffix('.csv')} ({len(rows)} rows)")
    return out, out.with_suffix(".csv")


# -----------------------------------------------------------------------------
# inputs: a base model's target weights; a run directory's configuration and metrics


def read_run(run):
    """(config, [metrics records]) of a train.py run directory; a sentence if it cannot be plotted."""
    run = Path(run)
    if not runs.config_file(run).is_file():
        raise ValueError(f"{str(run)!r} is not a run directory (it has no config.json): pass --out "
                         "directories written by train.py.")
    if not runs.metrics_file(run).is_file():
        raise ValueError(f"run {str(run)!r} has no metrics.jsonl: it never trained a step. Leave it out, "
                         f"or train it (python train.py --resume --out {run}, or start it again).")
    config = json.loads(runs.config_file(run).read_text())
    lines = runs.metrics_file(run).read_text().splitlines()
    return config, [json.loads(line) for line in lines if line.strip()]


def check_runs(runs):
    if not runs:
        raise ValueError("no run directories were given: pass them as arguments, e.g. "
                         "runs/minilm-rotten-tomatoes-*.")
    return [Path(r) for r in runs]


def label_of(run):
    # the run's name without its seed: the seeds of one setting share a colour and a legend entry
    return re.sub(r"-seed\d+$", "", Path(run).name)


# -----------------------------------------------------------------------------
# Fig. 2: the approximation against Eckart-Young


def fig_approx(args):
    """Analogue of the paper's Figure 2: the approximation loss falling to its optimum, per matrix."""
    model_id, weights, _ = target_weights(args.model, args.targets)
    cfg = ApproxConfig(rank=args.rank, steps=args.steps, lr=args.lr, seed=args.seed)
    _, report, _ = cached_approximation(model_id, weights, cfg, args.cache_dir)
    plt, curve, rows = pyplot(), report["curve"], []
    fig, (ax_loss, ax_gap) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (name, losses) in enumerate(curve["loss"].items()):
        optimum = report["matrices"][name]["optimal_mse"]
        color = plt.cm.viridis(k / max(1, len(curve["loss"]) - 1))
        ax_loss.plot(curve["steps"], losses, color=color, lw=1)
        ax_loss.axhline(optimum, color=color, ls=":", lw=0.8)
        # L_i(t) / L_i* - 1: how far above the best rank-r error (clipped at 1e-12 for the log axis)
        gaps = [max(loss / optimum - 1, 1e-12) for loss in losses]
        ax_gap.plot(curve["steps"], gaps, color=color, lw=1, label=name if len(curve["loss"]) <= 12 else None)
        rows += [[name, t, loss, optimum, loss / optimum] for t, loss in zip(curve["steps"], losses)]
    ax_loss.set(yscale="log", xlabel="Adam step", ylabel="MSE  mean((W - BA)^2)",
                title=f"{model_id}, r={args.rank}: loss (dotted: Eckart-Young optimum)")
    ax_gap.set(yscale="log", xlabel="Adam step", ylabel="L / L_optimal - 1 (clipped at 1e-12)",
               title="distance to the optimum (float32 readings: ~1e-7 is their noise)")
    ax_gap.legend(fontsize=6)
    return save(fig, args.out, ["matrix", "step", "mse", "optimal_mse", "ratio"], rows)


# -----------------------------------------------------------------------------
# the subspace the approximation finds, against PiSSA's


def principal_angles(X, Ur):
    """Principal angles in degrees, ascending, between span(X) and span(Ur) (Ur orthonormal):
    Q from the QR of X, then cos(theta) = singular values of Q^T Ur."""
    Q, _ = torch.linalg.qr(X.double())  # (d, r)
    cos = torch.linalg.svdvals(Q.T @ Ur.double()).clamp(-1, 1)  # (r, d) @ (d, r) -> (r, r) -> (r,)
    return torch.rad2deg(torch.arccos(cos))  # cos descending -> angles ascending


def fig_subspace(args):
    """No figure of the paper: the angle between IniLoRA's col(B), row(A) and W0's top-r singular
    subspaces (PiSSA's B0, A0) against approximation steps, with the distance of B A to U_r S_r V_r^T."""
    model_id, weights, _ = target_weights(args.model, args.targets)
    svd = {name: torch.linalg.svd(W.double(), full_matrices=False) for name, W in weights.items()}
    r, rows, summary = args.rank, [], []
    for steps in args.steps_list:
        cfg = ApproxConfig(rank=r, steps=steps, lr=args.lr, seed=args.seed)
        factors, _, _ = cached_approximation(model_id, weights, cfg, args.cache_dir)
        left, right, dist = [], [], []
        for name, (A, B) in sorted(factors.items()):
            U, S, Vh = svd[name]
            left.append(principal_angles(B, U[:, :r]))  # col(B) vs U_r
            right.append(principal_angles(A.T, Vh[:r].T))  # row(A) vs V_r
            # ||B A - U_r S_r V_r^T||_F / ||U_r S_r V_r^T||_F: the product against PiSSA's s B0 A0
            best = U[:, :r] * S[:r] @ Vh[:r]  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
            dist.append(((B.double() @ A.double() - best).norm() / best.norm()).item())
            rows.append([steps, name, left[-1].mean().item(), left[-1].max().item(), right[-1].mean().item(),
                         right[-1].max().item(), dist[-1]])
        L, R = torch.stack(left), torch.stack(right)
        summary.append((steps, L.mean().item(), L.max().item(), R.mean().item(), R.max().item(), max(dist)))
        print(f"steps {steps:>6}: col(B) vs U_r mean {summary[-1][1]:6.2f} deg, max {summary[-1][2]:6.2f} | "
              f"row(A) vs V_r mean {summary[-1][3]:6.2f}, max {summary[-1][4]:6.2f} | "
              f"max ||BA - U_r S_r V_r^T|| / ||U_r S_r V_r^T|| {summary[-1][5]:.2e}")
    plt = pyplot()
    fig, (ax, ax_dist) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [s for s, *_ in summary]
    for column, label, style in ((1, "col(B) vs U_r, mean", "-o"), (2, "col(B) vs U_r, max", "--o"),
                                 (3, "row(A) vs V_r, mean", "-s"), (4, "row(A) vs V_r, max", "--s")):
        ax.plot(x, [row[column] for row in summary], style, label=label)
    ax.set_xscale("symlog", linthresh=100)
    ax.set(xlabel="approximation steps", ylabel="principal angle (degrees)", ylim=(0, 91),
           title=f"{model_id}, r={r}: IniLoRA's subspaces vs PiSSA's")
    ax.legend()
    ax_dist.plot(x, [max(row[5], 1e-16) for row in summary], "-o")
    ax_dist.set_xscale("symlog", linthresh=100)
    ax_dist.set(yscale="log", xlabel="approximation steps",
                ylabel="max_i ||BA - U_r S_r V_r^T||_F / ||U_r S_r V_r^T||_F", title="the product vs PiSSA's")
    return save(fig, args.out, ["steps", "matrix", "left_mean_deg", "left_max_deg", "right_mean_deg",
                                "right_max_deg", "relative_distance_to_pissa"], rows)


# -----------------------------------------------------------------------------
# Fig. 3: accuracy against IniLoRA-α's standard deviation


def fig_alpha_std(args):
    """Analogue of the paper's Figure 3: best dev score against σ_α of IniLoRA-α runs (--init alpha);
    runs of other initialisers are drawn as horizontal reference lines (their mean)."""
    points, references, metric = [], {}, None
    for run in check_runs(args.runs):
        config, _ = read_run(run)
        task = TASKS[config["train"]["task"]]
        if metric not in (None, task.metrics[0]):
            raise ValueError(f"run {str(run)!r} is scored by {task.metrics[0]!r}, the others by {metric!r}: "
                             "plot the runs of one task together.")
        metric = task.metrics[0]
        dev = runs.best_dev(run, metric)
        if dev is None:
            raise ValueError(f"run {str(run)!r} has no dev record yet (no epoch finished): leave it out, or "
                             "let it finish an epoch.")
        lora = config["lora"]
        if lora["init"] == "alpha":
            points.append((lora["alpha_std"], config["train"]["seed"], 100 * dev[metric], str(run)))
        else:
            references.setdefault(lora["init"], []).append(100 * dev[metric])
    if not points:
        raise ValueError("none of the runs is an IniLoRA-α run (--init alpha): pass the runs of an α sweep, "
                         "e.g. python -m tools.sweep grids/figure3.json.")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    stds = sorted({p[0] for p in points})
    means = [sum(p[2] for p in points if p[0] == s) / sum(p[0] == s for p in points) for s in stds]
    ax.scatter([p[0] for p in points], [p[2] for p in points], s=12, alpha=0.5, label="one seed")
    ax.plot(stds, means, "-o", label="IniLoRA-α, mean over seeds")
    for k, (init, scores) in enumerate(sorted(references.items())):
        ax.axhline(sum(scores) / len(scores), ls="--", color=f"C{k + 2}", label=f"{init}, mean")
    ax.set(xscale="log", xlabel="σ_α (std of A0, B0)", ylabel=f"best dev {metric} x100",
           title="IniLoRA-α: accuracy against its initial std")
    ax.legend(fontsize=7)
    rows = [[run, "alpha", std, seed, score] for std, seed, score, run in sorted(points)]
    return save(fig, args.out, ["run", "init", "alpha_std", "seed", f"best_dev_{metric}_x100"], rows)


# -----------------------------------------------------------------------------
# Fig. 4: the initial matrices


def init_factors(args, inits):
    """({init: (A0, B0)} for the target matrix, W0, its name, s): drawn as inilora.inject draws them,
    one generator over the sorted targets, so A0, B0 are exactly those a run with --seed gets."""
    unknown = [i for i in inits if i not in inilora.INITIALISERS]
    if unknown:
        raise ValueError(f"init {unknown[0]!r} is not one of {sorted(inilora.INITIALISERS)} (full fine-tuning has "
                         "no A0, B0); pass e.g. --inits lora,inilora,alpha.")
    if data_driven := [i for i in inits if i in inilora.DATA_DRIVEN]:
        raise ValueError(f"init {data_driven[0]!r} reads training batches (inilora.DATA_DRIVEN), which this figure "
                         "does not have: it draws A0, B0 from W0 alone. Leave it out of --inits, e.g. "
                         "--inits lora,inilora,alpha.")
    model_id, weights, targets = target_weights(args.model, args.targets)
    target = args.target or sorted(weights)[0]
    if target not in weights:
        raise ValueError(f"--target {target!r} is not one of the adapted matrices {sorted(weights)}.")
    factors = {}
    for init in inits:
        cfg = inilora.LoRAConfig(init=init, rank=args.rank, alpha_std=args.alpha_std, approx_steps=args.approx_steps,
                                 targets=targets, seed=args.seed).validate()
        approx = {}
        if init == "inilora":
            approx_cfg = ApproxConfig(rank=cfg.rank, steps=cfg.approx_steps, lr=cfg.approx_lr, seed=cfg.approx_seed)
            approx = cached_approximation(model_id, weights, approx_cfg, args.cache_dir)[0]
        g = torch.Generator().manual_seed(cfg.seed)
        for name in sorted(weights):  # inject's order: the draws of the earlier matrices come first
            A0, B0 = inilora.INITIALISERS[init](weights[name], cfg, g, approx.get(name))
            if name == target:
                factors[init] = (A0, B0)
    return factors, weights[target], target, cfg.scale


def fig_init_hist(args):
    """Analogue of the paper's Figure 4: the distributions of A0 and B0 per initialiser, and the singular
    values of s B0 A0 against W0's, for one target matrix of the model."""
    factors, W0, target, s = init_factors(args, args.inits)
    S_W = torch.linalg.svdvals(W0.double())  # (min(d_out, d_in),)
    plt, rows = pyplot(), [["W0", "singular_value", i + 1, v] for i, v in enumerate(S_W.tolist())]
    fig, axes = plt.subplots(len(factors), 3, figsize=(12, 2.2 * len(factors)), squeeze=False)
    for (init, (A0, B0)), (ax_a, ax_b, ax_s) in zip(factors.items(), axes):
        for ax, X, name in ((ax_a, A0, "A0"), (ax_b, B0, "B0")):
            counts, edges = torch.histogram(X.double().flatten(), bins=args.bins)
            ax.stairs(counts.numpy(), edges.numpy(), fill=True)
            ax.set_title(f"{init}: {name} {tuple(X.shape)}, std {X.std().item():.3g}", fontsize=8)
            centres = ((edges[1:] + edges[:-1]) / 2).tolist()
            rows += [[init, f"{name}_hist", c, n] for c, n in zip(centres, counts.tolist())]
        # the singular values of s B0 A0: (d_out, r) @ (r, d_in) -> (d_out, d_in), at most r non-zero
        S_P = torch.linalg.svdvals(s * B0.double() @ A0.double())[:A0.shape[0]]
        rows += [[init, "sBA_singular_value", i + 1, v] for i, v in enumerate(S_P.tolist())]
        ax_s.plot(range(1, len(S_W) + 1), S_W.numpy(), color="grey", lw=1, label="W0")
        if S_P.max() > 0:
            ax_s.plot(range(1, len(S_P) + 1), S_P.numpy(), "o", ms=3, label="s B0 A0")
        else:
            ax_s.text(0.5, 0.5, "s B0 A0 = 0 (B0 = 0)", transform=ax_s.transAxes, ha="center")
        ax_s.set(yscale="log", xscale="log")
        ax_s.set_title(f"{init}: singular values", fontsize=8)
        ax_s.legend(fontsize=6)
    fig.tight_layout()
    fig.suptitle(f"{args.model} {target}, r={args.rank}, seed {args.seed}", fontsize=9, y=1.01)
    return save(fig, args.out, ["init", "quantity", "x", "y"], rows)


# -----------------------------------------------------------------------------
# Fig. 5: training curves


def fig_curves(args):
    """Analogue of the paper's Figure 5: training loss against step, and the dev metric against epoch,
    of any runs; the seeds of one setting (run names that differ only in -seedN) share a colour."""
    runs, rows = check_runs(args.runs), []
    plt = pyplot()
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours, metric = {}, None
    for run in runs:
        config, records = read_run(run)
        metric = metric or TASKS[config["train"]["task"]].metrics[0]
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
        devs = [(r["epoch"], r["dev"][metric]) for r in records if metric in r.get("dev", {})]
        if not losses:
            raise ValueError(f"run {str(run)!r} has no training loss in metrics.jsonl yet: leave it out.")
        label = label_of(run)
        first = label not in colours
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        ax_loss.plot(*zip(*losses), color=colour, lw=0.8, alpha=0.8, label=label if first else None)
        if devs:
            ax_dev.plot(*zip(*devs), "-o", ms=3, color=colour, label=label if first else None)
        rows += [[str(run), label, "loss", step, "", value] for step, value in losses]
        rows += [[str(run), label, f"dev_{metric}", "", epoch, value] for epoch, value in devs]
    ax_loss.set(xlabel="step", ylabel="training loss (mean over the log interval)", title="training loss")
    ax_dev.set(xlabel="epoch", ylabel=f"dev {metric}", title=f"dev {metric} after each epoch")
    ax_loss.legend(fontsize=6)
    ax_dev.legend(fontsize=6)
    return save(fig, args.out, ["run", "label", "quantity", "step", "epoch", "value"], rows)


# -----------------------------------------------------------------------------
# the size of the weight change: the mechanism behind a learning-rate comparison


def fig_weight_change(args):
    """No figure of the paper: the relative weight change ||s (B A - B0 A0)||_F / ||W0||_F against step, the mean over
    each run's adapted layers (line) and their smallest to largest (band); runs of one setting share a colour."""
    runs_, rows = check_runs(args.runs), []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for run in runs_:
        _, records = read_run(run)
        logged = [(r["step"], r["update"]) for r in records if r.get("update")]
        if not logged:
            raise ValueError(f"run {str(run)!r} has no weight change in metrics.jsonl (full fine-tuning, or a run "
                             "made before train.py logged it): leave it out, or train it again.")
        label = label_of(run)
        first = label not in colours
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        steps = [step for step, _ in logged]
        means = [sum(u.values()) / len(u) for _, u in logged]
        ax.plot(steps, means, color=colour, lw=1, label=label if first else None)
        ax.fill_between(steps, [min(u.values()) for _, u in logged], [max(u.values()) for _, u in logged],
                        color=colour, alpha=0.12, lw=0)
        rows += [[str(run), label, step, layer, value] for step, u in logged for layer, value in u.items()]
    ax.set(xlabel="step", ylabel="||s (B A - B0 A0)||_F / ||W0||_F", yscale="log",
           title="relative weight change: mean over layers (line), smallest to largest (band)")
    ax.legend(fontsize=6)
    return save(fig, args.out, ["run", "label", "step", "layer", "relative_change"], rows)


# -----------------------------------------------------------------------------
# command line


def int_list(text):
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated step counts >= 0, e.g. 0,1000,4000")
    return values


def parse_args(argv):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="figure", help="which figure")
    commands = {"approx": fig_approx, "subspace": fig_subspace, "alpha-std": fig_alpha_std,
                "init-hist": fig_init_hist, "curves": fig_curves, "weight-change": fig_weight_change}
    parsers = {}
    for name, fn in commands.items():
        first = re.split(r"[;.]\s", " ".join(fn.__doc__.split()))[0]  # the docstring's first clause
        parsers[name] = q = sub.add_parser(name, help=first, description=first, formatter_class=fmt)
        q.set_defaults(run=fn)
        q.add_argument("--out", default=f"runs/figures/{name}.png", help="PNG to write (docs/figures/ holds the "
                       "README's copies); the CSV goes beside it")
    for name in ("approx", "subspace", "init-hist"):
        q = parsers[name]
        q.add_argument("--model", default="minilm", help="model name, directory or .gguf (as train.py's --model)")
        q.add_argument("--targets", default=None, type=parse_targets,
                       help="comma-separated target layers; None: query,value (encoders), q_proj,v_proj (decoders)")
        q.add_argument("--rank", type=int, default=8, help="rank r")
        q.add_argument("--cache-dir", default=None, help="approximation cache; None: $INILORA_CACHE, else ~/.cache/inilora")
    for name in ("approx", "subspace"):
        parsers[name].add_argument("--lr", type=float, default=5e-4, help="Adam learning rate of the approximation")
        parsers[name].add_argument("--seed", type=int, default=0, help="seed of the approximation's start")
    parsers["approx"].add_argument("--steps", type=int, default=20000, help="Adam steps of the approximation")
    parsers["subspace"].add_argument("--steps-list", type=int_list, default=[0, 250, 1000, 4000, 20000],
                                     help="comma-separated approximation step counts (each cached)")
    q = parsers["init-hist"]
    q.add_argument("--inits", default=[i for i in inilora.INITIALISERS if i not in inilora.DATA_DRIVEN],
                   type=lambda t: [x.strip() for x in t.split(",")],
                   help="comma-separated initialisers (not the data-driven ones, which read training batches)")
    q.add_argument("--target", default=None, help="full name of the matrix to show; None: the first in sorted order")
    q.add_argument("--seed", type=int, default=0, help="train.py's --seed: the draws of the random initialisers")
    q.add_argument("--alpha-std", type=float, default=0.5, help="σ_α of IniLoRA-α")
    q.add_argument("--approx-steps", type=int, default=20000, help="IniLoRA: approximation steps")
    q.add_argument("--bins", type=int, default=60, help="histogram bins")
    for name in ("alpha-std", "curves", "weight-change"):
        parsers[name].add_argument("runs", nargs="*", help="run directories written by train.py")
    args = p.parse_args(argv)
    if args.figure is None:  # the figures and what each shows, rather than argparse's bare "required: figure"
        listing = "\n".join(f"  {name:<13} {q.description or ''}" for name, q in parsers.items())
        p.error(f"name a figure, e.g. `{p.prog} approx`; the figures are:\n{listing}\n"
                f"`{p.prog} FIGURE --help` gives its options.")
    return args


def main(argv=None):
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    run_cli(main)
