"""Tests of train.py on a tiny BERT checkpoint and a tiny SST-2 in the GLUE layout.

- a tiny end-to-end run (train, save, evaluate) for every initialiser, with the base model unchanged;
- --resume after an interruption (a real SIGINT mid-epoch) ends with the same weights, optimizer
  state and metrics as the uninterrupted run, with dropout on, with and without --group-by-length;
- --compile: the same losses and adapter as the eager run, to float rounding;
- --dtype bfloat16: frozen weights and R in bfloat16, A, B, the head and the optimizer state in float32;
- --dry-run prints tools/memory.py's estimate and writes nothing; a run stores its measured peak;
- --group-by-length: length-sorted chunks of 50 steps of the same shuffle, with far less padding;
- the best-epoch checkpoint is the one with the best dev metric; the learning-rate schedule;
- a non-finite loss stops the run and keeps the last good checkpoint;
- bad input: unknown task, batch size 0, an existing run directory, a resume with another
  configuration or with nothing to resume — each a sentence, nothing overwritten;
- a failed start (bad model, rank too large, a loss that diverges at once) leaves no directory behind;
- `--resume --out DIR` alone continues with DIR's configuration, and a flag beside it must agree;
- SIGTERM exits 143, and a real SIGINT to `python train.py` exits 130 and prints a command that
  resumes to the same result as the uninterrupted run.
"""
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import data.prepare
import evaluate
import inilora
import train
from lib import runs
from lib.artifacts import read_artifact


def sst2_lines(n, seed):
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(["good", "great", "fun"] if label else ["bad", "terrible", "boring"])
        filler = " ".join(rng.choice(["the", "movie", "film", "is", "very", "a", "story", "long"]) for _ in range(4))
        lines.append(f"{filler} {word} {rng.choice(['movie', 'film'])} .\t{label}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def setup(tmp_path, monkeypatch, tiny_checkpoint):
    """A tiny SST-2 (24 train, 16 dev) and private data / approximation caches."""
    glue = tmp_path / "glue" / "SST-2"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text(sst2_lines(24, 0))
    (glue / "dev.tsv").write_text(sst2_lines(16, 1))
    monkeypatch.setattr(data.prepare, "DEFAULT_CACHE_DIR", tmp_path / "data-cache")
    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "approx-cache"))
    model_dir = tiny_checkpoint("BertModel")
    return tmp_path, model_dir


def args(setup, out, *extra):
    tmp_path, model_dir = setup
    return ["--model", str(model_dir), "--task", "sst2", "--glue-dir", str(tmp_path / "glue"),
            "--batch-size", "8", "--epochs", "1", "--rank", "2", "--lr", "1e-2", "--log-every", "1",
            "--approx-steps", "20", "--out", str(tmp_path / out), *extra]


@pytest.mark.parametrize("init", inilora.init_names())
def test_every_initialiser_trains_saves_and_evaluates(init, setup, capsys):
    tmp_path, _ = setup
    state = train.main(args(setup, f"run-{init}", "--init", init))
    assert state["step"] == 3 and state["best"]["epoch"] == 1
    run = tmp_path / f"run-{init}"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    # each log line holds every adapted layer's relative weight change (inilora.update_sizes); full has none
    assert all(len(r.get("update", {})) == (0 if init == "full" else 4) for r in records if "loss" in r)
    final = json.loads((run / "final.json").read_text())
    assert final["best"] == state["best"] and final["peak_memory_mib"] > 0
    capsys.readouterr()
    assert evaluate.main([str(run)]) == state["best"]["dev"]
    assert "the head evaluated is the adapter's" in capsys.readouterr().out
    assert json.loads((run / "eval-best-dev.json").read_text())["metrics"]["accuracy"] == state["best"]["dev"]["accuracy"]


@pytest.mark.parametrize("order", [(), ("--group-by-length",)], ids=["shuffle", "group-by-length"])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(order, setup, monkeypatch):
    tmp_path, _ = setup
    common = ("--epochs", "2", "--init", "alpha", "--lora-dropout", "0.1", "--save-every", "2", *order)
    full = train.main(args(setup, "full", *common))

    calls = {"n": 0}
    real_loss = train.loss_fn

    def interrupted_loss(logits, labels):  # Ctrl-C arrives during step 4 (mid-epoch 2)
        calls["n"] += 1
        if calls["n"] == 4:
            signal.raise_signal(signal.SIGINT)
        return real_loss(logits, labels)

    monkeypatch.setattr(train, "loss_fn", interrupted_loss)
    stopped = train.main(args(setup, "resumed", *common))
    assert stopped["step"] == 4 and stopped["signal"] == signal.SIGINT
    first = read_artifact(tmp_path / "resumed" / "checkpoint-4" / "state.safetensors", runs.STATE_FORMAT,
                          runs.STATE_VERSION, "")[1]["progress"]
    monkeypatch.setattr(train, "loss_fn", real_loss)
    resumed = train.main(args(setup, "resumed", *common, "--resume"))
    assert resumed == full
    # the resumed run's final.json describes the whole run: its time and peak include the stopped segment's
    final = json.loads((tmp_path / "resumed" / "final.json").read_text())
    assert final["seconds"] > first["seconds"] > 0 and final["peak_memory_mib"] >= first["peak_memory_mib"] > 0
    # a finished run resumed trains nothing and leaves its final.json as it was (it once rewrote the peak)
    before = (tmp_path / "resumed" / "final.json").read_bytes()
    assert train.main(args(setup, "resumed", *common, "--resume")) == full
    assert (tmp_path / "resumed" / "final.json").read_bytes() == before

    a, b = (inilora.read_adapter(tmp_path / run / "checkpoint-6" / "adapter.safetensors")[0]
            for run in ("full", "resumed"))
    assert a.keys() == b.keys()
    for key in a:
        assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    (sa, meta_a), (sb, meta_b) = (read_artifact(tmp_path / run / "checkpoint-6" / "state.safetensors",
                                                runs.STATE_FORMAT, runs.STATE_VERSION, "") for run in ("full", "resumed"))
    assert sa.keys() == sb.keys() and meta_a["state"] == meta_b["state"]
    for key in sa:
        assert_close(sa[key], sb[key], atol=0, rtol=0, msg=key)
    lines = [(tmp_path / run / "metrics.jsonl").read_text() for run in ("full", "resumed")]
    strip = [[{k: v for k, v in json.loads(l).items()} for l in text.splitlines()] for text in lines]
    assert [r["step"] for r in strip[0]] == [r["step"] for r in strip[1]]
    assert [r.get("loss") for r in strip[0]] == [r.get("loss") for r in strip[1]]


def test_group_by_length_sorts_chunks_of_50_steps_and_pads_less():
    lengths = torch.randint(5, 60, (1000,), generator=torch.Generator().manual_seed(0))
    plain = train.epoch_order(1000, 3, 1)
    grouped = train.epoch_order(1000, 3, 1, lengths, per_step=4)
    # the same examples, once each; each chunk of 50 steps holds the plain shuffle's examples, longest first
    assert sorted(grouped.tolist()) == list(range(1000))
    for a, b in zip(plain.split(200), grouped.split(200)):
        assert sorted(a.tolist()) == sorted(b.tolist())
        assert (lengths[b][:-1] >= lengths[b][1:]).all()
    # padding: each step of 4 pads to its longest example
    pad = {name: sum(int(lengths[s].max()) * len(s) - int(lengths[s].sum()) for s in order.split(4))
           for name, order in (("plain", plain), ("grouped", grouped))}
    assert pad["grouped"] < pad["plain"] / 10
    assert torch.equal(train.epoch_order(1000, 3, 1, lengths, 4), grouped)  # a function of (seed, epoch): resumable


def test_compile_gives_the_losses_and_adapter_of_the_eager_run(setup, tiny_checkpoint):
    # without dropout: compiled dropout draws its own random numbers, so with it the runs differ by more
    tmp_path, _ = setup
    no_dropout = (tmp_path, tiny_checkpoint("BertModel", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    runs_ = {name: train.main(args(no_dropout, name, "--init", "pissa", *flags))
             for name, flags in (("eager", ()), ("compiled", ("--compile",)))}
    losses = [[json.loads(l).get("loss") for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in runs_]
    assert_close(torch.tensor([x for x in losses[1] if x is not None]),
                 torch.tensor([x for x in losses[0] if x is not None]), atol=1e-5, rtol=1e-5)
    a, b = (inilora.read_adapter(tmp_path / name / "best" / "adapter.safetensors")[0] for name in runs_)
    for key in a:
        assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)


def test_best_checkpoint_is_the_epoch_with_the_best_dev_metric(setup):
    tmp_path, _ = setup
    state = train.main(args(setup, "run", "--epochs", "4", "--init", "lora"))
    dev = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "dev" in l]
    assert len(dev) == 4
    best = max(dev, key=lambda r: r["dev"]["accuracy"])  # max keeps the first of equals, as train.py
    meta = json.loads((tmp_path / "run" / "best" / "adapter.json").read_text())
    assert meta["epoch"] == best["epoch"] == state["best"]["epoch"]
    assert meta["dev"] == best["dev"]


def test_learning_rate_warms_up_then_decays_linearly_to_zero():
    cfg = train.TrainConfig(lr=1.0, warmup_ratio=0.1)
    lrs = [train.lr_at(t, 100, cfg) for t in range(101)]
    assert lrs[0] == 0 and lrs[5] == 0.5 and lrs[10] == 1.0
    assert lrs[55] == pytest.approx(0.5) and lrs[100] == 0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(setup, monkeypatch):
    tmp_path, _ = setup
    real_loss = train.loss_fn
    calls = {"n": 0}

    def diverging_loss(logits, labels):
        calls["n"] += 1
        loss = real_loss(logits, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train, "loss_fn", diverging_loss)
    with pytest.raises(runs.TrainingDiverged, match="the loss is nan at step 3.*Lower --lr"):
        train.main(args(setup, "run", "--save-every", "1", "--init", "lora"))
    run = tmp_path / "run"
    assert json.loads((run / "last.json").read_text())["step"] == 2
    tensors, meta = inilora.read_adapter(run / "checkpoint-2" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_train_limit_trains_on_the_drawn_examples_only(setup, capsys):
    tmp_path, _ = setup
    state = train.main(args(setup, "limited", "--init", "lora", "--train-limit", "10"))
    assert state["step"] == 2  # 10 of the 24 examples at batch 8
    assert "--train-limit 10: training on 10 drawn examples" in capsys.readouterr().out
    assert json.loads((tmp_path / "limited" / "config.json").read_text())["train"]["train_limit"] == 10  # stored
    with pytest.raises(ValueError, match="--train-limit 25 is not between 1 and the 24 training examples"):
        train.main(args(setup, "too-many", "--train-limit", "25"))
    with pytest.raises(ValueError, match="train_limit=-1 is negative"):
        train.main(args(setup, "negative", "--train-limit", "-1"))


def test_bad_input_is_refused_with_a_sentence(setup):
    tmp_path, _ = setup
    with pytest.raises(ValueError, match=r"task 'mnli' is not one of \["):
        train.main(args(setup, "a", "--task", "mnli"))
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        train.main(args(setup, "b", "--batch-size", "0"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train.main(args(setup, "c", "--resume"))
    train.main(args(setup, "run", "--init", "lora"))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already exists and is not empty; nothing was overwritten"):
        train.main(args(setup, "run", "--init", "lora"))
    with pytest.raises(ValueError, match=r"different configuration \(train.lr: 0.01 -> 0.001"):
        train.main(args(setup, "run", "--init", "lora", "--lr", "1e-3", "--resume"))
    assert before == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}


def test_a_resume_stopped_before_any_step_keeps_the_checkpoint(setup, monkeypatch):
    tmp_path, _ = setup
    common = ("--epochs", "2", "--init", "lora", "--save-every", "2")
    calls = {"n": 0}
    real_loss = train.loss_fn

    def interrupted_loss(logits, labels):  # Ctrl-C during step 2, then again during the resumed step 3
        calls["n"] += 1
        if calls["n"] in (2, 3):
            signal.raise_signal(signal.SIGINT)
        return real_loss(logits, labels)

    monkeypatch.setattr(train, "loss_fn", interrupted_loss)
    assert train.main(args(setup, "run", *common))["step"] == 2
    assert train.main(args(setup, "run", *common, "--resume"))["step"] == 3
    run = tmp_path / "run"
    assert json.loads((run / "last.json").read_text())["checkpoint"] == "checkpoint-3"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]
    inilora.read_adapter(run / "checkpoint-3" / "adapter.safetensors")  # complete and consistent


def test_the_default_run_directory_names_model_task_init_rank_and_seed(tmp_path):
    cfg, lcfg = train.configs_from_args(train.build_parser().parse_args(
        ["--model", str(tmp_path / "models" / "roberta-base") + "/", "--init", "pissa", "--rank", "4", "--seed", "2"]))
    assert train.default_run_dir(cfg, lcfg) == Path("runs/roberta-base-rotten-tomatoes-pissa-r4-seed2")
    cfg, lcfg = train.configs_from_args(train.build_parser().parse_args(["--model", "FacebookAI/roberta-base"]))
    assert train.default_run_dir(cfg, lcfg) == Path("runs/roberta-base-rotten-tomatoes-lora-r8-seed0")


# invariant: every check (model, rank against the model's shapes, task files) runs before the run
# directory is made, so a failed start leaves nothing behind and never blocks the correct run
def test_a_failed_start_leaves_nothing_behind(setup):
    tmp_path, _ = setup
    with pytest.raises(FileNotFoundError, match="'./no/such/model' does not exist.*--model minilm"):
        train.main(args(setup, "runs/run", "--model", "./no/such/model"))
    with pytest.raises(ValueError, match="rank=100000.*between 1 and 32"):
        train.main(args(setup, "runs/run", "--init", "pissa", "--rank", "100000"))
    with pytest.raises(FileNotFoundError, match="SST-2"):
        train.main(args(setup, "runs/run", "--glue-dir", str(tmp_path / "no-glue")))
    assert not (tmp_path / "runs").exists()
    (tmp_path / "empty").mkdir()  # a directory that was there before is kept, and stays empty
    with pytest.raises(ValueError, match="rank=100000"):
        train.main(args(setup, "empty", "--rank", "100000"))
    assert list((tmp_path / "empty").iterdir()) == []
    assert train.main(args(setup, "runs/run", "--init", "lora"))["step"] == 3


# invariant: a run that fails before its first checkpoint removes what it made, and only that
def test_a_run_that_fails_before_its_first_checkpoint_removes_what_it_made(setup, monkeypatch):
    tmp_path, _ = setup
    real_loss = train.loss_fn
    monkeypatch.setattr(train, "loss_fn", lambda logits, labels: real_loss(logits, labels) * float("nan"))
    with pytest.raises(runs.TrainingDiverged, match="at step 1.*no checkpoint was written yet.*Lower --lr"):
        train.main(args(setup, "new/run", "--init", "lora"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(runs.TrainingDiverged):
        train.main(args(setup, "kept", "--init", "lora"))
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []
    monkeypatch.setattr(train, "loss_fn", real_loss)
    old = tmp_path / "old"  # an older train.py's failed start left config.json alone: it no longer blocks
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"train": {"lr": 1.0}, "lora": {}}))
    assert train.main(args(setup, "old", "--init", "lora"))["step"] == 3
    assert json.loads((old / "config.json").read_text())["train"]["lr"] == 0.01


# invariant: `--resume --out DIR` alone continues with DIR's configuration to the uninterrupted result;
# a flag beside it must agree with the stored value (harmless ones may change)
def test_resume_with_out_alone_continues_the_stored_run(setup, monkeypatch, capsys):
    tmp_path, _ = setup
    common = ("--epochs", "2", "--init", "beta-kaiming-normal", "--lora-dropout", "0.1")
    full = train.main(args(setup, "full", *common))
    real_loss = train.loss_fn
    calls = {"n": 0}

    def interrupted_loss(logits, labels):  # Ctrl-C during step 2
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)
        return real_loss(logits, labels)

    monkeypatch.setattr(train, "loss_fn", interrupted_loss)
    run = tmp_path / "run"
    capsys.readouterr()
    assert train.main(args(setup, "run", *common))["step"] == 2
    assert f"continue with: python train.py --resume --out {shlex.quote(str(run))}" in capsys.readouterr().out
    monkeypatch.setattr(train, "loss_fn", real_loss)
    assert train.main(["--resume", "--out", str(run)]) == full
    assert "resuming " + str(run) + " from checkpoint-2 at step 2" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"lora.rank: 2 -> 4 \(--rank\).*Leave out --rank"):
        train.main(["--resume", "--out", str(run), "--rank", "4"])
    with pytest.raises(ValueError, match=r"train.seed: 0 -> 1 \(--seed\).*lora.seed: 0 -> 1 \(--seed\)"):
        train.main(["--resume", "--out", str(run), "--seed", "1"])
    # the same values given again, and another log interval, are accepted: a finished run resumes to itself
    assert train.main(["--resume", "--out", str(run), "--rank", "2", "--init", "beta-kaiming-normal",
                       "--log-every", "5"]) == full


# invariant: SIGTERM, like Ctrl-C, saves a checkpoint at the next step and exits non-zero (128 + 15)
def test_sigterm_saves_a_checkpoint_and_exits_143(setup, monkeypatch):
    tmp_path, _ = setup
    real_loss = train.loss_fn
    calls = {"n": 0}

    def terminated_loss(logits, labels):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGTERM)
        return real_loss(logits, labels)

    monkeypatch.setattr(train, "loss_fn", terminated_loss)
    monkeypatch.setattr(sys, "argv", ["train.py", *args(setup, "run", "--init", "lora")])
    with pytest.raises(SystemExit) as stopped:
        train.cli()
    assert stopped.value.code == 143
    assert json.loads((tmp_path / "run" / "last.json").read_text())["step"] == 2
    assert not (tmp_path / "run" / "final.json").exists()


# invariant: a real SIGINT to `python train.py` exits 130, and the command it prints, run exactly as
# printed, ends with the same metrics and adapter as the uninterrupted run
@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_a_real_sigint_exits_130_and_the_printed_command_resumes_to_the_same_result(setup):
    tmp_path, _ = setup
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    common = ("--epochs", "20", "--init", "lora", "--lora-dropout", "0.1")
    proc = subprocess.Popen([sys.executable, "train.py", *args(setup, "stopped", *common)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 1/60"):
                proc.send_signal(signal.SIGINT)
                break
        out = proc.stdout.read()
        assert proc.wait(timeout=120) == 130, out
    finally:
        proc.kill()
    command = re.search(r"continue with: (python train\.py .*)", out).group(1)
    assert shlex.split(command)[1:] == ["train.py", "--resume", "--out", str(tmp_path / "stopped")]
    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=root, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    full = subprocess.run([sys.executable, "train.py", *args(setup, "full", *common)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stdout + full.stderr
    a, b = ((tmp_path / run / "metrics.jsonl").read_text() for run in ("full", "stopped"))
    assert a == b and a.count("dev") == 20
    a, b = (inilora.read_adapter(tmp_path / run / "checkpoint-60" / "adapter.safetensors")[0] for run in ("full", "stopped"))
    for key in a:
        assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


# invariant: a signal during the dev evaluation stops the run at that epoch's end, before another step
def test_a_signal_during_evaluation_stops_at_the_end_of_the_epoch(setup, monkeypatch):
    real_predict = evaluate.predict

    def interrupted_predict(*a, **k):
        signal.raise_signal(signal.SIGINT)
        return real_predict(*a, **k)

    monkeypatch.setattr(evaluate, "predict", interrupted_predict)
    state = train.main(args(setup, "run", "--epochs", "2", "--init", "lora"))
    assert (state["step"], state["signal"], state["best"]["epoch"]) == (3, signal.SIGINT, 1)


# invariant: --dtype bfloat16 keeps the frozen weights and R in bfloat16, and what trains (A, B, the head) and
# its optimizer state in float32
def test_bfloat16_training_keeps_frozen_weights_low_and_trained_ones_float32(setup, monkeypatch):
    seen = {}
    real_train = train.train

    def spy(cfg, lora_cfg, job, device):
        seen.update({n: (p.dtype, p.requires_grad) for n, p in job.model.named_parameters()})
        return real_train(cfg, lora_cfg, job, device)

    monkeypatch.setattr(train, "train", spy)
    state = train.main(args(setup, "bf16", "--init", "pissa", "--dtype", "bfloat16"))
    assert state["step"] == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in
                                      map(json.loads, (setup[0] / "bf16" / "metrics.jsonl").read_text().splitlines())
                                      if "loss" in r)
    assert seen["encoder.layers.0.attn.query.R"] == (torch.bfloat16, False)
    assert seen["encoder.layers.0.attn.key.weight"] == (torch.bfloat16, False)
    trained = {n: d for n, (d, grad) in seen.items() if grad}
    assert trained and set(trained.values()) == {torch.float32} and "encoder.layers.0.attn.query.A" in trained
    state_file = read_artifact(setup[0] / "bf16" / "checkpoint-3" / "state.safetensors", runs.STATE_FORMAT,
                               runs.STATE_VERSION, "")[0]
    assert {t.dtype for k, t in state_file.items() if k.endswith("exp_avg")} == {torch.float32}


# invariant: --dry-run prints the memory estimate and writes nothing; a real run stores the estimate beside
# the peak it measured, and on the CPU the tensor peak of the step holding the longest example beside the
# estimate of it
def test_dry_run_writes_nothing_and_a_run_reports_its_peak(setup, capsys):
    # --dry-run hands the run's settings to python -m tools.memory; a run measures its peak, no estimate
    tmp_path, _ = setup
    assert train.main(args(setup, "dry", "--dry-run", "--init", "pissa")) == {}
    out = capsys.readouterr().out
    assert "memory estimate for" in out and "this run:" in out and not (tmp_path / "dry").exists()
    train.main(args(setup, "real", "--init", "pissa"))
    final = json.loads((tmp_path / "real" / "final.json").read_text())
    assert final["peak_memory_mib"] > 0 and "estimated_peak_mib" not in final


# coursework is one place: a new initialiser is one function and one line in inilora.INITIALISERS; it then
# appears in --init and --help, a sweep grid accepts it, the figures draw it, and a run trains with it
def test_a_new_initialiser_is_one_function_and_one_table_entry(setup, monkeypatch, capsys):
    import argparse

    from tools import figures, sweep

    @torch.no_grad()
    def init_toy(W0, cfg, g, approx):
        """A toy: A0 = 0.01, B0 = -0.01 everywhere (the residual keeps the step-0 function)."""
        d_out, d_in = W0.shape
        return torch.full((cfg.rank, d_in), 0.01), torch.full((d_out, cfg.rank), -0.01)

    monkeypatch.setitem(inilora.INITIALISERS, "toy", init_toy)
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "'toy'" in capsys.readouterr().out  # --init's help lists the table as it is now
    tmp_path, model_dir = setup
    sweep.check_flags(args(setup, "grid-run", "--init", "toy"), "a grid")  # a sweep accepts it
    figure_args = argparse.Namespace(model=str(model_dir), targets=None, target=None, rank=2, alpha_std=0.5,
                                     approx_steps=20, seed=0, cache_dir=tmp_path / "approx")
    factors, W0, _, _ = figures.init_factors(figure_args, ["toy", "lora"])  # the figures draw it
    assert torch.equal(factors["toy"][0], torch.full((2, W0.shape[1]), 0.01))
    state = train.main(args(setup, "toy", "--init", "toy", "--epochs", "1", "--batch-size", "12"))
    assert state["step"] == 2  # 24 examples, 12 a step: two steps trained
    assert json.loads((tmp_path / "toy" / "config.json").read_text())["lora"]["init"] == "toy"


# invariant: the log line's throughput keeps three significant digits, so a slow step (a big model on a CPU)
# reads "0.5 samples/s", not "0 samples/s"
def test_a_slow_steps_throughput_is_not_rounded_to_zero(tmp_path, monkeypatch, capsys):
    losses = train.StepLosses()
    losses.values, losses.start = [0.5], 100.0
    monkeypatch.setattr(train.time, "perf_counter", lambda: 116.0)  # one step of 16 s
    cfg = train.TrainConfig(batch_size=8, grad_accum=1)
    job = type("Job", (), {"state": {"step": 1}, "model": torch.nn.Linear(2, 2)})()
    with open(tmp_path / "metrics.jsonl", "a") as log:
        losses.log_line(cfg, job, 0, 1e-3, 10, log)
    assert "| 16000.0 ms/step | 0.5 samples/s" in capsys.readouterr().out


# invariant: a run chooses its CPU threads once (one per free core: lib.common.choose_threads), stores the count,
# and --resume reuses it whatever the load is then, since the count changes float sums in their last bits
def test_the_thread_count_is_chosen_once_and_kept_on_resume(setup, monkeypatch, capsys):
    tmp_path, _ = setup
    from lib import common
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(common, "busy_cores", lambda seconds=0.25: 0.0)  # an idle machine: 2 threads
    try:
        train.main(args(setup, "run", "--init", "lora", "--save-every", "1"))
        assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["threads"] == 2
        assert "2 CPU threads (2 cores, all free: one per core)" in capsys.readouterr().out
        (tmp_path / "run" / "final.json").unlink()  # as if it had stopped after its last checkpoint
        monkeypatch.setattr(common, "busy_cores", lambda seconds=0.25: 2.0)  # now busy: a fresh run would take 1
        train.main(args(setup, "run", "--init", "lora", "--resume"))
        assert torch.get_num_threads() == 2
        assert "2 CPU threads (the run's stored count" in capsys.readouterr().out
    finally:
        torch.set_num_threads(1)


# invariant: an epoch's last step is checkpointed only after its dev evaluation, so a run killed during that
# evaluation resumes by scoring the epoch; it once resumed past it (no dev record, no best, finish() failed)
def test_a_run_killed_while_scoring_an_epoch_resumes_to_the_same_result(setup, monkeypatch):
    tmp_path, _ = setup
    common = ("--epochs", "2", "--init", "lora", "--save-every", "1")
    full = train.main(args(setup, "full", *common))
    real = train.dev_scores

    def killed(*a, **k):  # the process dies while epoch 1 is scored (a kill, an out-of-memory stop)
        raise SystemExit(137)

    monkeypatch.setattr(train, "dev_scores", killed)
    with pytest.raises(SystemExit):
        train.main(args(setup, "killed", *common))
    monkeypatch.setattr(train, "dev_scores", real)
    assert train.main(args(setup, "killed", *common, "--resume")) == full


# invariant: a run made before a setting existed (its config.json lacks rslora, init_batches, threads) resumes at the
# setting's default, which is what train.py did before; a stored value that differs is still refused
def test_a_run_older_than_a_setting_resumes_at_its_default(setup):
    tmp_path, _ = setup
    common = ("--init", "lora", "--epochs", "2", "--save-every", "1")
    full = train.main(args(setup, "full", *common))
    train.main(args(setup, "old", *common, "--epochs", "1"))  # stands for a run stopped after epoch 1 ...
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    config["train"]["epochs"] = 2
    for section, key in (("lora", "rslora"), ("lora", "init_batches"), ("train", "threads")):
        del config[section][key]  # ... by a train.py that had none of these settings
    path.write_text(json.dumps(config))
    (tmp_path / "old" / "final.json").unlink()
    assert train.main(args(setup, "old", *common, "--resume"))["step"] == full["step"]
    with pytest.raises(ValueError, match=r"lora.rslora: None -> True \(config.json lacks it"):
        train.main(args(setup, "old", *common, "--resume", "--rslora"))
