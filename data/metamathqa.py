"""metamathqa: MetaMathQA (Yu et al., 2024), the paper's training data for GSM8K and MATH,
read from the dataset's JSON file (https://huggingface.co/datasets/meta-math/MetaMathQA,
MetaMathQA-395K.json): a JSON list of records

    {"query": "What is the total cost of ...", "response": "... \\n#### 18\\nThe answer is: 18",
     "type": "GSM_Rephrased", "original_question": "..."}

Only `query` (the question) and `response` (the worked solution) are read; the gold answer is
what follows 'The answer is:' or the last \\boxed{} (data.sft.extract_math). Like the authors'
scripts, only the first LIMIT = 10,000 records are used (the paper's Table 4 also tries 50k and
100k: change LIMIT). Train only: the paper evaluates on GSM8K and MATH.

    python data/prepare.py --task metamathqa --train-file MetaMathQA-395K.json --model smollm2
"""
from pathlib import Path

from data.sft import extract_math
from data.task import Examples, Task, read_json_records, split_file

LIMIT = 10_000  # the first records used, as in the authors' scripts
FIELDS = ("query", "response")
LAYOUT = ('MetaMathQA JSON, a list of {"query": ..., "response": ...} records '
          "(MetaMathQA-395K.json of huggingface.co/datasets/meta-math/MetaMathQA)")


def source(split, data_dir=None) -> Path:
    """The file: data_dir itself (--train-file), or MetaMathQA-395K.json inside it."""
    return split_file("metamathqa", split, data_dir, ("MetaMathQA-395K.json", "MetaMathQA.json"), LAYOUT)


def read(split, data_dir=None) -> Examples:
    path = source(split, data_dir)
    records = [r for _, r in read_json_records(path, FIELDS, LAYOUT)[:LIMIT]]
    answers = [extract_math(r["response"]) or "" for r in records]  # training only: no answer is no harm
    return Examples([r["query"] for r in records], [r["response"] for r in records], answers)


METAMATHQA = Task("metamathqa", "generation", ("exact_match",), None, ("train",), source=source, read=read,
                  answer_format="math", split_rule=f"the first {LIMIT} records of MetaMathQA's file, in file order")
