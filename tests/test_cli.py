"""Every entry point ends a bad input with one `error: ...` sentence, never a traceback.

Each case runs the script as a user would (a subprocess) with one wrong value, and checks the
exit status, that the sentence names the wrong value, and that no traceback is printed. A train.py
that fails at its start leaves no run directory behind. Every entry point's --help shows the defaults.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    (["approximate.py", "--model", "./no/such/model"], "'./no/such/model' does not exist"),
    (["approximate.py", "--rank", "0"], "rank"),
    (["inilora.py", "--init", "kaiming"], "'kaiming' is not one of"),
    (["train.py", "--batch-size", "0", "--out", "{tmp}/run"], "batch_size=0 must be at least 1"),
    (["train.py", "--task", "mnli", "--out", "{tmp}/run"], "task 'mnli' is not one of"),
    (["train.py", "--model", "does-not-exist", "--out", "{tmp}/run"], "'does-not-exist'"),
    (["train.py", "--init", "pissa", "--rank", "100000", "--out", "{tmp}/run"], "rank=100000"),
    (["train.py", "--resume", "--out", "{tmp}/run"], "nothing to resume"),
    # a Hub model offline: training needs the weights and the tokenizer, and says so (not "pass a config.json")
    (["train.py", "--model", "FacebookAI/roberta-base", "--out", "{tmp}/run"],
     "Pass a local directory holding config.json, tokenizer.json and model.safetensors"),
    (["evaluate.py", "{tmp}/missing-run"], "missing-run"),
    # generation tasks (causal LMs)
    (["train.py", "--task", "arithmetic", "--model", "minilm", "--out", "{tmp}/run"], "--model minilm is an encoder"),
    (["train.py", "--task", "rotten-tomatoes", "--model", "smollm2", "--out", "{tmp}/run"], "--model smollm2 is a decoder"),
    (["train.py", "--max-length", "2", "--out", "{tmp}/run"], "leaves 9915 of the 9915 training examples"),
    (["train.py", "--grad-accum", "0", "--out", "{tmp}/run"], "grad_accum=0 must be at least 1"),
    (["train.py", "--grad-checkpointing", "--out", "{tmp}/run"], "'rotten-tomatoes' trains an encoder"),
    (["evaluate.py", "--base", "--task", "rotten-tomatoes", "--out", "{tmp}/base"], "--task 'rotten-tomatoes' is not one of"),
    (["evaluate.py", "--base", "--task", "arithmetic"], "--base needs --out"),
    # the file-based knowledge tasks: a missing file, or a split MMLU does not have, is a sentence
    (["train.py", "--task", "sharegpt", "--out", "{tmp}/run"], "task 'sharegpt', split 'train': no file was given"),
    (["train.py", "--task", "mmlu", "--out", "{tmp}/run"], "MMLU has no training split"),
    (["evaluate.py", "--base", "--task", "mmlu", "--split", "test", "--out", "{tmp}/base"],
     "task 'mmlu', split 'test': no directory was given"),
]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_bad_input_ends_with_one_sentence(argv, expected, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "INILORA_CACHE": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last
    assert not (tmp_path / "run").exists() and not (tmp_path / "base").exists()  # a failed start leaves nothing behind


@pytest.mark.parametrize("script,default", [("train.py", "(default: 0.0003)"), ("evaluate.py", "(default: dev)")])
def test_help_shows_the_defaults(script, default):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and default in " ".join(result.stdout.split()), result.stdout


# invariant: a package's command names itself as it is run (`python -m tools.sweep`), not as its file
# (`sweep.py`), and a figure command without a figure lists the figures
def test_module_commands_name_themselves_and_figures_lists_its_figures():
    help_ = subprocess.run([sys.executable, "-m", "tools.sweep", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert help_.stdout.startswith("usage: python -m tools.sweep "), help_.stdout[:80]
    bare = subprocess.run([sys.executable, "-m", "tools.figures"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert "name a figure, e.g. `python -m tools.figures approx`" in bare.stderr
    assert all(f"  {name} " in bare.stderr for name in ("approx", "subspace", "alpha-std", "init-hist", "curves"))
    chat = subprocess.run([sys.executable, "-m", "models.chat", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # the README's chat command: its module is imported once, without a warning
    assert chat.stdout.startswith("usage: python -m models.chat ") and not chat.stderr, chat.stderr
