"""codealpaca: CodeAlpaca-20k (Chaudhary, 2023), the paper's training data for HumanEval (Section 4.2.2), read from
the dataset's JSON file (github.com/sahil2801/CodeAlpaca-20k, data/code_alpaca_20k.json): a JSON list of records

    {"instruction": "Create a function to calculate the sum of 2 numbers.", "input": "",
     "output": "def add(a, b):\\n    return a + b"}

Each record is trained as the Alpaca prompt of the authors' code (Stanford Alpaca's prompt_input when the
record has an input, else prompt_no_input), followed by the output; the loss covers the output and EOS
(data/sft.py). The prompt is written out here, so the task is of kind "code" (prompt "text": the question is
the prompt as it stands, on any tokenizer). Train only: the paper scores the runs on HumanEval
(`python evaluate.py RUN --task humaneval --split test`).

    python data/prepare.py --task codealpaca --data-dir code --model smollm2   (code/code_alpaca_20k.json)
"""
from pathlib import Path

from data.task import Examples, Task, read_json_records, split_file

FIELDS = ("instruction", "input", "output")
LAYOUT = ('CodeAlpaca JSON, a list of {"instruction": ..., "input": ..., "output": ...} records of strings '
          "(data/code_alpaca_20k.json of github.com/sahil2801/CodeAlpaca-20k)")
# Stanford Alpaca's two prompts (train.py's PROMPT_DICT), which the authors' scripts reuse
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def source(split, data_dir=None) -> Path:
    """The file: data_dir itself (--train-file), or code_alpaca_20k.json inside it."""
    return split_file("codealpaca", split, data_dir, ("code_alpaca_20k.json", "CodeAlpaca-20k.json"), LAYOUT)


def prompt(record) -> str:
    template = PROMPT_INPUT if record["input"].strip() else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record["input"])


def read(split, data_dir=None) -> Examples:
    path = source(split, data_dir)
    records = read_json_records(path, FIELDS, LAYOUT)
    for where, r in records:
        if not r["output"].strip():
            raise ValueError(f"{path}, {where}: the record's 'output' field is empty, so there is nothing to train "
                             f"on; expected {LAYOUT}.")
    # no tests: a training split is never scored
    return Examples([prompt(r) for _, r in records], [r["output"] for _, r in records], ["" for _ in records])


CODE_ALPACA = Task("codealpaca", "code", ("pass@1",), None, ("train",), source=source, read=read,
                   split_rule="every record of CodeAlpaca's file, in file order",
                   withheld={"test": "CodeAlpaca has no tests; score a codealpaca run on HumanEval with "
                                     "evaluate.py RUN --task humaneval --split test."})
