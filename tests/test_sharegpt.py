"""Checks the conversation kind (data/sharegpt.py): which tokens of a three-turn conversation carry the loss
(every assistant reply and its end token, nothing else) with a ChatML template and with SmolLM2's own,
Vicuna's text without a template, truncation at max_length counted (replies cut, replies cut away, dropped
conversations, leading gpt turns), every malformed file a sentence naming the file, the record and the
field, and train.py on ShareGPT then evaluate.py on MMLU (the paper's protocol) end to end. The model is
conftest.tiny_letter_decoder.

    python -m pytest tests/test_sharegpt.py -q
"""
import json

import pytest
import torch

import data.prepare
import evaluate
import train
from data import sharegpt
from models.decoder import load_causal_lm
from models.gguf_file import open_gguf
from models.tokenizer import ChatTokenizer

THREE_TURNS = {"id": "three", "conversations": [
    {"from": "system", "value": "Be kind."},
    {"from": "human", "value": "Question one"}, {"from": "gpt", "value": "Reply one"},
    {"from": "human", "value": "Question two"}, {"from": "gpt", "value": "Reply two"},
    {"from": "human", "value": "Question three"}, {"from": "gpt", "value": "Reply three"}]}


def write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def runs(tokenizer, ids, mask):
    """The decoded text of each maximal run of tokens with the same mask value: [(text, loss), ...]."""
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or mask[t] != mask[start]:
            out.append((tokenizer.decode(ids[start:t], skip_special_tokens=False), bool(mask[start])))
            start = t
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_letter_decoder):
    return load_causal_lm(str(tiny_letter_decoder))[1]


# invariant: the loss covers each assistant reply and the end token that closes it, and nothing else; the tokens
# are those of the whole rendered conversation (the pieces meet at token borders), less what follows the last reply
def test_loss_is_on_every_assistant_turn_and_nothing_else(tmp_path, tokenizer):
    seqs = sharegpt.tokenize(tokenizer, "train", write_json(tmp_path / "sg.json", [THREE_TURNS]), 512)
    (ids,), (mask,) = seqs.ids, seqs.type_ids
    assert runs(tokenizer, ids, mask) == [
        ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nQuestion one<|im_end|>\n<|im_start|>assistant\n",
         False),
        ("Reply one<|im_end|>", True),
        ("\n<|im_start|>user\nQuestion two<|im_end|>\n<|im_start|>assistant\n", False),
        ("Reply two<|im_end|>", True),
        ("\n<|im_start|>user\nQuestion three<|im_end|>\n<|im_start|>assistant\n", False),
        ("Reply three<|im_end|>", True)]
    messages = [{"role": sharegpt.ROLES[t["from"]], "content": t["value"]} for t in THREE_TURNS["conversations"]]
    whole = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert ids == tokenizer.encode([whole.removesuffix("\n")], add_special_tokens=False)[0]
    assert seqs.stats["note"].startswith("assistant turns: 3 in all, 0 cut")
    split = {"token_type_ids": [torch.tensor(mask)]}  # what the loss is a mean over: the replies' tokens
    assert data.prepare.loss_units(data.prepare.TASKS["sharegpt"], split, [0]) == sum(mask)


def test_smollm2_template_puts_the_loss_on_the_replies(tmp_path, smollm2_gguf):
    reader, meta = open_gguf(smollm2_gguf)
    tok = ChatTokenizer.from_gguf(reader, meta, smollm2_gguf)
    seqs = sharegpt.tokenize(tok, "train", write_json(tmp_path / "sg.json", [THREE_TURNS]), 512)
    loss = [text for text, is_loss in runs(tok, seqs.ids[0], seqs.type_ids[0]) if is_loss]
    assert loss == ["Reply one<|im_end|>", "Reply two<|im_end|>", "Reply three<|im_end|>"]


def test_vicuna_text_without_a_chat_template(tokenizer):
    tokenizer = ChatTokenizer(tokenizer._tok, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, bos_token=None,
                              eos_token="<|im_end|>", chat_template=None, fingerprint="no-template")
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "R1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "R2"}]
    assert sharegpt.pieces(tokenizer, messages) == [
        (f"{sharegpt.VICUNA_SYSTEM} USER: Q1 ASSISTANT:", False), (" R1<|im_end|>", True),
        ("USER: Q2 ASSISTANT:", False), (" R2<|im_end|>", True)]
    assert sharegpt.prompt_format(tokenizer) == "vicuna-v1.1"


# invariant: a sequence is cut at max_length, never silently: cut replies, replies cut away whole, conversations with
# no reply token left and leading gpt turns are all counted; nothing after the last loss token is kept
def test_truncation_is_counted(tmp_path, tokenizer):
    long_reply = " ".join(["word"] * 40)
    records = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Short"},
                                  {"from": "human", "value": "More"}, {"from": "gpt", "value": long_reply},
                                  {"from": "human", "value": "Again"}, {"from": "gpt", "value": "Lost"}]},
               {"conversations": [{"from": "gpt", "value": "a reply to nothing"}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello"}]},
               {"conversations": [{"from": "human", "value": "no reply"}]}]
    path = write_json(tmp_path / "sg.json", records)
    full = sharegpt.tokenize(tokenizer, "train", path, 4096)
    mask = full.type_ids[0]
    starts = [t for t in range(1, len(mask)) if mask[t] and not mask[t - 1]]  # the first token of each reply
    limit = starts[1] + 10  # inside the long reply: it is cut, the last reply is cut away
    seqs = sharegpt.tokenize(tokenizer, "train", path, limit)
    assert seqs.kept == [0, 1] and seqs.ids[0] == full.ids[0][:limit] and seqs.type_ids[0][-1] == 1
    assert seqs.stats == {"num_truncated": 1, "num_dropped": 1, "num_long_prompts": 0,
                          "note": f"assistant turns: 4 in all, 1 cut at max_length {limit}, 1 cut away whole; "
                                  "1 leading gpt turns skipped"}
    assert "a reply to nothing" not in tokenizer.decode(seqs.ids[1])
    tight = sharegpt.tokenize(tokenizer, "train", path, 8)  # no reply starts within 8 tokens
    assert tight.kept == [] and tight.stats["num_dropped"] == 3 and tight.stats["num_long_prompts"] == 2


def test_malformed_files_are_sentences(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"task 'sharegpt', split 'train': no file was given.*ShareGPT JSON"):
        sharegpt.read_conversations(sharegpt.source("train", None))
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    cases = [({"id": 1}, r"record 1: the record has no 'conversations' field \(it has \['id'\]\)"),
             ({"conversations": "Hi"}, r"record 1: the record has a str as its 'conversations' field"),
             ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},
              r"record 1, conversations\[1\], field 'from': found .*'bot'.*expected 'from' one of \['gpt', 'human', "
              r"'system'\]"),
             ({"conversations": [{"from": "human", "value": 7}]}, r"record 1, conversations\[0\], field 'value'")]
    for record, message in cases:
        path = write_json(tmp_path / "bad.json", [good, record])
        with pytest.raises(ValueError, match=message):
            sharegpt.tokenize(tokenizer, "train", path, 64)
    (tmp_path / "broken.json").write_text('[{"conversations": []')
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON"):
        sharegpt.read_conversations(tmp_path / "broken.json")


# invariant: the paper's MMLU protocol end to end: train on ShareGPT (no dev split), score the adapter on MMLU's
# test split with --task mmlu; ShareGPT itself is never scored, which is a sentence
def test_train_on_sharegpt_then_score_on_mmlu(tmp_path, monkeypatch, tiny_letter_decoder, tiny_mmlu):
    monkeypatch.setattr(data.prepare, "DEFAULT_CACHE_DIR", tmp_path / "data-cache")
    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "approx-cache"))
    path = write_json(tmp_path / "sharegpt.json", [THREE_TURNS] * 6)
    run = tmp_path / "run"
    state = train.main(["--model", str(tiny_letter_decoder), "--task", "sharegpt", "--data-dir", str(path),
                        "--batch-size", "4", "--epochs", "1", "--rank", "2", "--lr", "1e-2", "--max-length", "256",
                        "--approx-steps", "20", "--out", str(run)])
    assert state["step"] == 2 and (run / "best" / "adapter.safetensors").is_file()
    metrics = evaluate.main([str(run), "--task", "mmlu", "--split", "test", "--data-dir", str(tiny_mmlu), "--shots",
                             "1"])
    scores = json.loads((run / "eval-best-mmlu-test.json").read_text())
    assert scores["metrics"] == metrics and scores["num_examples"] == 6
    assert set(scores["per_subject"]) == {"college toys", "world facts"}
    with pytest.raises(ValueError, match=r"split 'test' is not available for task 'sharegpt'"):
        evaluate.main([str(run), "--split", "test"])
