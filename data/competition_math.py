"""competition-math: the MATH competition problems (Hendrycks et al., 2021), read from a JSON list
or a JSON-lines file of records

    {"problem": "What is $\\sqrt{53}$ in simplest radical form?", "solution": "... $\\boxed{\\sqrt{53}}$.",
     "level": "Level 3", "type": "Prealgebra"}

Only `problem` and `solution` are read; the gold answer is the content of the solution's last
\\boxed{...} (data.sft.extract_math, normalized: '\\dfrac' -> '\\frac', no spaces, ...). The paper
scores the test split (5,000 problems) after training on MetaMathQA. (Named competition_math,
not math.py, which would shadow Python's math module when data/ is on the path.)

    python data/prepare.py --task competition-math --test-file MATH_test.jsonl --model smollm2
"""
from pathlib import Path

from data.sft import extract_math, last_boxed
from data.task import Examples, Task, read_json_records, split_file

SPLITS = ("train", "test")
FIELDS = ("problem", "solution")
LAYOUT = ('MATH records {"problem": ..., "solution": "... \\boxed{ANSWER} ..."}, as a JSON list or one per '
          "line (e.g. {train,test}.jsonl of the hendrycks/competition_math data)")


def source(split, data_dir=None) -> Path:
    """The split's file: data_dir itself (--train-file/--test-file), or {split}.jsonl/.json inside it."""
    return split_file("competition-math", split, data_dir, (f"{split}.jsonl", f"{split}.json"), LAYOUT)


def read(split, data_dir=None) -> Examples:
    path = source(split, data_dir)
    records = read_json_records(path, FIELDS, LAYOUT)
    for where, r in records:
        if last_boxed(r["solution"]) is None:
            raise ValueError(f"{path}, {where}: its solution has no \\boxed{{...}} answer "
                             f"({r['solution'][-40:]!r}); expected {LAYOUT}.")
    return Examples([r["problem"] for _, r in records], [r["solution"] for _, r in records],
                    [extract_math(r["solution"]) for _, r in records])


COMPETITION_MATH = Task("competition-math", "generation", ("exact_match",), None, SPLITS, source=source,
                        read=read, answer_format="math", split_rule="MATH's own train/test files, in file order")
