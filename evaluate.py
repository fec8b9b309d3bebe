"""Evaluation: the scores of a model on a prepared split, the dev scores train.py records after every epoch,
the evaluation of a run's adapter on the original base model, and the paper-style comparison table (Table 1).

Classification and regression (encoders): one forward pass per batch, then the task's metrics
(data/metrics.py: accuracy, f1, matthews, pearson, spearman; `data.prepare.TASKS` says which, and the
first picks the best epoch). Generation (causal LMs): every prompt of the split (data/sft.py: the chat
template or the Alpaca prompt, exactly the prefix the model was trained on) is continued greedily (or
sampled, --temperature) by models.decoder.generate, a batch at a time, left-padded, with the KV cache. A row stops at EOS, after
max_new_tokens, or once its answer line is complete:

    gsm8k format   a line that starts with '####' followed by a newline ("#### 42\\n")
    math format    a line holding "The answer is" (MetaMathQA's closing line) followed by a newline

The final answer is then extracted by the task's answer_format (data.sft.EXTRACTORS: GSM8K the number
after '####', else the last number; MATH the last \\boxed{}) and compared with the gold answer:

    exact_match = (1/N) sum_i [extract(generation_i) == gold_i]

Multiple choice (MMLU, data/mmlu.py): nothing is generated; one forward pass over each k-shot prompt gives
the log-probability of each answer letter as the next token, the likeliest is the prediction, and

    pred_i = argmax_{l in A..D} log p(" l" | prompt_i),    accuracy = (1/N) sum_i [pred_i == gold_i],
    macro_accuracy = (1/S) sum_s accuracy over the questions of subject s

The task's kind says which scorer runs (data.task.KINDS `scored_by`; SCORERS below), never its name.
Code tasks (data.task kind "code": humaneval, code-functions) are scored by execution instead: each
prompt (a function's signature and docstring) is continued, greedily by default or by sampling
(--samples N --temperature T --top-p P --seed S: N generations per prompt, each with its own seeded
generator, so the same seed gives the same samples at any batch size), stopped at HumanEval's stop
sequences, cut there (data.humaneval.truncate_completion), and run with the example's tests in the
sandbox, --exec-workers at a time (lib/sandbox.py). With c of n passing for a problem,

    pass@k = (1/N) sum_i [1 - C(n_i - c_i, k) / C(n_i, k)]       (Chen et al., 2021, eq. 1; k <= n)

From the command line, evaluate a run directory's best (or last) adapter on the original base model
(a generation task's generations go beside the run as predictions-CHECKPOINT-SPLIT.jsonl), score a base
model without an adapter (--base), or compare runs: one row per initialiser, each metric the best-epoch
dev score x100 as mean ± std over seeds (std with n - 1; '-' for one seed):

    python evaluate.py runs/minilm-rotten-tomatoes-lora-r8-seed0 --split test
    python evaluate.py --compare runs/minilm-rotten-tomatoes-* --markdown
    python evaluate.py runs/smollm2-arithmetic-lora-r8-seed0 --split test
    python evaluate.py --base --model smollm2 --task arithmetic --split test --out runs/base-smollm2-arithmetic
    python evaluate.py --base --model smollm2 --task arithmetic-mc --split test --out runs/base-smollm2-arithmetic-mc
    python evaluate.py runs/sharegpt-run --task mmlu --split test --data-dir path/to/mmlu/data
    python evaluate.py --base --model smollm2 --task humaneval --split test --out runs/base-smollm2-humaneval
    python evaluate.py --base --model smollm2 --task humaneval --split test --samples 10 --temperature 0.8 \
        --top-p 0.95 --limit 20 --out runs/base-smollm2-humaneval-pass10
"""
import argparse
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import inilora
import models
from data.humaneval import join, mean_pass_at_k, score_programs, truncate_completion
from data.humaneval import stop_rule as code_stop_rule
from data.metrics import METRICS
from data.mmlu import LETTERS, SHOTS, choice_ids
from data.prepare import TASKS, examples_of, load_split, pad_batch, subset
from data.sft import ANSWER_IS, exact_match
from lib import distributed
from lib.common import choose_threads, pick_device, run_cli, write_atomic, write_json
from lib.runs import adapter_settings, best_adapter, best_dev, config_file, find_adapter, read_json, started
from models.decoder import generate

# -----------------------------------------------------------------------------
# evaluation: one pass over a prepared split, in order
# Legend: N examples in the split, B batch, T tokens (longest in the batch)


EVAL_BATCH = 128     # examples per forward pass: no gradients are kept, so a larger batch than training's fits
GENERATE_BATCH = 16  # prompts per generation batch (its KV cache grows with batch x tokens)
MAX_NEW_TOKENS = 256  # tokens generated per example at most, where neither the command nor the run says


@torch.inference_mode()
def predict(model, split, task, pad_id, batch_size=EVAL_BATCH, device="cpu"):
    """(N,) predictions of `model` on `split` (from data.prepare.load_split), in the split's order:
    class ids = argmax of the logits, or the score logits[:, 0] for regression (num_labels = 1).
    The model must already be on `device`; it is left in eval mode (no dropout)."""
    n = len(split["labels"])
    if n == 0 or batch_size < 1:
        raise ValueError(f"cannot evaluate {n} examples in batches of {batch_size}: "
                         "pass a non-empty split and a batch size of at least 1.")
    model.eval()
    # batches of examples of similar length (longest first), so little padding; each prediction depends on
    # its own example alone, so the order changes nothing but float rounding. `order` puts them back.
    order = sorted(range(n), key=lambda j: -len(split["input_ids"][j]))
    preds = []
    for i in tqdm(range(0, n, batch_size), desc=f"evaluating {task.name}", unit="batch", leave=False):
        idx = order[i:i + batch_size]
        ids, types, mask = pad_batch([split["input_ids"][j] for j in idx],
                                     [split["token_type_ids"][j] for j in idx], pad_id)  # (B, T) each
        mask = None if mask is None else mask.to(device)  # None: no padding in this batch
        logits = model(ids.to(device), mask, types.to(device)).float()  # (B, num_labels)
        if logits.shape != (len(ids), task.num_labels):
            raise ValueError(
                f"the model returned logits of shape {tuple(logits.shape)} for a batch of {len(ids)}, but "
                f"task {task.name!r} needs ({len(ids)}, {task.num_labels}): load the model with "
                f"num_labels={task.num_labels}."
            )
        # classification: the class with the largest logit; regression: the one output is the score
        preds.append(logits[:, 0] if task.num_labels == 1 else logits.argmax(dim=-1))  # (B,)
    out = torch.empty(n, dtype=preds[0].dtype)
    out[order] = torch.cat(preds).cpu()  # back to the split's order
    return out.numpy()  # (N,)


def evaluate(model, split, task, pad_id, batch_size=EVAL_BATCH, device="cpu"):
    """{metric: value} for every metric of `task` (a data.prepare.TaskSpec), values in [0, 1] or [-1, 1]."""
    preds = predict(model, split, task, pad_id, batch_size, device)  # (N,)
    labels = split["labels"].cpu().numpy()  # (N,)
    return {name: METRICS[name](preds, labels) for name in task.metrics}


# -----------------------------------------------------------------------------
# generation: batched greedy decoding, answer extraction, exact match
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


@dataclass(frozen=True)
class Sampling:
    """How score_generation draws: one greedy generation per prompt (the default), or `samples` sampled ones."""
    samples: int = 1  # generations per prompt (pass@k needs at least k)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass (1: the whole distribution)
    seed: int = 0

    def check(self, task):
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"--samples {self.samples!r} must be a whole number of at least 1.")
        if self.samples > 1 and not task.executes:
            raise ValueError(f"--samples {self.samples}: several generations per prompt are scored by pass@k, which "
                             f"needs a code task ({sorted(n for n, t in TASKS.items() if t.executes)}), and "
                             f"{task.name!r} is scored by exact match; leave --samples out.")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"--samples {self.samples} with --temperature 0 would draw {self.samples} identical greedy "
                             "generations: pass a temperature, e.g. --temperature 0.8 --top-p 0.95.")

    def label(self) -> str:
        """'' for greedy decoding, else '-samplesN-tT-pP-seedS': in the file names, so a sampled evaluation
        never overwrites the greedy one."""
        if self == Sampling():
            return ""
        return f"-samples{self.samples}-t{self.temperature:g}-p{self.top_p:g}-seed{self.seed}"

    def seeds(self, rows, questions):
        """Each generation's own seed, from --seed, the question and its sample number j: the same at any batch
        size, --limit or torchrun share."""
        return [int.from_bytes(hashlib.sha256(f"{self.seed}|{j}|{questions[i]}".encode()).digest()[:8], "little")
                for i, j in rows]


PASS_KS = (1, 10, 100)  # the pass@k reported, for each k <= samples


@torch.no_grad()
def score_generation(model, tokenizer, split, task, batch_size=16, max_new_tokens=256, limit=None, device="cpu", desc=None,
                     sampling=Sampling(), exec_workers=None):
    """(metrics, records) of `model` on the first `limit` examples (None: all) of a generation split from
    data.prepare.load_split. Exact match: records[i] = {question, generation, extracted, gold, correct}.
    Code tasks (task.executes): records[i] = {question, completions, statuses, n, passed}, metrics pass@k,
    the programs run `exec_workers` at a time (None: the CPU count). The model must be on `device`; it is
    left in eval mode."""
    n_all = len(split["prompt_ids"])
    n = n_all if limit is None else min(limit, n_all)
    if n == 0 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"cannot score {n} examples in batches of {batch_size} with max_new_tokens="
                         f"{max_new_tokens}: pass a non-empty split, a batch size and max_new_tokens of at least 1.")
    sampling.check(task)
    model.eval()
    stop = code_stop_rule(tokenizer.decode) if task.executes else stop_rule(tokenizer, task.answer_format)
    rows = [(i, j) for i in range(n) for j in range(sampling.samples)]  # generation j of example i, never past n
    texts = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc or f"generating {task.name}", unit="batch",
                      leave=False):
        batch = rows[start:start + batch_size]
        prompts = [split["prompt_ids"][i].tolist() for i, _ in batch]  # B lists of ids
        seeds = sampling.seeds(batch, split["questions"]) if sampling.temperature > 0 else None
        outputs = generate(model, prompts, max_new_tokens, tokenizer.eos_ids, tokenizer.pad_id, stop=stop,
                           temperature=sampling.temperature, top_p=sampling.top_p, seeds=seeds)
        texts += [tokenizer.decode(ids) for ids in outputs]  # special tokens (EOS) left out
    if task.executes:
        records = run_completions(split, texts, n, sampling.samples, exec_workers)
    else:
        records = [{"question": split["questions"][i], "generation": text, "extracted": task.extract_answer(text),
                    "gold": split["answers"][i], "correct": exact_match(text, split["answers"][i], task.answer_format)}
                   for i, text in enumerate(texts)]
    return metrics_of(task, records), records


def run_completions(split, texts, n, samples, workers):
    """Records of a code task: each generation cut at the stop sequences and run with its example's checks."""
    completions = [truncate_completion(t) for t in texts]  # row i * samples + j: generation j of example i
    programs = {str(i): [join(split["questions"][i], c, split["answers"][i])
                         for c in completions[i * samples:(i + 1) * samples]] for i in range(n)}
    result = score_programs(programs, (), workers, progress="running completions")
    return [{"question": split["questions"][i], "completions": completions[i * samples:(i + 1) * samples],
             "statuses": [o.status for o in r.outcomes], "n": r.n, "passed": r.c} for i, r in enumerate(result.results)]


def metrics_of(task, records):
    """The metrics of scored records (score_generation's, or several ranks' gathered under torchrun)."""
    if task.executes:
        # pass@k = (1/N) sum_i [1 - C(n_i - c_i, k) / C(n_i, k)], for each k up to the fewest samples
        fewest = min(r["n"] for r in records)
        ks = [k for k in PASS_KS if k <= fewest]
        return {f"pass@{k}": v for k, v in mean_pass_at_k([(r["n"], r["passed"]) for r in records], ks).items()}
    # exact_match = (1/N) sum_i [extract(generation_i) == gold_i]
    return {"exact_match": sum(r["correct"] for r in records) / len(records)}


# -----------------------------------------------------------------------------
# multiple choice: the log-likelihood of each answer letter after the prompt (data/mmlu.py)
# Legend: N examples scored, B batch of prompts, T tokens (the longest prompt in it), C hidden, V vocabulary


@torch.inference_mode()
def score_choices(model, tokenizer, split, task, batch_size=16, max_new_tokens=None, limit=None, device="cpu",
                  desc=None, sampling=None, exec_workers=None):
    """(metrics, records) of `model` on the first `limit` examples (None: all) of a multiple-choice split from
    data.prepare.load_split; records[i] = {subject, question, log_probs (of A, B, C, D), predicted, gold,
    correct}. Nothing is generated (max_new_tokens, sampling and exec_workers are not used). The model must be on `device`; it is left
    in eval mode."""
    n_all = len(split["prompt_ids"])
    n = n_all if limit is None else min(limit, n_all)
    if n == 0 or batch_size < 1:
        raise ValueError(f"cannot score {n} examples in batches of {batch_size}: pass a non-empty split and a batch "
                         "size of at least 1.")
    model.eval()
    letters = torch.tensor(choice_ids(tokenizer), device=device)  # (4,) ids of " A", " B", " C", " D"
    # batches of prompts of similar length (longest first), so little padding; log_probs[j] is prompt j's
    order = sorted(range(n), key=lambda j: -len(split["prompt_ids"][j]))
    log_probs = torch.empty(n, len(LETTERS))  # (N, 4)
    for i in tqdm(range(0, n, batch_size), desc=desc or f"scoring {task.name}", unit="batch", leave=False):
        idx = order[i:i + batch_size]
        prompts = [split["prompt_ids"][j] for j in idx]
        lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
        ids = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=tokenizer.pad_id)  # (B, T)
        # right padding needs no mask: a prompt's last token attends to its own tokens only (causal attention)
        h = model.hidden_states(ids.to(device), None)  # (B, T, C)
        last = h[torch.arange(len(idx), device=device), lengths - 1]  # (B, C): the position after 'Answer:'
        # log p(" l" | prompt) = log_softmax(lm_head(h_last))[id of " l"], for l in A, B, C, D
        log_probs[idx] = torch.log_softmax(model.lm_head(last).float(), dim=-1)[:, letters].cpu()  # (B, V) -> (B, 4)
    records = []
    for j in range(n):
        predicted = LETTERS[int(log_probs[j].argmax())]  # pred = argmax_l log p(" l" | prompt)
        records.append({"subject": split["subjects"][j], "question": split["questions"][j],
                        "log_probs": [round(float(x), 4) for x in log_probs[j]], "predicted": predicted,
                        "gold": split["answers"][j], "correct": predicted == split["answers"][j]})
    return choice_accuracy(records), records


def subject_accuracies(records) -> dict:
    """subject -> {"correct", "questions", "accuracy"}, subjects in the order they first appear."""
    by_subject = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r["correct"])
    return {s: {"correct": sum(c), "questions": len(c), "accuracy": sum(c) / len(c)} for s, c in by_subject.items()}


def choice_accuracy(records):
    """{"accuracy", "macro_accuracy"} of scored multiple-choice records (score_choices', or gathered ranks')."""
    per_subject = subject_accuracies(records)
    # accuracy = (1/N) sum_i [pred_i == gold_i];  macro_accuracy = (1/S) sum_s accuracy of subject s
    return {"accuracy": sum(r["correct"] for r in records) / len(records),
            "macro_accuracy": sum(s["accuracy"] for s in per_subject.values()) / len(per_subject)}


# Task.scored_by -> (the scorer of a causal-LM split, the metrics of its records); "forward" is predict/evaluate
# a kind's scored_by -> (scorer, metrics(task, records)): generation is scored by exact match or, for code, by
# running the tests (metrics_of); multiple choice by the answer letters' log-likelihood
SCORERS = {"generation": (score_generation, metrics_of),
           "log-likelihood": (score_choices, lambda task, records: choice_accuracy(records))}


def write_predictions(path, records):
    """One JSON object per line, in the split's order (written atomically: never a partial file)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_atomic(path, text.encode("utf-8"))
    return path


# -----------------------------------------------------------------------------
# the dev scores after each epoch (train.py), sharded under torchrun


def dev_scores(cfg, task, run, device):
    """(metrics, printed description of what was scored) on the dev split; under torchrun each rank scores
    its share and the predictions are gathered, so every rank gets the metrics of the whole split."""
    dev, world = run.splits["dev"], run.world
    if not task.generates:
        mine = distributed.share(list(range(len(dev["labels"]))), world)
        preds = (predict(run.model, subset(dev, mine), task, run.pad_id, cfg.eval_batch_size or EVAL_BATCH, device)
                 if mine else np.empty(0))
        preds = np.concatenate(distributed.gather(preds, world))  # (N,), in the split's order
        return {name: METRICS[name](preds, dev["labels"].numpy()) for name in task.metrics}, "dev"
    n = len(dev["prompt_ids"])
    limit = min(cfg.eval_limit or n, n)
    mine = distributed.share(list(range(limit)), world)
    batch = cfg.eval_batch_size or cfg.batch_size
    score, metrics_of = SCORERS[task.scored_by]  # generation, or the log-likelihood of the answer letters
    mine = score(run.model, run.tokenizer, examples_of(dev, mine), task, batch, cfg.max_new_tokens, None, device,
                 desc="scoring dev")[1] if mine else []
    records = [r for part in distributed.gather(mine, world) for r in part]  # every rank's, in order
    return metrics_of(task, records), "dev" if limit == n else f"dev subset {limit} of {n}"


# -----------------------------------------------------------------------------
# the command line: evaluate one run's adapter on the original base model


def check_split(task, split):
    if split not in task.splits:
        hint = ("GLUE test files carry no labels and the paper reports dev: use --split dev"
                if split == "test" else f"use one of {list(task.splits)}")
        raise ValueError(f"split {split!r} is not available for task {task.name!r} (it has "
                         f"{list(task.splits)}); {hint}.")


def score_split(model, tokenizer, task, split, max_length, data_dir, opts, device, predictions):
    """(metrics, number of examples, more fields for the scores' file) of `model` on one split; a causal-LM
    task's records go to `predictions`, and a multiple-choice task's accuracy per subject to the fields."""
    if task.scored_by is None:
        raise ValueError(f"task {task.name!r} is trained on, never scored itself; score its adapter on another task "
                         f"with --task, one of {causal_tasks()} (the paper: sharegpt-trained, scored on mmlu).")
    shots = SHOTS if opts.get("shots") is None else opts["shots"]
    data = load_split(task.name, split, tokenizer, max_length, data_dir, shots=shots)
    if not task.generates:
        return evaluate(model.to(device), data, task, tokenizer.pad_id, opts.get("batch_size") or EVAL_BATCH, device), \
            len(data["labels"]), {}
    n_all, limit = len(data["prompt_ids"]), opts.get("limit")
    if limit is not None and limit < n_all:
        print(f"--limit {limit}: scoring the first {limit} of the {n_all} examples of {task.name}/{split}")
    score, _ = SCORERS[task.scored_by]  # generation (exact match or execution), or the answer letters' likelihood
    metrics, records = score(model.to(device), tokenizer, data, task, opts.get("batch_size") or GENERATE_BATCH,
                             opts.get("max_new_tokens") or MAX_NEW_TOKENS, limit, device,
                             sampling=opts.get("sampling", Sampling()), exec_workers=opts.get("exec_workers"))
    print(f"wrote {write_predictions(predictions, records)}")
    if "subject" not in records[0]:
        return metrics, len(records), {}
    per_subject = subject_accuracies(records)
    for subject, s in per_subject.items():
        print(f"  {subject}: {s['correct']}/{s['questions']} = {s['accuracy']:.4f}")
    return metrics, len(records), {"per_subject": per_subject}


def write_scores(out, task, split, metrics, **fields):
    on = f" ({fields['num_examples']} examples)" if "num_examples" in fields else ""
    print(f"{task.name}/{split}{on}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    write_json(out, {**fields, "task": task.name, "split": split, "metrics": metrics})
    print(f"wrote {out}")
    return metrics


def causal_tasks():
    """The causal-LM tasks evaluate.py can score: generation (exact match) and multiple choice."""
    return sorted(name for name, t in TASKS.items() if t.generates and t.scored_by is not None)


def evaluate_adapter(path, split="dev", checkpoint=None, model_name=None, data_dir=None, batch_size=None, device=None,
                     task_name=None, **opts):
    """Loads the base model, puts the adapter on it, evaluates it on `split` of its task, or of `task_name`
    (a causal LM's adapter on another causal-LM task: MetaMathQA-trained, GSM8K-tested, or ShareGPT-trained,
    MMLU-tested, as in the paper); writes and returns the metrics. opts (causal-LM tasks): max_new_tokens,
    limit (the first N examples), shots (multiple choice; None: the run's --shots, else 5), sampling (a
    Sampling), exec_workers (code tasks: programs run at once)."""
    adapter, run = find_adapter(path, checkpoint)
    settings = adapter_settings(adapter, run)
    if settings["task"] not in TASKS:
        raise ValueError(f"{str(adapter)!r} was trained on task {settings['task']!r}, which is not one of "
                         f"{sorted(TASKS)}.")
    task = TASKS[settings["task"]]
    if task_name not in (None, task.name):
        if not task.generates or task_name not in causal_tasks():
            raise ValueError(f"--task {task_name!r}: only an adapter of a causal-LM task can be scored on another "
                             f"task, one of {causal_tasks()}; this one was trained on {task.name!r}. Leave --task out.")
        task = TASKS[task_name]
    check_split(task, split)
    # the run's data directory holds its own task's files: another task reads --data-dir (None: its default)
    data_dir = data_dir or (settings["data_dir"] if task.name == settings["task"] else None)
    task.source(split, data_dir)  # a missing data file is said now, not after the model has loaded
    opts.get("sampling", Sampling()).check(task)
    device, why = pick_device(device)
    print(f"evaluating {adapter} on {task.name}/{split}: base model {model_name or settings['model']}, "
          f"max_length {settings['max_length']}, batch_size {batch_size or 'default'}, device {device} ({why})")
    model, tokenizer, model_id, _, _ = models.load(model_name or settings["model"], task.family, task.num_labels)
    cfg, _ = inilora.load_adapter(model, adapter, model_id)  # ValueError if the adapter is for another base model
    head = "" if task.generates else " and the task head"
    what = "every weight" if cfg.full_finetuning else f"{cfg.init} adapters of rank {cfg.rank} on {','.join(cfg.targets)}{head}"
    print(f"loaded {what} from {adapter}" + (": the head evaluated is the adapter's, replacing the one reported above"
                                             if head else ""))
    split_name = split if task.name == settings["task"] else f"{task.name}-{split}"  # another task: named in the files
    split_name += opts.get("sampling", Sampling()).label()
    where, name = (run, f"{checkpoint or 'best'}-{split_name}") if run else (adapter.parent, f"{adapter.stem}-{split_name}")
    shots = settings.get("shots") if opts.get("shots") is None else opts["shots"]  # None: the default, 5
    if opts.get("max_new_tokens") is None and task.name == settings["task"]:  # scored on test as on dev
        opts = dict(opts, max_new_tokens=settings.get("max_new_tokens"))  # None (older runs): MAX_NEW_TOKENS
    opts = dict(opts, batch_size=batch_size, shots=shots)
    metrics, n, more = score_split(model, tokenizer, task, split, settings["max_length"], data_dir, opts, device,
                                   where / f"predictions-{name}.jsonl")
    return write_scores(where / f"eval-{name}.json", task, split, metrics, adapter=str(adapter), model_id=model_id,
                        num_examples=n, sampling=asdict(opts.get("sampling", Sampling())), **more)


def evaluate_base(model_name, task_name, split, out, data_dir=None, max_length=512, batch_size=None, device=None,
                  **opts):
    """Scores the base model alone (no adapter) on a causal-LM task (generation, code or multiple choice):
    out/predictions-base-SPLIT.jsonl and out/eval-base-SPLIT.json (SPLIT followed by Sampling.label() when sampled)."""
    if task_name not in causal_tasks():
        raise ValueError(f"--base scores a causal LM on a generation, code or multiple-choice task, and --task "
                         f"{task_name!r} is not one of {causal_tasks()}; pass e.g. --task arithmetic (an encoder's "
                         "head is untrained).")
    if out is None:
        raise ValueError("--base needs --out DIR, the directory for its predictions and score "
                         "(e.g. --out runs/base-smollm2-arithmetic).")
    task = TASKS[task_name]
    check_split(task, split)
    task.source(split, data_dir)  # a missing data file is said now, not after the model has loaded
    opts.get("sampling", Sampling()).check(task)
    device, why = pick_device(device)
    print(f"evaluating the base model {model_name} (no adapter) on {task.name}/{split}, device {device} ({why})")
    model, tokenizer, model_id, _, _ = models.load(model_name, task.family)
    out, name = Path(out), split + opts.get("sampling", Sampling()).label()
    metrics, n, more = score_split(model, tokenizer, task, split, max_length, data_dir, dict(opts, batch_size=batch_size),
                                   device, out / f"predictions-base-{name}.jsonl")
    return write_scores(out / f"eval-base-{name}.json", task, split, metrics, adapter=None, model_id=model_id,
                        num_examples=n, sampling=asdict(opts.get("sampling", Sampling())), **more)


# -----------------------------------------------------------------------------
# the comparison table (the paper's Table 1): one row per initialiser, mean ± std over seeds

INIT_ORDER = ("lora", "gaussian", "inilora", "alpha", "beta-kaiming-normal", "beta-kaiming-uniform",
              "pissa", "milora", "full")  # then any other name, then "unknown" (no init recorded)
# settings the runs of one row may differ in; any other difference is reported as a note
PER_RUN_KEYS = {"train.seed", "lora.seed", "train.data_dir", "train.glue_dir", "train.log_every", "train.save_every",
                "train.threads"}


def row_of(label, runs, task):
    """One row of the table: every metric x100, mean ± std over the runs (one per distinct seed)."""
    row = {"init": label, "seeds": len(runs), "params": sorted({p for *_, p in runs if p is not None})}
    for metric in task.metrics:
        row[metric] = mean_std([100 * dev[metric] for _, _, dev, _ in runs])  # scores x100, as the paper
    return row


def compare(run_dirs):
    """(task, rows, skipped, notes) of the comparison of the given run directories."""
    configs = {}
    for run in map(Path, run_dirs):
        if not config_file(run).is_file():
            raise ValueError(f"{str(run)!r} is not a run directory (it has no config.json); "
                             "--compare takes the --out directories written by train.py.")
        configs[run] = read_json(config_file(run), "run configuration")
    tasks = {}
    for run, config in configs.items():
        tasks.setdefault(config.get("train", {}).get("task"), []).append(str(run))
    if len(tasks) != 1:
        listing = "; ".join(f"{task}: {', '.join(runs)}" for task, runs in tasks.items())
        raise ValueError(f"--compare needs runs of one task, got {len(tasks)} tasks ({listing}). "
                         "Compare each task's runs separately.")
    name = next(iter(tasks))
    if name not in TASKS:
        raise ValueError(f"the runs are of task {name!r}, which is not one of {sorted(TASKS)}.")
    task, groups, skipped, notes = TASKS[name], {}, [], []
    for run, config in configs.items():
        dev = best_dev(run, task.metrics[0])
        if not started(run):
            skipped.append((str(run), "never started: config.json but no checkpoint or metrics (a failed start of "
                                      "an older train.py); delete it"))
            continue
        if dev is None:
            skipped.append((str(run), "no dev record yet: training has not finished its first epoch"))
            continue
        sidecar = best_adapter(run).with_suffix(".json")
        params = read_json(sidecar, "adapter sidecar").get("trainable_params") if sidecar.is_file() else None
        groups.setdefault(config.get("lora", {}).get("init", "unknown"), []).append((run, config, dev, params))
    order = {init: i for i, init in enumerate(INIT_ORDER)}
    rows = []
    for init in sorted(groups, key=lambda i: (i == "unknown", order.get(i, len(order)), i)):
        # one row per setting that changes a result (every key but PER_RUN_KEYS), one run per distinct seed
        settings = [{f"{k}.{f}": json.dumps(v) for k in ("train", "lora") for f, v in c.get(k, {}).items()
                     if f"{k}.{f}" not in PER_RUN_KEYS} for _, c, _, _ in groups[init]]
        differ = sorted(k for k in set().union(*settings) if len({s.get(k) for s in settings}) > 1)
        if differ:
            notes.append(f"the {init} runs differ in {', '.join(differ)}, not only in the seed: one row per setting, "
                         "not one mean over them.")
        by_setting = {}
        for (run, config, dev, params), setting in zip(groups[init], settings):
            by_setting.setdefault(tuple(setting.get(k) for k in differ), []).append((run, config, dev, params))
        for values, runs in by_setting.items():
            label = init + "".join(f", {k.split('.', 1)[1]} {json.loads(v) if v else '-'}" for k, v in zip(differ, values))
            kept, seen = [], {}
            for run, config, dev, params in runs:
                seed = config.get("train", {}).get("seed")
                if seed in seen:
                    skipped.append((str(run), f"seed {seed} again (as {seen[seed]}), with the same settings: counted "
                                              "once, so the spread is over distinct seeds"))
                    continue
                seen[seed] = str(run)
                kept.append((run, config, dev, params))
            rows.append({**row_of(label, kept, task), "method": init, "runs": [str(r) for r, *_ in kept],
                         "dev_by_seed": {c.get("train", {}).get("seed"): d for _, c, d, _ in kept},
                         "setting": {k.split(".", 1)[1]: json.loads(v) if v else None for k, v in zip(differ, values)}})
    return task, rows, skipped, notes


# -----------------------------------------------------------------------------
# every method at its own best learning rate: the rate chosen on dev, the score reported on test


def test_scores(row, metric, scored="test"):
    """The test `metric` x100 of each of the row's runs that evaluate.py has scored on test: eval-best-test.json,
    or eval-best-TASK-test.json for another task (scored="TASK-test")."""
    paths = [Path(run) / f"eval-best-{scored}.json" for run in row["runs"]]
    return [100 * read_json(path, "test score")["metrics"][metric] for path in paths if path.is_file()]


def choice_score(row, metric, seeds=None):
    """The mean dev `metric` x100 a rate is chosen on: over the row's runs of `seeds` (None: all of them)."""
    if seeds is None:
        return row[metric][0]
    devs = [100 * dev[metric] for seed, dev in row["dev_by_seed"].items() if seed in seeds]
    return mean_std(devs)[0] if devs else -math.inf


def mean_std(x):
    # mean = sum_i x_i / n;  std = sqrt(sum_i (x_i - mean)^2 / (n - 1)), undefined for n < 2
    if not x:
        return None, None
    mean = sum(x) / len(x)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1)) if len(x) > 1 else None


def best_rates(task, rows, one_rate=None, test_task=None, choose_seeds=None):
    """(best, one, one_rate, notes). best: per method, the row (learning rate) with the highest mean dev score over
    its seeds, ties to the lower rate, with its test scores: the rate is chosen on dev, so the test column does not
    flatter anyone. one: every method's row at the one rate `one_rate` (None: the rate most methods were run at,
    ties to the lower), the paper's single-rate comparison, for contrast. test_task: the test column holds the runs'
    scores on another task's test split (MetaMathQA-trained runs on GSM8K), its first metric. choose_seeds: the rate
    is chosen on these seeds' runs only (a grid's), so seeds added at the chosen rate afterwards cannot move it."""
    metric, notes, by_method = task.metrics[0], [], {}
    other = test_task not in (None, task.name)
    if other and test_task not in TASKS:
        raise ValueError(f"--task {test_task!r} is not one of {sorted(TASKS)}; pass the task the runs were scored on "
                         "with evaluate.py RUN --task T --split test, or leave --task out (their own task).")
    test_metric, scored = (TASKS[test_task].metrics[0], f"{test_task}-test") if other else (metric, "test")
    command = f"python evaluate.py RUN --split test{f' --task {test_task}' if other else ''}"
    for row in rows:
        if set(row["setting"]) - {"lr"}:
            raise ValueError(f"the {row['method']} runs differ in {sorted(set(row['setting']) - {'lr'})}, not only in "
                             "the learning rate: pass --best-lr the runs of one grid of learning rates.")
        by_method.setdefault(row["method"], []).append(row)
    for row in rows:
        row["lr"] = row["setting"]["lr"] if "lr" in row["setting"] else \
            read_json(config_file(Path(row["runs"][0])), "run configuration")["train"]["lr"]  # one rate for all
        scores = test_scores(row, test_metric, scored)
        row["test"], row["tested"] = mean_std(scores), len(scores)
    best = []
    for method, candidates in by_method.items():
        chosen = max(candidates, key=lambda r: (choice_score(r, metric, choose_seeds), -r["lr"]))
        best.append({**chosen, "tried": sorted(r["lr"] for r in candidates)})
        if chosen["tested"] < chosen["seeds"]:
            notes.append(f"{method} at lr {chosen['lr']:g}: {chosen['tested']} of its {chosen['seeds']} runs scored on "
                         f"test; run `{command}` on the others: {', '.join(chosen['runs'])}")
    if one_rate is None:
        counts = {}
        for row in rows:
            counts[row["lr"]] = counts.get(row["lr"], 0) + 1
        one_rate = min(counts, key=lambda lr: (-counts[lr], lr))
    one = [row for row in rows if math.isclose(row["lr"], one_rate)]
    return best, one, one_rate, notes


def format_rates(task, best, one, one_rate, markdown=False, test_task=None, rows=None):
    """The best-rate table and the one-rate table, as text or Markdown (test_task: the test column's task); with
    `rows` (compare's, each with its "lr"), a third table: every method's dev score at every rate it was run at."""
    metric = task.metrics[0]
    tested = f"test {metric}" if test_task in (None, task.name) else f"{test_task} test {TASKS[test_task].metrics[0]}"

    def cell(pair, n=None):
        mean, std = pair
        return "-" if mean is None else f"{mean:.2f} ± {'-' if std is None else f'{std:.2f}'}" + \
            ("" if n is None else f" ({n})")
    head = ["method", "chosen lr", "#seeds", f"dev {metric}", f"{tested} (runs)", "rates tried"]
    body = [[r["method"], f"{r['lr']:g}", str(r["seeds"]), cell(r[metric]), cell(r["test"], r["tested"]),
             f"{len(r['tried'])}: {r['tried'][0]:g}-{r['tried'][-1]:g}"] for r in best]
    one_body = [[r["method"], f"{r['lr']:g}", str(r["seeds"]), cell(r[metric]), cell(r["test"], r["tested"])]
                for r in one]
    tables = [
        aligned(f"{task.name}: every method at its own best learning rate (chosen on mean dev {metric}, x100; "
                "test at that rate, mean ± std over seeds)", head, body, markdown),
        aligned(f"{task.name}: every method at one learning rate, {one_rate:g} (the paper's protocol)", head[:5],
                one_body, markdown)]
    if rows:  # the curve each choice was made on: dev at every rate, * at the chosen one
        rates = sorted({r["lr"] for r in rows})
        chosen = {r["method"]: r["lr"] for r in best}
        cells = {(r["method"], r["lr"]): cell(r[metric]) + (" *" if chosen.get(r["method"]) == r["lr"] else "")
                 for r in rows}
        grid = [[m, *(cells.get((m, lr), "") for lr in rates)] for m in dict.fromkeys(r["method"] for r in best)]
        tables.append(aligned(f"{task.name}: dev {metric} x100 at every learning rate (mean ± std over seeds; "
                              "* the chosen rate)", ["method", *(f"lr {lr:g}" for lr in rates)], grid, markdown))
    return "\n\n".join(tables)


def aligned(title, header, body, markdown):
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join([title, "", *lines, *("| " + " | ".join(row) + " |" for row in body)])
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]

    def line(cells):  # the first column left-aligned, the numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([title, line(header), "  ".join("-" * w for w in widths), *map(line, body)])


def format_table(task, rows, markdown=False):
    """The rows as an aligned text table, or a Markdown table (for the README)."""
    header = ["init", "#seeds", "trainable params", *task.metrics]
    body = [[r["init"], str(r["seeds"]), "-" if not r["params"] else "–".join(f"{p:,}" for p in sorted({r["params"][0], r["params"][-1]})),
             *(f"{mean:.2f} ± {'-'.rjust(4) if std is None else f'{std:.2f}'}" for mean, std in (r[m] for m in task.metrics))]
            for r in rows]
    title = (f"{task.name}, dev: best epoch by {task.metrics[0]}, x100, mean ± std over seeds "
             "(std with n - 1; '-' for one seed)")
    return aligned(title, header, body, markdown)


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a trained adapter on the original base model, "
                                            "or compare runs as in the paper's Table 1.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", nargs="?", help="run directory written by train.py, or an adapter .safetensors file")
    p.add_argument("--split", default="dev", choices=("dev", "test", "test-in-template"),
                   help="split to evaluate on (test: rotten-tomatoes and the causal-LM tasks, humaneval's only; test-in-template: "
                        "gsm-symbolic's held-out problems of training templates)")
    p.add_argument("--checkpoint", default=None, choices=("best", "last"),
                   help="for a run directory: the best epoch's adapter or the last checkpoint; None: best")
    p.add_argument("--model", default=None, help="base model to load instead of the one the adapter records; None: that one")
    p.add_argument("--data-dir", "--glue-dir", dest="data_dir", default=None,
                   help="the task's data: the directory with the GLUE TSV files, the paper's math files, MMLU's "
                   "dev/, val/, test/ or a HumanEval copy; None: the run's (humaneval: the packaged file; --glue-dir "
                   "is its old name)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per forward pass (causal-LM tasks: prompts per batch); None: 128, causal-LM tasks 16")
    p.add_argument("--device", default=None, help="cuda, mps or cpu; None: the first available")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; None: one per core that other programs leave free at start")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation tasks: tokens generated per example at most; None: a run's own --max-new-tokens "
                   f"(what its dev scores used) on its own task, else {MAX_NEW_TOKENS}")
    p.add_argument("--limit", type=int, default=None, help="causal-LM tasks (generation, multiple choice): score the first N examples only; None: all")
    p.add_argument("--shots", type=int, default=None, help="multiple-choice tasks (mmlu, arithmetic-mc): solved "
                   f"examples before each question; None: the run's --shots, else {SHOTS}")
    p.add_argument("--base", action="store_true", help="score the base --model on --task without an adapter (causal LMs)")
    p.add_argument("--task", default=None, help="with --base: the causal-LM task to score; with a PATH: another "
                   "causal-LM task than the adapter's (gsm8k for a metamathqa run, mmlu for a sharegpt one); with --compare "
                   "--best-lr: the task whose test scores (evaluate.py RUN --task T --split test) fill the test column; "
                   "None: its own")
    p.add_argument("--out", default=None, help="with --base: directory for the predictions and the score")
    p.add_argument("--max-length", type=int, default=512, help="with --base: the data cache's max_length (prompts are whole)")
    p.add_argument("--samples", type=int, default=1,
                   help="code tasks: generations per prompt, for pass@k up to k = samples (e.g. 10 for pass@10)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="generation tasks: 0 decodes greedily; above 0 samples from softmax(logits / T)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="with --temperature: sample from the most probable tokens holding this much mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="with --temperature: the seed of every generation's generator")
    p.add_argument("--exec-workers", type=int, default=None,
                   help="code tasks: programs run at once in the sandbox; None: the number of CPU cores")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="print the comparison table of these run directories")
    p.add_argument("--markdown", action="store_true", help="with --compare: print the table as Markdown")
    p.add_argument("--best-lr", action="store_true",
                   help="with --compare over a grid of learning rates: each method at the rate with its best mean dev "
                   "score, and its test score there (evaluate.py RUN --split test first), beside a one-rate table")
    p.add_argument("--choose-on-seeds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="with --best-lr: choose each rate on these seeds' runs only, e.g. 0,1 (a grid's seeds; the "
                   "seeds run later at the chosen rate then cannot move the choice); None: every run")
    p.add_argument("--one-rate", type=float, default=None,
                   help="with --best-lr: the rate of the one-rate table; None: the rate most methods were run at")
    args = p.parse_args(argv)
    if sum((args.path is not None, args.compare is not None, args.base)) != 1:
        p.error("pass exactly one of: a PATH to evaluate, --base (with --model and --task), or --compare RUN_DIR ...")
    for name in ("batch_size", "max_new_tokens", "limit", "samples", "exec_workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1.")
    if args.shots is not None and args.shots < 0:
        raise ValueError(f"--shots {args.shots} is negative; pass 0 (zero-shot) or more (the standard protocol: {SHOTS}).")
    if not (args.temperature >= 0 and 0 < args.top_p <= 1):
        raise ValueError(f"--temperature {args.temperature} --top-p {args.top_p}: expected a temperature of at least 0 "
                         "(0: greedy) and 0 < top-p <= 1, e.g. --temperature 0.8 --top-p 0.95.")
    sampling = Sampling(args.samples, args.temperature, args.top_p, args.seed)
    opts = dict(batch_size=args.batch_size, device=args.device, max_new_tokens=args.max_new_tokens, limit=args.limit,
                shots=args.shots, sampling=sampling, exec_workers=args.exec_workers)
    if args.compare is None:
        threads, why = choose_threads(args.threads)
        print(f"CPU threads: {threads} ({why})")
    if args.base:
        return evaluate_base(args.model or "smollm2", args.task, args.split, args.out, args.data_dir, args.max_length,
                             **opts)
    if args.compare is None:
        return evaluate_adapter(args.path, args.split, args.checkpoint, args.model, args.data_dir, task_name=args.task,
                                **opts)
    task, rows, skipped, notes = compare(args.compare)
    for run, reason in skipped:
        print(f"skipped {run}: {reason}", file=sys.stderr)  # stderr: stdout stays the table alone
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not rows:
        raise ValueError(f"none of the {len(args.compare)} runs has finished an epoch: there is nothing to compare yet.")
    if args.best_lr:
        best, one, one_rate, more = best_rates(task, rows, args.one_rate, args.task, args.choose_on_seeds)
        for note in more:
            print(f"note: {note}", file=sys.stderr)
        table = format_rates(task, best, one, one_rate, args.markdown, args.task, rows)
    else:
        table = format_table(task, rows, args.markdown)
    print(table)
    return table


if __name__ == "__main__":
    run_cli(main)
