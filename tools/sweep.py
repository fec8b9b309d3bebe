"""Run a grid of train.py runs (initialisers x seeds x one more axis), then compare and plot them.

A grid file (grids/*.json) holds:

    {"note":  "what it reproduces, and how long it takes here",
     "out":   "runs/table3",                        the root of the grid's run directories
     "base":  {"model": "minilm", "epochs": 2},     train.py flags shared by every run ("--epochs 2";
                                                    true: a bare flag such as --grad-checkpointing)
     "inits": ["lora", "inilora"], "seeds": [0, 1, 2],
     "axis":  {"flag": "approx-steps", "values": [0, 1000]},   optional: approx-steps | alpha-std | rank | task
                                                    | lr; "per_init": {"full": [...]} gives an init its own values
     "select": {"seeds": [0, 1, 2], "split": "test"},   optional, with the lr axis: see below; "task" and
                                                    "data-dir" score another task's split (MetaMathQA runs on GSM8K)
     "figures": ["curves"]}                         figures.py figures of the grid's runs: curves, alpha-std

Run OUT/INIT[-AXIS-VALUE]-seedSEED is `python train.py BASE --init INIT --seed SEED [--AXIS VALUE] --out DIR`,
a subprocess with OMP_NUM_THREADS = --threads-per-job (torch takes its thread count from it), its
output in OUT/logs/NAME.log. A run with final.json is skipped; one with a checkpoint (last.json) is
resumed with `train.py --resume --out DIR` plus the grid's flags, which train.py refuses if the grid file
was edited since. --jobs N runs N at once. Ctrl-C (or SIGTERM) is passed to every running train.py,
which saves a checkpoint at its next step; the sweep waits for them and exits 130 (143): run the same
command again to resume. At the end, per axis value (one table per task): `evaluate.py --compare
RUNS --markdown` into OUT/compare.md, and each figure of the grid as OUT/FIGURE.png (+ .csv).

With "select" (a learning-rate grid, grids/lr-table3.json), once every run has finished each init's rate is
chosen on dev (the best mean dev score over the grid's seeds: evaluate.best_rates), the select seeds missing at
that rate are run, every run at the chosen rate is scored on the select split (evaluate.py RUN --split test, plus
--task T --data-dir D when "select" names them), and compare.md holds `evaluate.py --compare RUNS --best-lr
[--task T]`: each method at its own rate beside the one-rate table.

Run: python -m tools.sweep grids/table3.json --jobs 2 --threads-per-job 1
     python -m tools.sweep grids/table3.json --dry-run   (prints the commands, runs nothing)
"""
import argparse
import contextlib
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import evaluate
import train
from lib import runs
from lib.common import EXIT_INTERRUPTED, run_cli, write_atomic
from lib.runs import StopRequest

ROOT = Path(__file__).resolve().parent.parent  # the repository: train.py and evaluate.py live here
AXES = ("approx-steps", "alpha-std", "rank", "task", "lr")
FIGURES = ("curves", "alpha-std", "weight-change")  # the figures.py subcommands drawn from run directories
GRID_KEYS = {"note", "out", "base", "inits", "seeds", "axis", "select", "figures"}


@dataclass
class Run:
    name: str                      # INIT[-AXIS-VALUE]-seedSEED
    dir: Path
    flags: list                    # train.py's flags, --out included
    group: str                     # the axis value ("" without an axis, or the lr axis): one table per group
    init: str = ""                 # the --init of the run
    value: str = "None"            # its axis value, as written in its name
    def state(self):
        if runs.final_file(self.dir).is_file():
            return "finished"
        if runs.has_checkpoint(self.dir):
            return "resume"
        if self.dir.exists() and any(p.name != runs.CONFIG for p in self.dir.iterdir()):
            return "blocked"  # output but no checkpoint: train.py would refuse to start over it
        return "new"

    def command(self):
        resume = ["--resume"] if self.state() == "resume" else []
        return [sys.executable, str(ROOT / "train.py"), *resume, *self.flags]


def shown(command):
    """A command as a person would type it here: python, and the scripts relative to the working directory."""
    return shlex.join(["python", os.path.relpath(command[1]), *command[2:]])


# -----------------------------------------------------------------------------
# the grid file -> runs


def as_flags(options, where):
    flags = []
    for key, value in options.items():
        if not isinstance(key, str) or key.startswith("-") or key in ("init", "seed", "out", "resume"):
            raise ValueError(f"{where}: flag {key!r} must be a train.py flag name without '--', and not init, "
                             "seed, out or resume (the grid sets those).")
        if value is True:
            flags.append(f"--{key}")
        elif value is not False and value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def check_flags(flags, where):
    """Parses the flags as train.py would (its parser and its configuration checks), without training (the runs
    themselves are subprocesses)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            train.configs_from_args(train.parse(flags))
    except SystemExit:
        why = err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]  # argparse's "PROG: error: ..."
        raise ValueError(f"{where}: train.py refuses the flags {shlex.join(flags)}: {why}. Fix the grid file.") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e} Fix the grid file.") from None


def load_grid(path):
    """(grid dict, [Run]) of a grid file, every run's flags checked by train.py's parser."""
    path = Path(path)
    try:
        grid = json.loads(path.read_text())
    except OSError as e:
        raise OSError(f"cannot read grid file {str(path)!r} ({e.strerror}); pass one of grids/*.json.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"grid file {str(path)!r} is not valid JSON ({e}).") from None
    if not isinstance(grid, dict) or (unknown := sorted(set(grid) - GRID_KEYS)):
        raise ValueError(f"grid file {str(path)!r} must be a JSON object with keys among {sorted(GRID_KEYS)}"
                         f"{f'; it has {unknown}' if isinstance(grid, dict) else ''}.")
    for key, kind in (("out", str), ("inits", list), ("seeds", list)):
        if not isinstance(grid.get(key), kind) or not grid[key]:
            raise ValueError(f"grid file {str(path)!r} needs a non-empty {key!r} ({kind.__name__}).")
    axis = grid.get("axis") or {"flag": None, "values": [None]}
    if not isinstance(axis, dict) or axis.get("flag") not in (None, *AXES) or not isinstance(axis.get("values"), list) \
            or not axis["values"]:
        raise ValueError(f"grid file {str(path)!r}: axis {axis!r} must be {{'flag': one of {list(AXES)}, "
                         "'values': [...]}.")
    if not isinstance(grid.get("base", {}), dict) or axis["flag"] in grid.get("base", {}):
        raise ValueError(f"grid file {str(path)!r}: 'base' must be an object of train.py flags without the axis "
                         f"flag {axis['flag']!r}, which each run sets to one of the axis values.")
    if bad := [f for f in grid.get("figures", []) if f not in FIGURES]:
        raise ValueError(f"grid file {str(path)!r}: figure {bad[0]!r} is not one of {list(FIGURES)}.")
    per_init = axis.get("per_init", {})
    if not isinstance(per_init, dict) or any(i not in grid["inits"] or not isinstance(v, list) or not v
                                             for i, v in per_init.items()):
        raise ValueError(f"grid file {str(path)!r}: axis per_init {per_init!r} must map inits of the grid to "
                         "non-empty lists of axis values.")
    select = grid.get("select")
    if select is not None and (axis["flag"] != "lr" or not isinstance(select, dict)
                               or not {"seeds", "split"} <= set(select) <= {"seeds", "split", "task", "data-dir"}
                               or not isinstance(select["seeds"], list)):
        raise ValueError(f"grid file {str(path)!r}: select {select!r} needs the lr axis and "
                         "{'seeds': [...], 'split': 'test'}, optionally with 'task' and 'data-dir'.")
    runs = []
    for value in dict.fromkeys([*axis["values"], *(v for values in per_init.values() for v in values)]):
        for init in grid["inits"]:
            if value not in per_init.get(init, axis["values"]):
                continue
            for seed in grid["seeds"]:
                run = make_run(grid, path, init, seed, axis["flag"], value)
                if any(r.name == run.name for r in runs):
                    raise ValueError(f"grid file {str(path)!r} names run {run.name} twice: list each init, seed "
                                     "and axis value once.")
                runs.append(run)
    return grid, runs


def make_run(grid, path, init, seed, flag, value):
    """The Run OUT/INIT[-FLAG-VALUE]-seedSEED, its flags checked by train.py's parser."""
    base, out = as_flags(grid.get("base", {}), str(path)), Path(grid["out"])
    extra = [] if value is None else [f"--{flag}", str(value)]
    name = f"{init}{'' if value is None else f'-{flag}-{value}'}-seed{seed}"
    flags = [*base, "--init", str(init), "--seed", str(seed), *extra, "--out", str(out / name)]
    check_flags(flags, f"grid file {str(path)!r}, run {name}")
    group = "" if value is None or flag == "lr" else f"{flag} {value}"  # lr: one --best-lr table over all rates
    return Run(name, out / name, flags, group, init, str(value))


def selected(grid, path, runs):
    """With "select": each init's best rate on dev (evaluate.best_rates over the finished runs) and the runs at it,
    the select seeds the grid has not run yet included. None while any run of the grid is unfinished."""
    if not grid.get("select") or any(r.state() != "finished" for r in runs):
        return None
    task, rows, _, _ = evaluate.compare([r.dir for r in runs])
    best, *_ = evaluate.best_rates(task, rows, choose_seeds=grid["seeds"])  # the seeds added later cannot move it
    chosen, extra = [], []
    for row in best:
        rate = next(r.value for r in runs if r.init == row["method"] and math.isclose(float(r.value), row["lr"]))
        for seed in grid["select"]["seeds"]:
            run = next((r for r in runs if r.init == row["method"] and r.value == rate and
                        r.name.endswith(f"-seed{seed}")), None) or make_run(grid, path, row["method"], seed, "lr", rate)
            chosen.append(run)
            extra += [] if run in runs else [run]
    return chosen, extra


def score_selected(chosen, select, threads):
    """evaluate.py RUN --split SPLIT [--task T --data-dir D] for every chosen run not yet scored on it
    (eval-best-SPLIT.json, or eval-best-T-SPLIT.json for another task)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    split, other = select["split"], [f for k in ("task", "data-dir") if k in select for f in (f"--{k}", select[k])]
    scored = f"{select['task']}-{split}" if "task" in select else split
    for run in chosen:
        if not (run.dir / f"eval-best-{scored}.json").is_file():
            command = [sys.executable, str(ROOT / "evaluate.py"), str(run.dir), "--split", split, *other]
            print(f"scoring {run.name} on {split}: {shown(command)}", flush=True)
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise ValueError(f"{shown(command)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


# -----------------------------------------------------------------------------
# running: up to --jobs train.py subprocesses at once, each with its thread limit and its log


def last_progress(log_path):
    """The last 'step ...' or 'epoch ...' line train.py printed to the log, or ''."""
    with open(log_path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        lines = f.read().decode(errors="replace").splitlines()
    return next((l for l in reversed(lines) if l.startswith(("step ", "epoch "))), "")


def outcome(run):
    """A few words on a finished run: its best epoch and dev score (final.json)."""
    best = json.loads(runs.final_file(run.dir).read_text())["best"]
    score = "no dev split" if best["score"] is None else f"dev {best['score']:.4f}"
    return f"best epoch {best['epoch']}, {score}"


def run_all(runs, out, jobs, threads, status_every):
    """Runs every unfinished run; returns ([(run, why) that failed], the stopping signal or None)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    todo = [r for r in runs if r.state() in ("new", "resume")]
    failed = [(r, f"{r.dir} holds output but no checkpoint (a run killed before its first one): delete it to "
                  "start it again") for r in runs if r.state() == "blocked"]
    total, started, finished, running, signalled = len(todo), 0, 0, {}, set()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    last_status = time.monotonic()
    with StopRequest() as stop, contextlib.ExitStack() as cleanup:  # passed on by the loop (no print here)
        # should the sweep itself fail, no train.py is left running: each is stopped at a checkpoint
        cleanup.callback(lambda: [(p.send_signal(signal.SIGINT), p.wait()) for _, p, _, _ in running.values()])
        while running or (todo and stop.signum is None):
            while todo and len(running) < jobs and stop.signum is None:
                run, started = todo.pop(0), started + 1
                log_path = out / "logs" / f"{run.name}.log"
                what = "resuming" if run.state() == "resume" else "starting"
                log = open(log_path, "a")
                log.write(f"\n$ OMP_NUM_THREADS={threads} {shown(run.command())}\n")
                log.flush()
                # a session of its own: a terminal's Ctrl-C reaches the sweep only, which passes it on once
                proc = subprocess.Popen(run.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                running[run.name] = (run, proc, log, time.monotonic())
                print(f"[{started}/{total}] {what} {run.name} (log: {log_path})", flush=True)
            if stop.signum is not None and set(running) - signalled:
                print(f"\nsignal {stop.signum}: passed to {len(set(running) - signalled)} running train.py, which "
                      "save a checkpoint at their next step and stop; no new run starts", flush=True)
                for name, (_, proc, _, _) in running.items():
                    if name not in signalled:
                        proc.send_signal(stop.signum)
                        signalled.add(name)
            time.sleep(0.2)
            for name, (run, proc, log, t0) in list(running.items()):
                if (rc := proc.poll()) is None:
                    continue
                del running[name]
                log.close()
                minutes = (time.monotonic() - t0) / 60
                if rc == 0 and run.state() == "finished":
                    finished += 1
                    print(f"[{finished}/{total} done] {name} in {minutes:.1f} min: {outcome(run)}", flush=True)
                elif name in signalled and rc in (EXIT_INTERRUPTED, 128 + signal.SIGTERM):
                    saved = "checkpoint saved" if run.state() == "resume" else "stopped before its first checkpoint"
                    print(f"stopped {name} after {minutes:.1f} min: {saved}", flush=True)
                else:
                    tail = last_progress(out / "logs" / f"{name}.log") or "no step logged"
                    failed.append((run, f"train.py exited {rc} ({tail}); see {out / 'logs' / f'{name}.log'}"))
                    print(f"[{finished}/{total} done] FAILED {name}: exit {rc}, see {out / 'logs' / f'{name}.log'}",
                          flush=True)
            if status_every and running and time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                for name, (_, _, _, t0) in running.items():
                    progress = last_progress(out / "logs" / f"{name}.log") or "loading"
                    print(f"  {name} ({(time.monotonic() - t0) / 60:.1f} min): {progress}", flush=True)
    return failed, stop.signum


# -----------------------------------------------------------------------------
# the end: the comparison table per axis value and the grid's figures


def report_commands(grid, runs, out, finished_only=True):
    """[(what, command, where the output goes)] of evaluate.py --compare per group, then tools.figures,
    over the finished runs (all runs with finished_only=False: what --dry-run shows)."""
    done = [r for r in runs if r.state() == "finished" or not finished_only]
    commands = []
    for group in dict.fromkeys(r.group for r in runs):
        dirs = [str(r.dir) for r in done if r.group == group]
        best_lr = ["--best-lr"] if (grid.get("axis") or {}).get("flag") == "lr" else []
        if best_lr and "task" in (grid.get("select") or {}):  # the test column: the other task's scores
            best_lr += ["--task", grid["select"]["task"]]
        if best_lr and grid.get("select"):  # chosen on the grid's seeds, as selected() chose
            best_lr += ["--choose-on-seeds", ",".join(map(str, grid["seeds"]))]
        if dirs:
            commands.append((group, [sys.executable, str(ROOT / "evaluate.py"), "--compare", *dirs, *best_lr,
                                     "--markdown"], out / "compare.md"))
    for figure in grid.get("figures", []):
        png = out / f"{figure}.png"
        if done:
            commands.append((figure, [sys.executable, "-m", "tools.figures", figure, *map(str, (r.dir for r in done)),
                                      "--out", str(png)], png))
    return commands


def module_env():
    """The environment in which `python -m tools.figures` works from any directory: the repository on the path."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def compare_and_draw(grid, runs, out):
    """Runs report_commands: the comparison tables go to OUT/compare.md (and stdout), the figures to OUT/*.png."""
    tables = []
    for what, command, target in report_commands(grid, runs, out):
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=module_env())
        if result.returncode != 0:
            print(f"{what}: {shown(command)} exited {result.returncode}", flush=True)
            continue
        if target.suffix == ".md":
            heading = f"## {what}\n\n" if what else ""
            tables.append(f"{heading}{result.stdout.strip()}\n\n`{shown(command)}`\n")
            print(tables[-1], flush=True)
        else:
            print(result.stdout.strip(), flush=True)
    if tables:
        write_atomic(out / "compare.md", "\n".join(tables).encode())
        print(f"wrote {out / 'compare.md'}")


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("grid", help="grid file, e.g. grids/table3.json")
    p.add_argument("--jobs", type=int, default=1, help="train.py runs at once")
    p.add_argument("--threads-per-job", type=int, default=None,
                   help="OMP_NUM_THREADS of each run; None: the CPU count divided by --jobs")
    p.add_argument("--status-every", type=float, default=60, help="seconds between progress lines (0: none)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, and the commands; run nothing")
    args = p.parse_args(argv)
    for flag, value in (("--jobs", args.jobs), ("--threads-per-job", args.threads_per_job)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be at least 1 (runs at once / threads per run).")
    threads = args.threads_per_job or max(1, (os.cpu_count() or 1) // args.jobs)
    grid, runs = load_grid(args.grid)
    out = Path(grid["out"])
    states = [r.state() for r in runs]
    print(f"grid {args.grid}: {len(runs)} runs in {out} ({states.count('finished')} finished, "
          f"{states.count('resume')} to resume, {states.count('new')} to start, {states.count('blocked')} blocked); "
          f"{args.jobs} at once, {threads} thread(s) each" + (f"\nnote: {grid['note']}" if grid.get("note") else ""))
    if args.dry_run:
        for run, state in zip(runs, states):
            print(f"{state:>8}  OMP_NUM_THREADS={threads} {shown(run.command())}" if state != "finished" else
                  f"{state:>8}  {run.dir}")
        for what, command, target in report_commands(grid, runs, out, finished_only=False):
            print(f"then      {shown(command)}   # -> {target}")
        return runs
    failed, signum = run_all(runs, out, args.jobs, threads, args.status_every)
    if signum is None and not failed and (picked := selected(grid, args.grid, runs)):
        chosen, extra = picked  # each init's rate, chosen on dev: its missing seeds, then test scores
        print("rates chosen on dev: " + ", ".join(sorted({f"{r.init} {r.value}" for r in chosen})) +
              f"; {len(extra)} more run(s) for the select seeds {grid['select']['seeds']}", flush=True)
        failed, signum = run_all(extra, out, args.jobs, threads, args.status_every)
        runs = runs + extra
        if signum is None and not failed:
            score_selected(chosen, grid["select"], threads)
    if signum is not None:
        print(f"stopped: run `python -m tools.sweep {shlex.quote(args.grid)}` again to resume the unfinished runs")
        raise SystemExit(128 + signum)
    compare_and_draw(grid, runs, out)
    if failed:
        raise ValueError(f"{len(failed)} of {len(runs)} runs did not finish: " + "; ".join(
            f"{run.name}: {why}" for run, why in failed))
    return runs


if __name__ == "__main__":
    run_cli(main)
