"""gsm8k: the GSM8K grade-school math problems (Cobbe et al., 2021), read from the dataset's own
JSON-lines files (https://github.com/openai/grade-school-math, grade_school_math/data/), one
problem per line:

    {"question": "Natalia sold clips to 48 of her friends ...",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May. ...\n#### 72"}

The response is the answer text with the calculator annotations <<...>> removed; the gold
answer is the number after '####' (data.sft.extract_gsm8k). The paper scores the test split
(1,319 problems) after training on MetaMathQA; train (7,473) is read for completeness.
A missing file says which layout to provide.

    python data/prepare.py --task gsm8k --test-file grade_school_math/data/test.jsonl --model smollm2
"""
import re
from pathlib import Path

from data.sft import extract_gsm8k
from data.task import Examples, Task, read_json_records, split_file

SPLITS = ("train", "test")
FIELDS = ("question", "answer")
LAYOUT = ('GSM8K JSON lines, one {"question": ..., "answer": "... #### N"} per line '
          "(grade_school_math/data/{train,test}.jsonl of github.com/openai/grade-school-math)")
CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>


def source(split, data_dir=None) -> Path:
    """The split's file: data_dir itself (--train-file/--test-file), or {split}.jsonl inside it."""
    return split_file("gsm8k", split, data_dir, (f"{split}.jsonl",), LAYOUT)


def read(split, data_dir=None) -> Examples:
    path = source(split, data_dir)
    records = read_json_records(path, FIELDS, LAYOUT)
    questions, responses, answers = [], [], []
    for where, r in records:
        answer = extract_gsm8k(r["answer"]) if "####" in r["answer"] else None
        if answer is None:
            raise ValueError(f"{path}, {where}: its answer does not end with '#### N' "
                             f"({r['answer'][-40:]!r}); expected {LAYOUT}.")
        questions.append(r["question"])
        responses.append(CALCULATOR.sub("", r["answer"]))
        answers.append(answer)
    return Examples(questions, responses, answers)


GSM8K = Task("gsm8k", "generation", ("exact_match",), None, SPLITS, source=source, read=read,
             answer_format="gsm8k", split_rule="GSM8K's own train/test files, in file order")
