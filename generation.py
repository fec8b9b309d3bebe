"""Scoring a causal LM on a generation task: batched greedy generation, answer extraction, exact match.

Every prompt of the split (data/sft.py: the chat template or the Alpaca prompt, exactly the prefix the
model was trained on) is continued greedily by decoder.generate, a batch at a time, left-padded, with
the KV cache. A row stops at EOS, after max_new_tokens, or once its answer line is complete:

    gsm8k format   a line that starts with '####' followed by a newline ("#### 42\\n")
    math format    a line holding "The answer is" (MetaMathQA's closing line) followed by a newline

The final answer is then extracted by the task's answer_format (data.sft.EXTRACTORS: GSM8K the number
after '####', else the last number; MATH the last \\boxed{}) and compared with the gold answer:

    exact_match = (1/N) sum_i [extract(generation_i) == gold_i]

Each example becomes one record (question, generation, extracted, gold, correct): evaluate.py writes
them as a predictions JSONL beside the run; train.py scores its dev split (or a subset) after each epoch.

    python evaluate.py --base --model smollm2 --task arithmetic --split test --out runs/base-smollm2
"""
import json

import torch
from tqdm import tqdm

from lib.common import write_atomic
from data.sft import ANSWER_IS, exact_match
from models.decoder import generate

# Legend: N examples scored, B batch of prompts

ANSWER_LINE = {"gsm8k": "####", "math": ANSWER_IS}  # answer_format -> what marks the answer line


def answer_line_done(text, answer_format) -> bool:
    """Whether `text` holds a complete answer line: the marker of `answer_format`, then a newline
    (for gsm8k the marker must start its line, as in '...\\n#### 42\\n')."""
    marker = ANSWER_LINE[answer_format]
    lines = text.split("\n")[:-1]  # the lines a newline has closed
    if answer_format == "gsm8k":
        return any(line.lstrip().startswith(marker) for line in lines)
    return any(marker in line for line in lines)


def stop_rule(tokenizer, answer_format):
    """decoder.generate's `stop(new_ids)`: true once the answer line is complete. The text is decoded
    again only when the newest token holds a newline, so the check costs one short decode per token."""

    def stop(ids):
        if "\n" not in tokenizer.decode(ids[-1:]):
            return False
        return answer_line_done(tokenizer.decode(ids), answer_format)

    return stop


@torch.no_grad()
def score(model, tokenizer, split, task, batch_size=16, max_new_tokens=256, limit=None, device="cpu", desc=None):
    """({"exact_match": value}, records) of `model` on the first `limit` examples (None: all) of a
    generation split from data.prepare.load_split; records[i] = {question, generation, extracted,
    gold, correct}. The model must be on `device`; it is left in eval mode."""
    n_all = len(split["prompt_ids"])
    n = n_all if limit is None else min(limit, n_all)
    if n == 0 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"cannot score {n} examples in batches of {batch_size} with max_new_tokens="
                         f"{max_new_tokens}: pass a non-empty split, a batch size and max_new_tokens of at least 1.")
    model.eval()
    stop = stop_rule(tokenizer, task.answer_format)
    records = []
    for i in tqdm(range(0, n, batch_size), desc=desc or f"generating {task.name}", unit="batch", leave=False):
        prompts = [p.tolist() for p in split["prompt_ids"][i:i + batch_size]]  # B lists of ids
        outputs = generate(model, prompts, max_new_tokens, tokenizer.eos_ids, tokenizer.pad_id, stop=stop)
        for j, ids in enumerate(outputs):
            text = tokenizer.decode(ids)  # special tokens (EOS) left out
            gold = split["answers"][i + j]
            records.append({"question": split["questions"][i + j], "generation": text,
                            "extracted": task.extract_answer(text), "gold": gold,
                            "correct": exact_match(text, gold, task.answer_format)})
    return metrics_of(records), records


def metrics_of(records):
    """{"exact_match": ...} of scored records (score's, or several ranks' gathered under torchrun)."""
    # exact_match = (1/N) sum_i [extract(generation_i) == gold_i]
    return {"exact_match": sum(r["correct"] for r in records) / len(records)}


def write_predictions(path, records):
    """One JSON object per line, in the split's order (written atomically: never a partial file)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_atomic(path, text.encode("utf-8"))
    return path
