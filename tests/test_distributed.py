"""Data parallelism: `torchrun --nproc_per_node 2 train.py` on this CPU (gloo), against one process.

- 2 processes with global batch 32 (16 each) give the losses, dev scores and adapter of 1 process with
  batch 32 (within float32 sum order; the tiny BERT has no dropout, whose draws differ per rank by design);
- the shares of a step: contiguous, sizes differ by at most one, every example once;
- a 2-process run stopped by a real SIGINT (the whole process group, as Ctrl-C in a terminal) exits 130,
  and `torchrun ... train.py --resume --out DIR` ends bit-identical to the uninterrupted 2-process run;
  so does one stopped at an exact step (mid-epoch, and at an epoch's end) by tests/stop_at_step.py;
- resuming with another number of processes says what that means.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import sst2_lines
from torch.testing import assert_close

import inilora
from lib import distributed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tmp_path, tiny_checkpoint):
    glue = tmp_path / "glue" / "SST-2"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text(sst2_lines(160, 0))  # 5 steps of 32 an epoch
    (glue / "dev.tsv").write_text(sst2_lines(15, 1))  # 15: the two ranks score 7 and 8
    model = tiny_checkpoint("BertModel", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tmp_path, model


def command(setup, out, procs, *extra):
    tmp_path, model = setup
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                if procs > 1 else [sys.executable])
    return [*launcher, "train.py", "--model", str(model), "--task", "sst2", "--glue-dir", str(tmp_path / "glue"),
            "--batch-size", "32", "--rank", "2", "--lr", "1e-2", "--log-every", "1", "--init", "pissa",
            "--cache-dir", str(tmp_path / "approx"), "--out", str(tmp_path / out), *extra]


def run(cmd, timeout=300, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def records(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir, name):
    return inilora.read_adapter(run_dir / name / "adapter.safetensors")[0]


def test_shares_are_contiguous_and_cover_every_example_once():
    for n in (0, 1, 7, 8, 32):
        for size in (1, 2, 3):
            parts = [distributed.share(list(range(n)), distributed.World(r, size)) for r in range(size)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_two_processes_equal_one_process_with_the_same_global_batch(setup):
    tmp_path, _ = setup
    one = run(command(setup, "one", 1, "--epochs", "2"))
    assert one.returncode == 0, one.stdout + one.stderr
    two = run(command(setup, "two", 2, "--epochs", "2"))
    assert two.returncode == 0, two.stdout + two.stderr
    assert "shared by 2 processes" in two.stdout and two.stdout.count("configuration:") == 1  # rank 0 alone prints
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len([r for r in a if "loss" in r]) == 10
    assert_close(torch.tensor([r["loss"] for r in b if "loss" in r]), torch.tensor([r["loss"] for r in a if "loss" in r]),
                 atol=1e-5, rtol=1e-5)
    assert [r["dev"] for r in a if "dev" in r] == [r["dev"] for r in b if "dev" in r]  # sharded, gathered
    x, y = adapter(tmp_path / "one", "best"), adapter(tmp_path / "two", "best")
    for key in x:
        assert_close(y[key], x[key], atol=1e-5, rtol=1e-5, msg=key)
    final = json.loads((tmp_path / "two" / "final.json").read_text())
    assert final["world_size"] == 2 and final["peak_memory_mib"] > 0


@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_an_interrupted_two_process_run_resumes_to_the_same_result(setup):
    tmp_path, _ = setup
    cmd = command(setup, "stopped", 2, "--epochs", "10")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        metrics = tmp_path / "stopped" / "metrics.jsonl"
        deadline = time.time() + 180
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 7) and proc.poll() is None:
            assert time.time() < deadline, "the run did not reach step 7"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: every process of the group gets SIGINT
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped at step" in out and "continue with: torchrun --nproc_per_node 2 train.py --resume" in out, out
    assert proc.returncode != 0  # torchrun reports the workers' exit code 130 as a failure
    stopped_at = json.loads((tmp_path / "stopped" / "last.json").read_text())["step"]
    assert 7 <= stopped_at < 50  # 10 epochs of 5 steps: a Ctrl-C two polls after step 7 lands well before the end
    resumed = run([*command(setup, "stopped", 2)[:6], "train.py", "--resume", "--out", str(tmp_path / "stopped")])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"at step {stopped_at}" in resumed.stdout and "note:" not in resumed.stdout
    full = run(command(setup, "full", 2, "--epochs", "10"))
    assert full.returncode == 0, full.stdout + full.stderr
    assert [r.get("loss") for r in records(tmp_path / "full")] == [r.get("loss") for r in records(tmp_path / "stopped")]
    x, y = adapter(tmp_path / "full", "checkpoint-50"), adapter(tmp_path / "stopped", "checkpoint-50")
    for key in x:
        assert_close(y[key], x[key], atol=0, rtol=0, msg=key)


@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_a_two_process_run_stopped_at_any_step_resumes_to_the_same_result(setup):
    # a real SIGINT at an exact step (tests/stop_at_step.py), not wherever a timed one lands: mid-epoch, and at
    # an epoch's end (the signal comes before dev evaluation and the epoch's checkpoint)
    tmp_path, _ = setup
    full = run(command(setup, "full", 2, "--epochs", "4"))
    assert full.returncode == 0, full.stdout + full.stderr
    for step in (3, 10):
        out = f"stopped-{step}"
        cmd = command(setup, out, 2, "--epochs", "4")
        stopped = run([*cmd[:6], "tests/stop_at_step.py", *cmd[7:]], env={"STOP_AT_STEP": str(step)})
        assert stopped.returncode != 0 and f"stopped at step {step}/20" in stopped.stdout, stopped.stdout + stopped.stderr
        resumed = run([*cmd[:6], "train.py", "--resume", "--out", str(tmp_path / out)])
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"at step {step}" in resumed.stdout
        assert records(tmp_path / out) == records(tmp_path / "full"), step
        x, y = adapter(tmp_path / "full", "checkpoint-20"), adapter(tmp_path / out, "checkpoint-20")
        for key in x:
            assert torch.equal(y[key], x[key]), (step, key)


@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_resuming_with_another_number_of_processes_says_what_it_means(setup):
    tmp_path, _ = setup
    first = run(command(setup, "run", 2, "--epochs", "1"))
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = run([sys.executable, "train.py", "--resume", "--out", str(tmp_path / "run")])  # 1 process
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "checkpointed with 2 process(es) and resumes with 1" in resumed.stdout
