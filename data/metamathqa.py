"""metamathqa: MetaMathQA (Yu et al., 2024), the paper's training data for GSM8K and MATH,
read from the dataset's JSON file (https://huggingface.co/datasets/meta-math/MetaMathQA,
MetaMathQA-395K.json): a JSON list of records

    {"query": "What is the total cost of ...", "response": "... \\n#### 18\\nThe answer is: 18",
     "type": "GSM_Rephrased", "original_question": "..."}

Only `query` (the question) and `response` (the worked solution) are read; the gold answer is
what follows 'The answer is:' or the last \\boxed{} (data.sft.extract_math). Like the authors'
scripts, only the first LIMIT = 10,000 records are trained on (the paper's Table 4 also tries 50k and
100k: change LIMIT). The paper evaluates on GSM8K and MATH; the dev split, for choosing a setting such as
the learning rate without looking at those test sets, is the next DEV = 500 records that have an answer,
which no run trains on.

    python data/prepare.py --task metamathqa --train-file MetaMathQA-395K.json --model smollm2
"""
from pathlib import Path

from data.sft import extract_math
from data.task import Examples, Task, read_json_records, split_file

LIMIT = 10_000  # the first records trained on, as in the authors' scripts
DEV = 500  # dev: the first records after them whose answer extract_math finds
FIELDS = ("query", "response")
LAYOUT = ('MetaMathQA JSON, a list of {"query": ..., "response": ...} records '
          "(MetaMathQA-395K.json of huggingface.co/datasets/meta-math/MetaMathQA)")


def source(split, data_dir=None) -> Path:
    """The file: data_dir itself (--train-file), or MetaMathQA-395K.json inside it."""
    return split_file("metamathqa", split, data_dir, ("MetaMathQA-395K.json", "MetaMathQA.json"), LAYOUT)


def read(split, data_dir=None) -> Examples:
    path = source(split, data_dir)
    records = [r for _, r in read_json_records(path, FIELDS, LAYOUT)]
    if split == "train":
        records = records[:LIMIT]
        answers = [extract_math(r["response"]) or "" for r in records]  # training only: no answer is no harm
    else:  # dev is scored by its answers: only records that have one
        records = [r for r in records[LIMIT:] if extract_math(r["response"])][:DEV]
        if not records:
            raise ValueError(f"{str(path)!r} holds no record with an answer after the first {LIMIT} (the training "
                             "ones), so it has no dev split; pass the whole MetaMathQA-395K.json.")
        answers = [extract_math(r["response"]) for r in records]
    return Examples([r["query"] for r in records], [r["response"] for r in records], answers)


METAMATHQA = Task("metamathqa", "generation", ("exact_match",), None, ("train", "dev"), source=source, read=read,
                  answer_format="math", split_rule=f"train: the first {LIMIT} records of MetaMathQA's file, in file "
                  f"order; dev: the next {DEV} that have an answer")
