"""Tests of tools/sweep.py on a tiny grid: tiny BERT, a tiny SST-2 in the GLUE layout, 2 initialisers.

- --dry-run prints every train.py command (with its thread limit) and the compare/figure commands,
  and runs nothing;
- a grid runs two jobs at once, ends with the compare table (compare.md) and its figure, and a second
  sweep skips the finished runs;
- a real Ctrl-C to `python -m tools.sweep` reaches the running train.py, which saves a checkpoint; the sweep
  exits 130, and the same command again resumes the run to the end;
- bad grid files get a sentence naming the file, the run and what to fix.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import sst2_lines  # the tiny SST-2 the training tests use

from tools import sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def grid(tmp_path, monkeypatch, tiny_bert_dir):
    """grid(**overrides) -> the path of a grid file: lora and pissa x seed 0 on a tiny SST-2 (24 / 16)."""
    glue = tmp_path / "glue" / "SST-2"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text(sst2_lines(24, 0))
    (glue / "dev.tsv").write_text(sst2_lines(16, 1))
    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "approx-cache"))

    def make(**overrides):
        spec = {"note": "a tiny test grid", "out": str(tmp_path / "grid"),
                "base": {"model": str(tiny_bert_dir), "task": "sst2", "glue-dir": str(tmp_path / "glue"),
                         "batch-size": 8, "epochs": 1, "rank": 2, "lr": 1e-2, "log-every": 1},
                "inits": ["lora", "pissa"], "seeds": [0], "figures": ["curves"]} | overrides
        path = tmp_path / "grid.json"
        path.write_text(json.dumps(spec))
        return path

    return make


def test_dry_run_prints_the_commands_and_runs_nothing(grid, tmp_path, capsys):
    path = grid(axis={"flag": "approx-steps", "values": [0, 10]})
    sweep.main([str(path), "--dry-run", "--jobs", "2", "--threads-per-job", "1"])
    out = capsys.readouterr().out
    assert "4 runs" in out and "4 to start" in out and "note: a tiny test grid" in out
    assert out.count("     new  OMP_NUM_THREADS=1 python ") == 4
    assert f"--init pissa --seed 0 --approx-steps 0 --out {tmp_path / 'grid' / 'pissa-approx-steps-0-seed0'}" in out
    assert out.count("then      python evaluate.py --compare") == 2  # one table per axis value
    assert "-m tools.figures curves" in out and f"--out {tmp_path / 'grid' / 'curves.png'}" in out
    assert not (tmp_path / "grid").exists()


@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_a_grid_runs_compares_plots_and_skips_finished_runs(grid, tmp_path, capsys):
    path = grid()
    sweep.main([str(path), "--jobs", "2", "--threads-per-job", "1", "--status-every", "0"])
    out = capsys.readouterr().out
    assert "starting lora-seed0" in out and "starting pissa-seed0" in out and out.count("done] ") == 2
    for name in ("lora-seed0", "pissa-seed0"):
        assert (tmp_path / "grid" / name / "final.json").is_file()
        assert (tmp_path / "grid" / "logs" / f"{name}.log").read_text().count("$ OMP_NUM_THREADS=1 python ") == 1
    table = (tmp_path / "grid" / "compare.md").read_text()
    assert "| lora | 1 |" in table and "| pissa | 1 |" in table and "evaluate.py --compare" in table
    assert (tmp_path / "grid" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "grid" / "curves.csv").is_file()
    # a second sweep: nothing left to run, the table again
    sweep.main([str(path), "--status-every", "0"])
    out = capsys.readouterr().out
    assert "2 finished, 0 to resume, 0 to start" in out and "starting" not in out and "| lora | 1 |" in out


# invariant: Ctrl-C stops the sweep with 130 only after every running train.py saved a checkpoint,
# and running the same command again resumes that run instead of starting it over
@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_ctrl_c_stops_the_runs_at_a_checkpoint_and_the_same_command_resumes(grid, tmp_path):
    path = grid(inits=["lora"], figures=[], base={**json.loads(grid().read_text())["base"], "epochs": 60})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tools.sweep", str(path), "--threads-per-job", "1", "--status-every", "0"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "grid" / "logs" / "lora-seed0.log"
    try:
        deadline = time.monotonic() + 120
        while not (log.is_file() and "step 3/180" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    run = tmp_path / "grid" / "lora-seed0"
    assert (run / "last.json").is_file() and not (run / "final.json").exists(), out
    assert "stopped lora-seed0" in out and "checkpoint saved" in out and "again to resume" in out
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 to resume" in again.stdout and "resuming lora-seed0" in again.stdout
    assert json.loads((run / "final.json").read_text())["step"] == 180
    assert "resuming " in log.read_text()  # train.py's own line: it continued from the checkpoint


def test_bad_grid_files_get_a_sentence(grid, tmp_path):
    with pytest.raises(ValueError, match=r"run pisa-seed0: init 'pisa' is not one of .*Fix the grid file"):
        sweep.main([str(grid(inits=["lora", "pisa"])), "--dry-run"])
    with pytest.raises(ValueError, match=r"keys among .*'axis'.*it has \['axes'\]"):
        sweep.main([str(grid(axes={})), "--dry-run"])
    with pytest.raises(ValueError, match=r"axis .*must be .*'approx-steps'"):
        sweep.main([str(grid(axis={"flag": "epochs", "values": [1]})), "--dry-run"])
    with pytest.raises(ValueError, match=r"select .* needs the lr axis"):
        sweep.main([str(grid(select={"seeds": [0, 1], "split": "test"})), "--dry-run"])
    with pytest.raises(ValueError, match=r"per_init .* must map inits of the grid"):
        sweep.main([str(grid(base={"epochs": 1}, axis={"flag": "lr", "values": [1e-3], "per_init": {"full": [1e-5]}})),
                    "--dry-run"])
    with pytest.raises(ValueError, match=r"flag '--epochs' must be a train.py flag name without '--'"):
        sweep.main([str(grid(base={"--epochs": 1})), "--dry-run"])
    with pytest.raises(ValueError, match=r"run lora-seed0: train.py refuses .*--epoks.*Fix the grid file"):
        sweep.main([str(grid(base={"epoks": 1})), "--dry-run"])
    with pytest.raises(ValueError, match=r"figure 'approx' is not one of \['curves', 'alpha-std', 'weight-change'\]"):
        sweep.main([str(grid(figures=["approx"])), "--dry-run"])
    with pytest.raises(ValueError, match=r"without the axis flag 'rank'"):
        sweep.main([str(grid(base={"rank": 2}, axis={"flag": "rank", "values": [1, 2]})), "--dry-run"])
    with pytest.raises(ValueError, match=r"names run lora-seed0 twice"):
        sweep.main([str(grid(seeds=[0, 0])), "--dry-run"])
    with pytest.raises(OSError, match=r"cannot read grid file .*grids/\*\.json"):
        sweep.main([str(tmp_path / "missing.json")])


# invariant: a learning-rate grid gives an init its own rates (per_init), and "select" adds, once every run has
# finished, the missing seeds at each init's rate chosen on mean dev (evaluate.best_rates) and nothing else
def test_a_learning_rate_grid_selects_each_inits_rate_on_dev(grid, tmp_path, capsys, monkeypatch):
    path = grid(base={"model": "minilm", "task": "rotten-tomatoes", "epochs": 1}, inits=["lora", "full"], seeds=[0, 1],
                axis={"flag": "lr", "values": [0.001, 0.01], "per_init": {"full": [1e-05]}},
                select={"seeds": [0, 1, 2], "split": "test"})
    spec, runs = sweep.load_grid(path)
    assert [r.name for r in runs] == ["lora-lr-0.001-seed0", "lora-lr-0.001-seed1", "lora-lr-0.01-seed0",
                                      "lora-lr-0.01-seed1", "full-lr-1e-05-seed0", "full-lr-1e-05-seed1"]
    assert sweep.selected(spec, path, runs) is None  # nothing has finished: nothing to choose from yet
    dev = {"lora-lr-0.001": (0.70, 0.74), "lora-lr-0.01": (0.80, 0.76), "full-lr-1e-05": (0.60, 0.62)}
    for run in runs:
        run.dir.mkdir(parents=True)
        lr = {"0.001": 1e-3, "0.01": 1e-2, "1e-05": 1e-5}[run.value]
        seed = int(run.name[-1])
        (run.dir / "config.json").write_text(json.dumps({"train": {"task": "rotten-tomatoes", "lr": lr, "seed": seed},
                                                         "lora": {"init": run.init, "seed": seed}}))
        acc = dev[run.name.rsplit("-seed", 1)[0]][seed]
        (run.dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 1, "dev": {"accuracy": acc}}) + "\n")
        (run.dir / "final.json").write_text("{}")
    chosen, extra = sweep.selected(spec, path, runs)
    assert [r.name for r in chosen] == ["lora-lr-0.01-seed0", "lora-lr-0.01-seed1", "lora-lr-0.01-seed2",
                                        "full-lr-1e-05-seed0", "full-lr-1e-05-seed1", "full-lr-1e-05-seed2"]
    assert [r.name for r in extra] == ["lora-lr-0.01-seed2", "full-lr-1e-05-seed2"]
    assert "--lr 0.01" in " ".join(extra[0].flags) and "--seed 2" in " ".join(extra[0].flags)
    commands = sweep.report_commands(spec, runs, tmp_path / "grid")
    assert len(commands) == 2 and "--best-lr" in commands[0][1]  # one --best-lr table over every rate
    calls = []  # the chosen runs are scored on the select split, of another task where "select" names one
    monkeypatch.setattr(sweep.subprocess, "run", lambda command, **_: calls.append(command) or
                        subprocess.CompletedProcess(command, 0, "", ""))
    sweep.score_selected(chosen[:1], {"seeds": [0], "split": "test", "task": "gsm8k", "data-dir": "math"}, 1)
    assert calls[0][2:] == [str(chosen[0].dir), "--split", "test", "--task", "gsm8k", "--data-dir", "math"]
    (chosen[0].dir / "eval-best-gsm8k-test.json").write_text("{}")  # scored already: not again
    sweep.score_selected(chosen[:1], {"seeds": [0], "split": "test", "task": "gsm8k", "data-dir": "math"}, 1)
    assert len(calls) == 1
    spec["select"] = {"seeds": [0], "split": "test", "task": "gsm8k"}
    command = sweep.report_commands(spec, runs, tmp_path / "grid")[0][1]
    assert command[-5:] == ["--task", "gsm8k", "--choose-on-seeds", "0,1", "--markdown"]  # chosen as selected() did
