"""Checks the multiple-choice kind: MMLU's reader on small files written here in MMLU's CSV layout (subjects
from file names, dev/ shots, val/ as dev, test/), the k-shot prompt string, shots dropped to fit max_length,
the training sequence (prompt ++ " X", loss on " X" alone), the scoring by the log-likelihood of the answer
letters against a by-hand forward pass, micro and macro accuracy, the offline arithmetic-mc task, and
train.py / evaluate.py end to end on a tiny multiple-choice task; every bad file is a sentence naming it.
The model is conftest.tiny_letter_decoder (a tiny random LLaMA whose BPE keeps ' A'..' D' whole), the
files conftest.tiny_mmlu.

    python -m pytest tests/test_multiple_choice.py -q
"""
import json
from collections import Counter

import pytest
import torch
from torch.testing import assert_close

import data.prepare
import evaluate
import train
from data import arithmetic_mc, mmlu
from data.mmlu import choice_sequences, question_block
from data.task import Examples, Task
from models.decoder import load_causal_lm


@pytest.fixture(scope="module")
def letter_model(tiny_letter_decoder):
    model, tokenizer, _ = load_causal_lm(str(tiny_letter_decoder))
    return model.eval(), tokenizer


# -----------------------------------------------------------------------------
# MMLU's files and the prompt


def test_mmlu_reader_reads_the_csv_layout(tmp_path, tiny_mmlu):
    root = tiny_mmlu
    blocks, subjects, answers = mmlu.read("test", root)
    assert subjects == ["college toys"] * 4 + ["world facts"] * 2  # from the file names, in name order
    assert answers == ["B", "C", "A", "A", "B", "D"]
    # Hendrycks' format_example: question, '\nA. ..' per choice, '\nAnswer:' (a quoted comma survives the CSV)
    assert blocks[3] == "Which, of these, is a toy?\nA. a ball\nB. a tax\nC. a bill\nD. a fee\nAnswer:"
    assert mmlu.read("dev", root).texts == [blocks[0], blocks[4]]  # the project's dev split is MMLU's val/
    assert mmlu.read("shots", root).labels == ["C", "B", "D", "B"]  # MMLU's dev/: the few-shot examples


def test_mmlu_missing_and_malformed_files_are_sentences(tmp_path, tiny_mmlu):
    with pytest.raises(FileNotFoundError, match=r"no directory was given.*--data-dir DIR.*SUBJECT_test.csv"):
        mmlu.source("test", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/test holds no \*_test.csv file"):
        mmlu.read("test", tmp_path / "empty")
    root = tiny_mmlu
    bad = root / "test" / "world_facts_test.csv"
    bad.write_text("Capital of France?,Rome,Paris,Oslo,B\n")  # a choice missing
    with pytest.raises(ValueError, match=r"world_facts_test.csv, row 1: expected 6 fields \(question, A, B, C, D, "
                                         r"answer\) but found 5"):
        mmlu.read("test", root)
    bad.write_text("Capital of France?,Rome,Paris,Oslo,Bern,B\nLargest ocean?,Arctic,Indian,Atlantic,Pacific,E\n")
    with pytest.raises(ValueError, match=r"world_facts_test.csv, row 2, field 'answer': 'E' is not one of"):
        mmlu.read("test", root)
    # MMLU has no training split: train.py says what the paper does instead
    with pytest.raises(ValueError, match=r"MMLU has no training split.*--task sharegpt"):
        train.main(["--task", "mmlu", "--data-dir", str(root), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


# invariant: the prompt is the standard k-shot string: header, k solved examples of the subject, the question
def test_kshot_prompt_is_the_standard_layout(tmp_path, letter_model, tiny_mmlu):
    _, tokenizer = letter_model
    root = tiny_mmlu
    seqs = mmlu.tokenize(tokenizer, "test", root, 2048, 2)
    shots = mmlu.read("shots", root)
    expected = ("The following are multiple choice questions (with answers) about world facts.\n\n"
                f"{shots.texts[2]} D\n\n{shots.texts[3]} B\n\n"
                "Largest ocean?\nA. Arctic\nB. Indian\nC. Atlantic\nD. Pacific\nAnswer:")
    assert tokenizer.decode(seqs.prompts[5], skip_special_tokens=False) == expected
    assert seqs.fields["subjects"][5] == "world facts" and seqs.answers[5] == "D"
    zero = mmlu.tokenize(tokenizer, "test", root, 2048, 0)  # zero-shot: the header and the question
    assert tokenizer.decode(zero.prompts[0]) == ("The following are multiple choice questions (with answers) about "
                                                 "college toys.\n\n" + mmlu.read("test", root).texts[0])
    with pytest.raises(ValueError, match=r"--shots 3 needs 3 solved examples.*'college toys', 2.*pass --shots 2"):
        mmlu.tokenize(tokenizer, "test", root, 2048, 3)


# invariant: a training sequence is prompt ++ " X" with the loss on " X" alone; a prompt with no room for it within
# max_length loses shots from the end until it has, counted
def test_training_sequence_and_shots_dropped_to_fit(tmp_path, letter_model, tiny_mmlu):
    _, tokenizer = letter_model
    root = tiny_mmlu
    letters = dict(zip("ABCD", mmlu.choice_ids(tokenizer)))
    full = mmlu.tokenize(tokenizer, "test", root, 2048, 2)
    for i, (ids, types) in enumerate(zip(full.ids, full.type_ids)):
        assert ids == full.prompts[i] + [letters[full.answers[i]]] and types == [0] * len(full.prompts[i]) + [1]
    assert full.stats["note"] == "2-shot, 0 prompts with fewer shots to fit max_length 2048"
    one_shot = mmlu.tokenize(tokenizer, "test", root, 2048, 1)
    limit = len(one_shot.prompts[5]) + 1  # room for question 5 with one shot and its answer letter, not two shots
    assert len(full.prompts[5]) + 1 > limit
    cut = mmlu.tokenize(tokenizer, "test", root, limit, 2)
    assert cut.prompts[5] == one_shot.prompts[5] and cut.ids[cut.kept.index(5)][-1] == letters["D"]
    assert all(len(ids) <= limit for ids in cut.ids)
    fewer = sum(len(p) < len(f) for p, f in zip(cut.prompts, full.prompts))
    assert fewer >= 1 and cut.stats["note"].startswith(f"2-shot, {fewer} prompts with fewer shots")


# invariant: the score of a letter is log_softmax(logits at the prompt's last token)[id of " l"], the same in any
# batch (right padding needs no mask); the prediction is the likeliest letter
def test_scores_are_the_log_likelihood_of_each_letter(tmp_path, letter_model, monkeypatch, tiny_mmlu):
    model, tokenizer = letter_model
    monkeypatch.setattr(data.prepare, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    split = data.prepare.load_split("mmlu", "test", tokenizer, 2048, tiny_mmlu, shots=1)
    letters = mmlu.choice_ids(tokenizer)
    by_hand = []
    with torch.no_grad():
        for prompt in split["prompt_ids"]:  # one unpadded forward each
            logits = model(prompt[None])[0, -1]  # (V,) after 'Answer:'
            by_hand.append(torch.log_softmax(logits.float(), -1)[letters])
    task = data.prepare.TASKS["mmlu"]
    for batch_size in (1, 4):
        metrics, records = evaluate.score_choices(model, tokenizer, split, task, batch_size)
        assert_close(torch.tensor([r["log_probs"] for r in records]), torch.stack(by_hand), atol=1e-4, rtol=0)
        assert [r["predicted"] for r in records] == ["ABCD"[int(s.argmax())] for s in by_hand]
        assert [r["gold"] for r in records] == split["answers"] and metrics == evaluate.choice_accuracy(records)


def test_accuracy_over_questions_and_macro_over_subjects():
    records = [{"subject": "a", "correct": c} for c in (True, True, True, False)] + [{"subject": "b", "correct": False}]
    metrics = evaluate.choice_accuracy(records)
    # accuracy = 3 / 5; macro = (3/4 + 0/1) / 2
    assert metrics == {"accuracy": pytest.approx(0.6), "macro_accuracy": pytest.approx(0.375)}
    assert evaluate.subject_accuracies(records)["a"] == {"correct": 3, "questions": 4, "accuracy": 0.75}


# -----------------------------------------------------------------------------
# the offline task


def test_arithmetic_mc_is_fixed_disjoint_and_right():
    splits = arithmetic_mc.generate()
    assert {s: len(e.texts) for s, e in splits.items()} == {s: 4 * n for s, n in arithmetic_mc.SIZES.items()}
    blocks = [b for e in splits.values() for b in e.texts]
    assert len(set(blocks)) == len(blocks)  # no question in two splits, nor twice in one
    subjects = list(arithmetic_mc.SUBJECTS)
    assert splits["test"].pairs[:8] == subjects * 2  # subjects in turn: the first N cover them all
    counts = Counter(splits["train"].labels)
    assert set(counts) == set("ABCD") and min(counts.values()) > 200  # the right letter is spread over A..D
    for block, letter in zip(splits["dev"].texts, splits["dev"].labels):
        options = [line[3:] for line in block.split("\n")[-5:-1]]
        assert len(set(options)) == 4 and block.endswith("\nAnswer:")
        if block.startswith("State the final answer"):  # a chain sum: the right choice is its value
            expression = block.split("problem: ")[1].split(" =")[0]
            assert options["ABCD".index(letter)] == str(eval(expression))  # noqa: S307 (digits, + and -)
    arithmetic_mc.generate.cache_clear()
    assert arithmetic_mc.generate()["dev"] == splits["dev"]  # the same data again


# -----------------------------------------------------------------------------
# train.py and evaluate.py on a multiple-choice task


def tiny_questions(split):
    """Questions whose right answer is always the word 'yes' at a varying letter."""
    n = {"train": 16, "dev": 4, "test": 4, "shots": 2}[split]
    blocks, letters = [], []
    for i in range(n):
        right = "ABCD"[(i + len(split)) % 4]
        options = ["no"] * 4
        options["ABCD".index(right)] = "yes"
        blocks.append(question_block(f"Is {split} question {i} good?", options))
        letters.append(right)
    return Examples(blocks, ["yes or no"] * n, letters)


@pytest.fixture
def tiny_mc(tmp_path, monkeypatch):
    source = tmp_path / "tiny-mc.txt"
    source.write_text("tiny-mc v1")
    task = Task("tiny-mc", "multiple-choice", ("accuracy", "macro_accuracy"), None, ("train", "dev", "test"),
                source=lambda split, d=None: source, read=lambda split, d=None: tiny_questions(split),
                tokenize=lambda tok, split, d, n, shots: choice_sequences(tok, tiny_questions(split),
                                                                          tiny_questions("shots"), n, shots),
                prompt_format=mmlu.prompt_format, split_rule="tiny-mc v1")
    monkeypatch.setitem(data.prepare.TASKS, "tiny-mc", task)
    monkeypatch.setattr(data.prepare, "DEFAULT_CACHE_DIR", tmp_path / "data-cache")
    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "approx-cache"))
    return tmp_path


# invariant: train.py fine-tunes on the answer letters and records dev accuracy each epoch; evaluate.py scores
# the adapter with the run's --shots and writes one record per question and the accuracy per subject
def test_train_and_evaluate_a_multiple_choice_task(tiny_mc, tiny_letter_decoder):
    run = tiny_mc / "run"
    state = train.main(["--model", str(tiny_letter_decoder), "--task", "tiny-mc", "--batch-size", "8", "--epochs", "2",
                        "--rank", "2", "--lr", "1e-2", "--shots", "1", "--max-length", "512", "--approx-steps", "20",
                        "--out", str(run)])
    assert state["step"] == 4
    dev = [json.loads(line)["dev"] for line in (run / "metrics.jsonl").read_text().splitlines() if "dev" in line]
    assert len(dev) == 2 and all(set(d) == {"accuracy", "macro_accuracy"} for d in dev)
    metrics = evaluate.main([str(run), "--split", "test"])
    records = [json.loads(line) for line in (run / "predictions-best-test.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in records] == tiny_questions("test").labels
    assert metrics["accuracy"] == sum(r["correct"] for r in records) / 4
    scores = json.loads((run / "eval-best-test.json").read_text())
    assert scores["per_subject"]["yes or no"]["questions"] == 4 and scores["metrics"] == metrics
    cached = json.loads(next(data.prepare.DEFAULT_CACHE_DIR.glob("tiny-mc-test-*.json")).read_text())
    assert cached["prompt_format"] == "1-shot plain text (MMLU's)"  # the run's --shots, not the default 5
