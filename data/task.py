"""The task record: what every dataset file (data/rotten_tomatoes.py, data/glue.py, ...) declares.

A task is its name, the kind of its labels, the metrics that score it, its splits, and two
functions: `source(split, data_dir)`, the file a split is read from (its size and mtime key
the cache), and `read(split, data_dir)`, the split's examples in a fixed order. data/prepare.py
tokenizes, caches and batches any task through this record alone, so adding a dataset is one
new file defining a `Task` and one line in `data.prepare.TASKS`:

    # data/my_task.py
    MY_TASK = Task("my-task", "classification", ("accuracy",), ("no", "yes"), ("train", "dev"),
                   source=my_path, read=my_read, split_rule="the file's own train/dev split")

Kinds (`KINDS`, the one table of them, each a `Kind` record): "classification" (labels are class
ids, label_names[i] names class i) and "regression" (one score per example, label_names is None)
fine-tune an encoder with a task head; "generation" (math word problems) fine-tunes a causal LM: `Examples.texts` are then the questions,
`Examples.pairs` the worked responses (the tokens the loss covers, see data/sft.py) and
`Examples.labels` the gold final answers as strings; `answer_format` ("gsm8k" or "math")
names how a final answer is extracted from a response (data.sft.EXTRACTORS). "code" (Python functions:
data/humaneval.py, data/code_functions.py, data/code_alpaca.py) fine-tunes a causal LM the same way, but
its prompt is the question's text as it stands (code to continue, no chat template: Kind.prompt "text"),
its `Examples.labels` are the tests each completion must pass (the program's tail after the completion),
and it is scored by running them (Kind.executes: pass@k, data/humaneval.py), not by exact match. Two more
decoder kinds have sequences other than prompt ++ response, so their task names its own `tokenize` (the
same (ids, loss mask) layout, data/sft.py): "multiple-choice" (data/mmlu.py: `Examples.texts` the question
blocks, `pairs` their subjects, `labels` the answer letters; scored by the log-likelihood of the
answer letters, not by generating) and "conversation" (data/sharegpt.py: multi-turn chats, the loss
on every assistant turn; trained on, never scored itself).

    python -m data.prepare --task rotten-tomatoes   # prepares a task through this record
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from data.sft import EXTRACTORS


@dataclass(frozen=True)
class Kind:
    """What the kind of a task decides, for every file that asks: the rest reads these fields, never the name."""
    label_dtype: torch.dtype | None  # of the (N,) label tensor; None: gold answers are strings (data/sft.py's sidecar)
    family: str  # the model it fine-tunes, a key of models.DEFAULT_TARGETS: "encoder" (with a task head) or "decoder"
    generates: bool  # a causal LM trained on token sequences with a loss mask (data/sft.py), not one label per forward
    # how a split is scored (evaluate.py): "forward" (one forward, the metrics of data/metrics.py), "generation"
    # (answers generated: exact match, or running the tests where `executes`), "log-likelihood" (the answer letter
    # the model finds likeliest); None: never
    scored_by: str | None
    prompt: str = "chat"  # generating kinds: "chat" (data.sft.build_prompts) or "text" (the question, as it stands)
    executes: bool = False  # scored by running each completion with its tests (pass@k), not by exact match


KINDS = {"classification": Kind(torch.int64, "encoder", False, "forward"),
         "regression": Kind(torch.float32, "encoder", False, "forward"),
         "generation": Kind(None, "decoder", True, "generation"),
         "code": Kind(None, "decoder", True, "generation", prompt="text", executes=True),
         "multiple-choice": Kind(None, "decoder", True, "log-likelihood"),
         "conversation": Kind(None, "decoder", True, None)}


class Examples(NamedTuple):
    """One split's examples, in the order they are prepared and batched."""

    texts: list[str]  # N first (or only) texts
    pairs: list[str] | None  # N second texts of a pair (e.g. the hypothesis), or None
    labels: list  # N class ids (int) or scores (float)


@dataclass(frozen=True, eq=False)
class Task:
    name: str  # the --task name, also the key in data.prepare.TASKS
    kind: str  # a key of KINDS
    metrics: tuple[str, ...]  # keys of evaluate.METRICS; the first picks the best epoch
    label_names: tuple[str, ...] | None  # label_names[i] is class i; None unless classification
    splits: tuple[str, ...]  # the splits load_split can prepare
    source: Callable[[str, Path | None], Path]  # (split, data_dir) -> the file it is read from
    read: Callable[[str, Path | None], Examples]  # (split, data_dir) -> its examples
    split_rule: str  # how the splits were made, stored in the cache's sidecar
    # splits that exist but cannot be prepared: split -> why, and what to use instead
    withheld: dict[str, str] = field(default_factory=dict)
    # generation only: how a final answer is read from a response, a key of data.sft.EXTRACTORS
    answer_format: str | None = None
    # decoder kinds whose sequences are not prompt ++ response (multiple choice, conversations): (tokenizer,
    # split, data_dir, max_length, shots) -> data.sft.Sequences; None: data.sft.tokenize_sft (generation)
    tokenize: Callable | None = None
    # decoder kinds: (tokenizer, shots) -> the prompt's form in a few words, printed and part of the cache key
    # (so a new --shots rebuilds a few-shot task's cache); None: data.sft.prompt_format (chat template or Alpaca)
    prompt_format: Callable | None = None

    def __post_init__(self):
        # a task table error is the programmer's, caught at import: fail loudly, with the fix
        if self.kind not in KINDS:
            labelled = sorted(k for k, kind in KINDS.items() if kind.label_dtype is not None)
            sequences = sorted(k for k, kind in KINDS.items() if kind.label_dtype is None)
            raise ValueError(f"task {self.name!r} has kind {self.kind!r}, which is not one of {labelled} "
                             f"(label tensors) nor {sequences} (a causal LM's token sequences, data/sft.py); "
                             "add the kind to data.task.KINDS or use one of those.")
        if (self.kind == "classification") != (self.label_names is not None):
            raise ValueError(f"task {self.name!r} of kind {self.kind!r} has label_names={self.label_names!r}: "
                             "classification names its classes (a tuple), other kinds pass None.")
        if (self.kind == "generation") != (self.answer_format in EXTRACTORS):
            raise ValueError(f"task {self.name!r} of kind {self.kind!r} has answer_format={self.answer_format!r}: "
                             f"generation names one of {sorted(EXTRACTORS)}, other kinds pass None.")
        if (self.tokenize is not None or self.prompt_format is not None) and not self.generates:
            raise ValueError(f"task {self.name!r} of kind {self.kind!r} names a tokenize or prompt_format function, "
                             "but only a causal LM's kinds have those; an encoder task passes None.")
        if self.generates and self.tokenize is None and KINDS[self.kind].scored_by != "generation":
            raise ValueError(f"task {self.name!r} of kind {self.kind!r} needs its own tokenize function: only the "
                             "generated kinds (generation, code: prompt ++ response, data.sft.tokenize_sft) have a "
                             "default.")
        if not self.metrics or not self.splits:
            raise ValueError(f"task {self.name!r} needs at least one metric and one split, "
                             f"got metrics={self.metrics!r}, splits={self.splits!r}.")

    @property
    def num_labels(self) -> int:
        """Outputs of the model's head: one per class, or 1 for a regression score."""
        return len(self.label_names) if self.kind == "classification" else 1

    @property
    def label_dtype(self) -> torch.dtype | None:
        return KINDS[self.kind].label_dtype

    @property
    def family(self) -> str:
        """"encoder" or "decoder": the model family this task fine-tunes (models.load's switch)."""
        return KINDS[self.kind].family

    @property
    def generates(self) -> bool:
        """Whether a causal LM trains on the task's token sequences (data/sft.py's layout: generation, code,
        multiple choice, conversations); False: an encoder with a head, one label per example."""
        return KINDS[self.kind].generates

    @property
    def scored_by(self) -> str | None:
        """"forward", "generation", "log-likelihood" or None (trained on, never scored): data.task.KINDS."""
        return KINDS[self.kind].scored_by

    @property
    def prompt(self) -> str:
        """How a generating task's question becomes its prompt: "chat" or "text" (data.sft.build_prompts)."""
        return KINDS[self.kind].prompt

    @property
    def executes(self) -> bool:
        """Whether generations are scored by running their tests (pass@k) rather than by exact match."""
        return KINDS[self.kind].executes

    def extract_answer(self, text):
        """A generation task's final answer in `text` (normalized), or None when it holds none."""
        return EXTRACTORS[self.answer_format](text)

    def check_split(self, split):
        """Raises ValueError unless load_split can prepare `split` of this task."""
        if split in self.splits:
            return
        if split in self.withheld:
            raise ValueError(f"split {split!r} of task {self.name!r} is not supported: {self.withheld[split]}")
        raise ValueError(f"split {split!r} is not one of {list(self.splits)} for task {self.name!r}.")


# -----------------------------------------------------------------------------
# the messages every reader raises for a damaged file (`fix` says how to restore it)


def malformed(path, line, columns, found, kind, fix):
    return ValueError(
        f"{path}, line {line}: expected {len(columns)} {kind} columns ({', '.join(columns)}) "
        f"but found {found}. The file is damaged or belongs to another task: {fix}."
    )


def bad_label(path, line, value, allowed, fix):
    return ValueError(
        f"{path}, line {line}: label {value!r} is not one of {allowed}. The file is damaged "
        f"or belongs to another task: {fix}."
    )


def read_json_records(path, fields, layout, text=None):
    """(where, record) of each record of a JSON list or a JSON-lines file, each a dict whose `fields`
    are strings; `where` is "line N" (JSON lines, from 1) or "record N" (a list, from 0).

    `layout` describes the expected file for the messages: a bad line or record, or one missing a
    field, is named (its line for JSON lines, its position for a list) with the field and the layout.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if text is None else text  # `text`: the file's, read by the caller
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); expected {layout}.") from None
        numbered = [(f"record {i}", r) for i, r in enumerate(records)]
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}); expected {layout}.") from None
    for where, record in numbered:
        if not isinstance(record, dict):
            raise ValueError(f"{path}, {where}: expected an object with fields {list(fields)}, found "
                             f"{type(record).__name__}; expected {layout}.")
        for name in fields:
            if not isinstance(record.get(name), str):
                problem = "has no" if name not in record else "has a non-string"
                raise ValueError(f"{path}, {where}: the record {problem} {name!r} field (it has "
                                 f"{sorted(record)}); expected {layout}.")
    return numbered


def split_file(task, split, path, names, layout):
    """The file a split of a file-based task is read from: `path` itself when it is a file, else the
    first of `names` found in the directory `path`; a clear FileNotFoundError naming the layout otherwise."""
    flag = f"--{split}-file" if split in ("train", "test") else "--data-dir"
    if path is not None and Path(path).is_file():
        return Path(path)
    if path is not None and Path(path).is_dir():
        for name in names:
            if (Path(path) / name).is_file():
                return Path(path) / name
    where = "no file was given" if path is None else f"{str(path)!r} is neither a file nor a directory holding {names}"
    raise FileNotFoundError(f"task {task!r}, split {split!r}: {where}. This task reads the paper's own files, "
                            f"which are not bundled: pass {flag} PATH (or --data-dir DIR holding {names[0]}), "
                            f"laid out as {layout}.")
