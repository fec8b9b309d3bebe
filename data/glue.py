"""Reads the six GLUE tasks of the paper from the GLUE distribution's TSV files, and downloads them.

Each task's train and dev files sit in one folder under a GLUE directory (--glue-dir), as the
GLUE download script (https://github.com/nyu-mll/GLUE-baselines, download_glue_data.py) leaves them:

    GLUE_DIR/CoLA/{train,dev}.tsv    source, label, original_label, sentence   (no header line)
    GLUE_DIR/SST-2/{train,dev}.tsv   sentence, label
    GLUE_DIR/MRPC/{train,dev}.tsv    Quality, #1 ID, #2 ID, #1 String, #2 String
    GLUE_DIR/QNLI/{train,dev}.tsv    index, question, sentence, label
    GLUE_DIR/RTE/{train,dev}.tsv     index, sentence1, sentence2, label
    GLUE_DIR/STS-B/{train,dev}.tsv   index, genre, ..., sentence1, sentence2, score

Train and dev only: GLUE test labels are not public and the paper reports dev. `read_glue`
checks the header, the column count and every label, and names the line of any problem.
`ensure_glue_file` downloads a missing task with urllib from the URLs the download script
uses (MRPC is rebuilt from Microsoft's file as the script does); when that fails it says
which files to put where. Each task is a `data.task.Task` record (`COLA` ... `STSB`, all in
`GLUE_TASKS`) whose source is `ensure_glue_file` and whose reader is `read_glue`, with the
GLUE directory as data_dir. This command downloads RTE if needed and prepares it:

    python -m data.prepare --task rte --glue-dir GLUE_DIR --tokenizer PATH/tokenizer.json
"""
import csv
import io
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from data.task import Examples, Task, bad_label, malformed
from lib.common import write_atomic

SPLITS = ("train", "dev")  # the GLUE splits with public labels

# -----------------------------------------------------------------------------
# layouts: the columns of each task's TSV files

GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data"
MRPC_URLS = {  # MRPC is not in a GLUE zip: the script splits Microsoft's train file by dev ids
    "msr_paraphrase_train.txt":
        "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
    "dev_ids.tsv": f"{GLUE_URL}/mrpc_dev_ids.tsv",
}


@dataclass(frozen=True)
class GlueLayout:
    folder: str  # files are GLUE_DIR/<folder>/{train,dev}.tsv
    columns: tuple[str, ...]  # tab-separated columns of train.tsv and dev.tsv
    has_header: bool  # first line repeats `columns` (all but CoLA)
    text: str  # column of the sentence (the first one of a pair)
    pair: str | None  # column of the second sentence of a pair
    label: str  # column of the label
    label_values: dict[str, int] | None  # label text -> class id; None: a score in [0, 5]
    script_task: str  # name in the GLUE download script's --tasks
    url: str  # the zip the download script fetches ("" for MRPC, see MRPC_URLS)


BINARY = {"0": 0, "1": 1}
NLI = {"entailment": 0, "not_entailment": 1}
GLUE: dict[str, GlueLayout] = {
    "cola": GlueLayout("CoLA", ("source", "label", "original_label", "sentence"), False,
                       "sentence", None, "label", BINARY, "CoLA", f"{GLUE_URL}/CoLA.zip"),
    "sst2": GlueLayout("SST-2", ("sentence", "label"), True,
                       "sentence", None, "label", BINARY, "SST", f"{GLUE_URL}/SST-2.zip"),
    "mrpc": GlueLayout("MRPC", ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), True,
                       "#1 String", "#2 String", "Quality", BINARY, "MRPC", ""),
    "qnli": GlueLayout("QNLI", ("index", "question", "sentence", "label"), True,
                       "question", "sentence", "label", NLI, "QNLI", f"{GLUE_URL}/QNLIv2.zip"),
    "rte": GlueLayout("RTE", ("index", "sentence1", "sentence2", "label"), True,
                      "sentence1", "sentence2", "label", NLI, "RTE", f"{GLUE_URL}/RTE.zip"),
    "stsb": GlueLayout("STS-B", ("index", "genre", "filename", "year", "old_index", "source1",
                                 "source2", "sentence1", "sentence2", "score"), True,
                       "sentence1", "sentence2", "score", None, "STS", f"{GLUE_URL}/STS-B.zip"),
}


# -----------------------------------------------------------------------------
# reading and validating

GLUE_FIX = "replace it with the original from the GLUE distribution (delete it to re-download it)"


def glue_path(task, split, glue_dir):
    return Path(glue_dir) / GLUE[task].folder / f"{split}.tsv"


def read_glue(task, split, glue_dir):
    """Returns Examples(texts, pairs or None, labels) of GLUE_DIR/<folder>/<split>.tsv.

    A change to what this reads must bump CACHE_VERSION in data/prepare.py, or stale caches are kept.
    """
    layout, path = GLUE[task], glue_path(task, split, glue_dir)
    col = {name: i for i, name in enumerate(layout.columns)}
    texts, pairs, labels = [], [], []
    # utf-8-sig: MRPC's header keeps the byte-order mark of Microsoft's original file;
    # QUOTE_NONE: GLUE sentences contain unbalanced quotes that are not CSV quoting
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header_pending = layout.has_header
        for row in reader:
            if not row:  # blank line
                continue
            if header_pending:
                if tuple(row) != layout.columns:
                    raise ValueError(
                        f"{path}, line {reader.line_num}: expected the header columns "
                        f"{layout.columns}, found {tuple(row)}. "
                        f"Is this the {layout.folder} {split}.tsv of the GLUE distribution?"
                    )
                header_pending = False
                continue
            if len(row) != len(layout.columns):
                raise malformed(path, reader.line_num, layout.columns, len(row), "tab-separated", GLUE_FIX)
            texts.append(row[col[layout.text]])
            if layout.pair:
                pairs.append(row[col[layout.pair]])
            labels.append(_glue_label(layout, row[col[layout.label]], path, reader.line_num))
    if not labels:
        what = "only a header" if layout.has_header and not header_pending else "it is empty"
        raise ValueError(f"{path} has no examples ({what}): {GLUE_FIX}.")
    return Examples(texts, pairs if layout.pair else None, labels)


def _glue_label(layout, value, path, line):
    if layout.label_values is not None:
        if value not in layout.label_values:
            raise bad_label(path, line, value, sorted(layout.label_values), GLUE_FIX)
        return layout.label_values[value]
    # STS-B: a similarity score between 0 (unrelated) and 5 (same meaning)
    try:
        score = float(value)
    except ValueError:
        score = float("nan")
    if not 0.0 <= score <= 5.0:
        raise ValueError(
            f"{path}, line {line}: label {value!r} is not a similarity score in [0, 5]. "
            f"The file is damaged or belongs to another task: {GLUE_FIX}."
        )
    return score


# -----------------------------------------------------------------------------
# downloading: as the GLUE download script does, or a message saying where to put which files


def fetch_url(url):
    """The bytes at `url` (urllib only; tests replace this function)."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def download_glue(task, glue_dir):
    """Downloads one GLUE task into GLUE_DIR/<folder>/ as the GLUE download script does."""
    layout, glue_dir = GLUE[task], Path(glue_dir)
    if layout.url:  # every task but MRPC is one zip
        print(f"downloading {layout.url} into {glue_dir}")
        with zipfile.ZipFile(io.BytesIO(fetch_url(layout.url))) as archive:
            archive.extractall(glue_dir)  # the zip holds <folder>/{train,dev,test}.tsv
        return
    print(f"downloading {', '.join(MRPC_URLS.values())} into {glue_dir / 'MRPC'}")
    raw = {name: fetch_url(url).decode("utf-8-sig") for name, url in MRPC_URLS.items()}
    dev_ids = {tuple(line.split("\t")[:2]) for line in raw["dev_ids.tsv"].splitlines()}
    header, *rows = [line for line in raw["msr_paraphrase_train.txt"].splitlines() if line]
    # a row is "Quality \t #1 ID \t #2 ID \t #1 String \t #2 String"; dev = rows whose id pair is listed
    is_dev = [tuple(row.split("\t")[1:3]) in dev_ids for row in rows]
    (glue_dir / "MRPC").mkdir(parents=True, exist_ok=True)
    for split, keep in (("train", False), ("dev", True)):
        lines = [header] + [row for row, d in zip(rows, is_dev) if d == keep]
        write_atomic(glue_path("mrpc", split, glue_dir), ("\n".join(lines) + "\n").encode("utf-8"))


def ensure_glue_file(task, split, glue_dir):
    """GLUE_DIR/<folder>/<split>.tsv, downloaded when missing; else says where to put which files."""
    layout = GLUE[task]
    if glue_dir is None:
        raise ValueError(
            f"task {task!r} reads the GLUE TSV files: pass --data-dir DIR (data_dir=DIR), the directory "
            f"that holds (or will receive) {layout.folder}/train.tsv and {layout.folder}/dev.tsv."
        )
    path = glue_path(task, split, glue_dir)
    if path.is_file():
        return path
    problem = "the download did not produce it"
    try:
        download_glue(task, glue_dir)
    except Exception as e:  # any failure (no network, HTTP error, bad zip) ends in the message below
        problem = f"downloading failed ({type(e).__name__}: {e})"
    if path.is_file():
        return path
    paths = [glue_path(task, s, glue_dir) for s in SPLITS]
    expected = "\n".join(f"  {p}  ({'present' if p.is_file() else 'missing'})" for p in paths)
    by_hand = (f"unzip {layout.url} into {glue_dir}" if layout.url else
               f"fetch {', '.join(MRPC_URLS.values())} and split them as the script does")
    raise FileNotFoundError(
        f"GLUE task {task!r} needs these files:\n{expected}\n{problem}.\n"
        f"---> HINT: put them there by hand: {by_hand}, or run the GLUE download script "
        f"(https://github.com/nyu-mll/GLUE-baselines: python download_glue_data.py "
        f"--data_dir {glue_dir} --tasks {layout.script_task}); then run again."
    )


# -----------------------------------------------------------------------------
# the six tasks: one record each, data_dir = the GLUE directory


def read_task(task, split, glue_dir):
    """A task's reader: the split's file (downloaded if missing), read and checked."""
    ensure_glue_file(task, split, glue_dir)
    return read_glue(task, split, glue_dir)


WITHHELD = {"test": "GLUE test files carry no labels (scores come from the GLUE server). "
                    "The paper reports dev: use split 'dev'."}


def glue_task(name, kind, metrics, label_names):
    return Task(name, kind, metrics, label_names, SPLITS, source=partial(ensure_glue_file, name),
                read=partial(read_task, name), split_rule="GLUE distribution file", withheld=WITHHELD)


COLA = glue_task("cola", "classification", ("matthews",), ("unacceptable", "acceptable"))
SST2 = glue_task("sst2", "classification", ("accuracy",), ("negative", "positive"))
MRPC = glue_task("mrpc", "classification", ("f1", "accuracy"), ("not_equivalent", "equivalent"))
QNLI = glue_task("qnli", "classification", ("accuracy",), ("entailment", "not_entailment"))
RTE = glue_task("rte", "classification", ("accuracy",), ("entailment", "not_entailment"))
STSB = glue_task("stsb", "regression", ("pearson", "spearman"), None)  # a similarity score in [0, 5]
GLUE_TASKS = (COLA, SST2, MRPC, QNLI, RTE, STSB)
