"""Checks evaluate.py beyond the metrics: the evaluation loop on a fake model whose logits are
fixed per example (classification and regression, longest first, dynamically padded, no mask
without padding, eval mode, inference mode, predictions returned in the split's order), the --compare table on run directories written by hand (best epoch, mean ± std over
seeds, row order, skipped runs — never started or in progress —, Markdown), and the command line's errors.

    python3 -m pytest tests/test_evaluate.py -q
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate
from data.metrics import METRICS
from data.prepare import TASKS
from evaluate import best_rates, compare, main, predict

# -----------------------------------------------------------------------------
# the evaluation loop


class FixedLogits(nn.Module):
    """logits[b] = table[input_ids[b, 0]]: each example's first token id picks its row.
    Records, per call: the batch shape, the real lengths (mask sums), train mode and grad mode."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)  # (V, num_labels)
        self.calls = []

    def forward(self, input_ids, attention_mask, token_type_ids):
        assert input_ids.shape == token_type_ids.shape
        assert attention_mask is None or attention_mask.shape == input_ids.shape  # None: no padding
        lengths = (attention_mask.sum(1) if attention_mask is not None else torch.full((len(input_ids),),
                   input_ids.shape[1])).tolist()
        self.calls.append((tuple(input_ids.shape), lengths, self.training, torch.is_inference_mode_enabled()))
        return self.table[input_ids[:, 0]]  # (B, num_labels)


PAD = 9


def fake_split(labels, lengths=(3, 1, 4, 2, 2)):
    """Example i is [i, 7, 7, ...] of lengths[i] tokens."""
    ids = [torch.tensor([i] + [7] * (n - 1)) for i, n in enumerate(lengths)]
    return {"input_ids": ids, "token_type_ids": [torch.zeros_like(x) for x in ids], "labels": torch.tensor(labels)}


def test_classification_predictions_and_metrics():
    # argmax per example: 1, 0, 1, 1, 0
    model = FixedLogits([[0.0, 1.0], [2.0, -1.0], [-3.0, 3.0], [0.1, 0.2], [5.0, 4.0]]).train()
    split = fake_split([1, 0, 0, 1, 1])
    out = evaluate.evaluate(model, split, TASKS["mrpc"], PAD, batch_size=2)
    # TP = 2, FP = 1, FN = 1, TN = 1: F1 = 2*2 / (2*2 + 1 + 1), accuracy 3/5
    assert out == {"f1": pytest.approx(4 / 6), "accuracy": pytest.approx(3 / 5)}
    assert list(out) == list(TASKS["mrpc"].metrics)
    # longest first (lengths 3 1 4 2 2: examples 2 0 | 3 4 | 1), each batch padded to its own longest example,
    # without a mask when it needs no padding, eval mode, inference mode; the predictions in the split's order
    assert model.calls == [((2, 4), [4, 3], False, True), ((2, 2), [2, 2], False, True), ((1, 1), [1], False, True)]
    assert not model.training
    np.testing.assert_array_equal(predict(model, split, TASKS["mrpc"], PAD, batch_size=64), [1, 0, 1, 1, 0])


def test_regression_predictions_are_the_scores():
    scores = [0.5, 2.0, 1.0, 4.0, 3.0]
    model = FixedLogits([[s] for s in scores])
    split = fake_split([1.0, 2.5, 2.0, 5.0, 3.5])
    preds = predict(model, split, TASKS["stsb"], PAD, batch_size=3)
    np.testing.assert_allclose(preds, scores, rtol=0, atol=1e-6)
    out = evaluate.evaluate(model, split, TASKS["stsb"], PAD, batch_size=3)
    labels = split["labels"].numpy()
    assert out["pearson"] == pytest.approx(METRICS["pearson"](np.array(scores), labels))
    assert out["pearson"] < 1.0
    assert out["spearman"] == pytest.approx(1.0)  # same order: 0.5 < 1 < 2 < 3 < 4 and 1 < 2 < 2.5 < 3.5 < 5


def test_wrong_number_of_logits_is_a_clear_error():
    model = FixedLogits(torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"needs \(2, 2\).*num_labels=2"):
        evaluate.evaluate(model, fake_split([0, 1, 0, 1, 0]), TASKS["sst2"], PAD, batch_size=2)
    with pytest.raises(ValueError, match="batch size of at least 1"):
        evaluate.evaluate(model, fake_split([0, 1, 0, 1, 0]), TASKS["sst2"], PAD, batch_size=0)


# -----------------------------------------------------------------------------
# --compare on run directories written by hand


def make_run(root, name, init, seed, devs, task="mrpc", params=1000, lr=3e-4, partial_last_line=False):
    """A run directory as train.py leaves it: config.json, metrics.jsonl (a loss line and a dev
    line per epoch), and best/adapter.json when an epoch finished."""
    run = root / name
    run.mkdir()
    config = {"train": {"task": task, "seed": seed, "lr": lr, "epochs": 3}, "lora": {"init": init, "rank": 8, "seed": seed}}
    (run / "config.json").write_text(json.dumps(config))
    lines = []
    for epoch, dev in enumerate(devs, 1):
        lines.append({"step": 10 * epoch, "epoch": epoch, "loss": 0.5, "lr": lr})
        lines.append({"step": 10 * epoch, "epoch": epoch, "dev": dev})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run / "metrics.jsonl").write_text(text + ('{"step": 31, "epo' if partial_last_line else ""))
    if devs:
        (run / "best").mkdir()
        (run / "best" / "adapter.json").write_text(json.dumps({"trainable_params": params}))
    return run


@pytest.fixture
def mrpc_runs(tmp_path):
    """Given out of order: inilora x 2, an untrained run, lora x 2, alpha x 1."""
    return [
        # ties on f1: the earliest epoch counts, with its accuracy (85, not 95)
        make_run(tmp_path, "inilora-0", "inilora", 0, [{"f1": 0.90, "accuracy": 0.85}, {"f1": 0.90, "accuracy": 0.95}], params=2000),
        make_run(tmp_path, "inilora-1", "inilora", 1, [{"f1": 0.88, "accuracy": 0.87}], params=2000),
        make_run(tmp_path, "untrained", "pissa", 0, []),
        # best epoch by f1 is the 2nd: its accuracy 75 counts, not the larger 90 of epoch 3
        make_run(tmp_path, "lora-0", "lora", 0, [{"f1": 0.80, "accuracy": 0.70}, {"f1": 0.84, "accuracy": 0.75},
                                                 {"f1": 0.82, "accuracy": 0.90}]),
        make_run(tmp_path, "lora-1", "lora", 1, [{"f1": 0.86, "accuracy": 0.80}], partial_last_line=True),
        make_run(tmp_path, "alpha-0", "alpha", 0, [{"f1": 0.50, "accuracy": 0.60}]),
    ]


def test_compare_mean_std_and_order(mrpc_runs):
    task, rows, skipped, notes = compare(mrpc_runs)
    assert task is TASKS["mrpc"] and notes == []
    assert [r["init"] for r in rows] == ["lora", "inilora", "alpha"]  # the paper's order, not the input's
    lora, inilora, alpha = rows
    assert (lora["seeds"], lora["params"]) == (2, [1000])
    # f1: 84, 86 -> mean 85, std sqrt(((84-85)^2 + (86-85)^2) / (2-1)) = sqrt(2); accuracy 75, 80
    assert lora["f1"] == pytest.approx((85.0, math.sqrt(2)))
    assert lora["accuracy"] == pytest.approx((77.5, math.sqrt(12.5)))
    assert inilora["f1"] == pytest.approx((89.0, math.sqrt(2)))
    assert inilora["accuracy"] == pytest.approx((86.0, math.sqrt(2)))
    assert alpha["seeds"] == 1 and alpha["f1"][1] is None  # one seed: no std
    assert skipped == [(str(mrpc_runs[2]), "no dev record yet: training has not finished its first epoch")]


def test_compare_table_text_and_markdown(mrpc_runs, capsys):
    main(["--compare", *map(str, mrpc_runs)])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[1].split() == ["init", "#seeds", "trainable", "params", "f1", "accuracy"]
    assert lines[3].split() == ["lora", "2", "1,000", "85.00", "±", "1.41", "77.50", "±", "3.54"]
    assert lines[4].split() == ["inilora", "2", "2,000", "89.00", "±", "1.41", "86.00", "±", "1.41"]
    assert lines[5].split() == ["alpha", "1", "1,000", "50.00", "±", "-", "60.00", "±", "-"]
    assert "skipped" in err and "untrained" in err and "skipped" not in out

    main(["--compare", *map(str, mrpc_runs), "--markdown"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:5] == ["| init | #seeds | trainable params | f1 | accuracy |", "|:---|---:|---:|---:|---:|",
                          "| lora | 2 | 1,000 | 85.00 ± 1.41 | 77.50 ± 3.54 |"]


def test_compare_errors_and_notes(tmp_path):
    a = make_run(tmp_path, "a", "lora", 0, [{"f1": 0.8, "accuracy": 0.8}])
    b = make_run(tmp_path, "b", "lora", 0, [{"accuracy": 0.8}], task="rte")
    with pytest.raises(ValueError, match="needs runs of one task.*mrpc.*rte"):
        compare([a, b])
    c = make_run(tmp_path, "c", "lora", 1, [{"f1": 0.7, "accuracy": 0.8}], lr=1e-3)
    # runs of other settings are rows of their own, not one mean (it once averaged them with a note)
    _, rows, _, notes = compare([a, c])
    assert notes == ["the lora runs differ in train.lr, not only in the seed: one row per setting, not one mean over them."]
    assert [(r["init"], r["seeds"]) for r in rows] == [("lora, lr 0.0003", 1), ("lora, lr 0.001", 1)]
    # three runs of seed 0 are one seed, not "#seeds 3 ± 0.00": the repeats are left out, and said so
    d, e = (make_run(tmp_path, name, "lora", 0, [{"f1": 0.8, "accuracy": 0.8}]) for name in ("d", "e"))
    _, rows, skipped, _ = compare([a, d, e])
    assert [(r["init"], r["seeds"], r["f1"][1]) for r in rows] == [("lora", 1, None)]
    assert [run for run, why in skipped if "seed 0 again" in why] == [str(d), str(e)]
    with pytest.raises(ValueError, match="not a run directory"):
        compare([a, tmp_path])
    untrained = make_run(tmp_path, "u", "lora", 0, [])
    with pytest.raises(ValueError, match="none of the 1 runs has finished an epoch"):
        main(["--compare", str(untrained)])


# invariant: --best-lr picks each method's rate on mean dev over its seeds (ties to the lower rate) and reports
# test at that rate only; the one-rate table is every method at one rate, by default the one most were run at
def test_best_learning_rate_is_chosen_on_dev_and_reported_on_test(tmp_path, capsys):
    devs = {("lora", 1e-4): (0.70, 0.72), ("lora", 1e-3): (0.80, 0.78), ("lora", 1e-2): (0.60, 0.62),
            ("alpha", 1e-4): (0.81, 0.79), ("alpha", 1e-3): (0.75, 0.77), ("alpha", 1e-2): (0.50, 0.50)}
    tests = {("lora", 1e-3): (0.71, 0.73), ("alpha", 1e-4): (0.90, 0.70), ("lora", 1e-4): (0.99, 0.99)}
    runs = []
    for (init, lr), pair in devs.items():
        for seed, acc in enumerate(pair):
            run = make_run(tmp_path, f"{init}-{lr:g}-{seed}", init, seed, [{"f1": acc, "accuracy": acc}], lr=lr)
            if (init, lr) in tests:  # evaluate.py RUN --split test wrote it
                (run / "eval-best-test.json").write_text(json.dumps({"metrics": {"f1": tests[init, lr][seed]}}))
            runs.append(run)
    task, rows, _, _ = compare(runs)
    best, one, one_rate, notes = best_rates(task, rows)
    # lora's best dev is 1e-3 (79.0), though its test at 1e-4 (99.0) is higher: test never chooses
    assert [(r["method"], r["lr"], r["tried"]) for r in best] == [("lora", 1e-3, [1e-4, 1e-3, 1e-2]),
                                                                   ("alpha", 1e-4, [1e-4, 1e-3, 1e-2])]
    assert best[0]["f1"][0] == pytest.approx(79.0) and best[0]["test"][0] == pytest.approx(72.0)
    assert best[1]["test"] == pytest.approx((80.0, math.sqrt(200))) and best[1]["tested"] == 2
    assert one_rate == 1e-4 and [r["method"] for r in one] == ["lora", "alpha"] and notes == []
    assert best_rates(task, rows, one_rate=1e-2)[1][0]["f1"][0] == pytest.approx(61.0)
    main(["--compare", *map(str, runs), "--best-lr", "--markdown", "--one-rate", "0.001"])
    out = capsys.readouterr().out
    assert "| lora | 0.001 | 2 | 79.00 ± 1.41 | 72.00 ± 1.41 (2) | 3: 0.0001-0.01 |" in out
    assert "every method at one learning rate, 0.001" in out and "| alpha | 0.001 | 2 | 76.00 ± 1.41 | - |" in out
    # and the curve each choice was made on: every method's dev at every rate, the chosen one starred
    assert "| lora | 71.00 ± 1.41 | 79.00 ± 1.41 * | 61.00 ± 1.41 |" in out and "| method | lr 0.0001 | lr 0.001 |" in out
    # a seed run later at the chosen rate does not move the choice when it is made on the grid's seeds
    late = make_run(tmp_path, "lora-0.001-2", "lora", 2, [{"f1": 0.40, "accuracy": 0.40}], lr=1e-3)
    task, rows_late, _, _ = compare([*runs, late])
    assert [r["lr"] for r in best_rates(task, rows_late)[0]][:1] == [1e-4]  # all seeds: 1e-3 falls to 66.0
    kept = best_rates(task, rows_late, choose_seeds=[0, 1])[0][0]
    assert kept["lr"] == 1e-3 and kept["seeds"] == 3 and kept["accuracy" if "accuracy" in kept else "f1"][0] == pytest.approx(66.0)
    # runs trained on one task and tested on another (MetaMathQA -> GSM8K): the test column reads those files
    (runs[2] / "eval-best-gsm8k-test.json").write_text(json.dumps({"metrics": {"exact_match": 0.25}}))
    best = best_rates(task, rows, test_task="gsm8k")[0]
    assert best[0]["test"] == (25.0, None) and best[0]["tested"] == 1 and best[1]["tested"] == 0
    main(["--compare", *map(str, runs), "--best-lr", "--task", "gsm8k"])
    assert "gsm8k test exact_match (runs)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--task 'gsm9k' is not one of"):
        best_rates(task, rows, test_task="gsm9k")


# a run that never started (config.json alone, left by an older train.py) is told apart from one in progress
def test_compare_tells_never_started_from_in_progress(tmp_path):
    done = make_run(tmp_path, "done", "lora", 0, [{"f1": 0.8, "accuracy": 0.8}])
    in_progress = make_run(tmp_path, "in-progress", "lora", 1, [])
    (in_progress / "last.json").write_text(json.dumps({"checkpoint": "checkpoint-4", "step": 4}))
    never = tmp_path / "never"
    never.mkdir()
    (never / "config.json").write_text((done / "config.json").read_text())
    _, rows, skipped, _ = compare([done, in_progress, never])
    assert [r["seeds"] for r in rows] == [1]
    reasons = dict(skipped)
    assert "has not finished its first epoch" in reasons[str(in_progress)]
    assert reasons[str(never)].startswith("never started") and "delete it" in reasons[str(never)]
    with pytest.raises(FileNotFoundError, match="never started.*Delete it and train again"):
        main([str(never)])


# -----------------------------------------------------------------------------
# the command line's errors, before any model is loaded


def test_main_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a run directory"):
        main([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="neither a run directory .* nor an adapter file"):
        main([str(tmp_path)])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is not an adapter"):
        main([str(tmp_path / "notes.txt")])


def test_main_run_errors(tmp_path):
    run = make_run(tmp_path, "run", "lora", 0, [], task="cola")
    with pytest.raises(FileNotFoundError, match="has not finished an epoch yet.*--checkpoint last"):
        main([str(run)])
    with pytest.raises(FileNotFoundError, match="no last.json"):
        main([str(run), "--checkpoint", "last"])
    (run / "best").mkdir()
    (run / "best" / "adapter.safetensors").write_bytes(b"")
    (run / "best" / "adapter.json").write_text(json.dumps({"task": "cola", "max_length": 128, "model_id": "minilm"}))
    with pytest.raises(ValueError, match="split 'test' is not available for task 'cola'.*use --split dev"):
        main([str(run), "--split", "test"])
    with pytest.raises(ValueError, match="drop --checkpoint"):
        main([str(run / "best" / "adapter.safetensors"), "--checkpoint", "best"])


def test_adapter_for_another_base_model_is_a_sentence(tmp_path, tiny_checkpoint):
    import inilora
    from models.encoder import load_model

    model, _, model_id = load_model(str(tiny_checkpoint("BertModel")))
    cfg = inilora.LoRAConfig(init="lora", rank=2)
    fingerprint = inilora.base_fingerprint(model, cfg.targets)
    inilora.inject(model, cfg, model_id)
    path = tmp_path / "adapter.safetensors"
    inilora.save_adapter(model, path, cfg, model_id, fingerprint, {"task": "rotten-tomatoes", "num_labels": 2, "max_length": 32})
    other = tiny_checkpoint("BertModel", initializer_range=0.05)  # same shapes, other weights
    with pytest.raises(ValueError, match="was saved for base model"):
        main([str(path), "--model", str(other), "--device", "cpu"])


def test_script_prints_error_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "evaluate.py", str(tmp_path / "nope")], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


# a missing data file is said before the model loads (seconds for SmolLM2), not after
def test_a_missing_data_file_is_said_before_the_model_loads(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data file was checked")
    monkeypatch.setattr(evaluate.models, "load", no_load)
    with pytest.raises(FileNotFoundError, match="task 'mmlu', split 'test': no directory was given"):
        evaluate.evaluate_base("smollm2", "mmlu", "test", tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="task 'gsm8k', split 'test'"):
        evaluate.evaluate_base("smollm2", "gsm8k", "test", tmp_path / "base", data_dir=tmp_path / "nothing-here")
