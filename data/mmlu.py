"""mmlu: the MMLU benchmark (Hendrycks et al., 2021), 57 subjects of four-choice questions, read from the
distribution's CSV files, and the k-shot prompt and answer-letter sequences of every multiple-choice task
(data/arithmetic_mc.py uses them too).

Layout (the directory data/ of the distribution's data.tar, https://github.com/hendrycks/test), one
question per row, no header row: question, the four choices, the answer letter:

    DIR/dev/abstract_algebra_dev.csv     5 solved questions per subject: the few-shot examples
    DIR/val/abstract_algebra_val.csv     this project's dev split (scored after every epoch)
    DIR/test/abstract_algebra_test.csv   the test split (14,042 questions)

The subject is the file name without _dev.csv (_val.csv, _test.csv), underscores read as spaces. MMLU has
no training split here: the paper fine-tunes on ShareGPT (--task sharegpt) and scores MMLU with
`python evaluate.py RUN --task mmlu --split test --data-dir DIR`.

The prompt of a question of subject s with k shots (the standard protocol, k = 5; Hendrycks' evaluate.py):

    The following are multiple choice questions (with answers) about {s}.\\n\\n
    {question of shot 1}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n   ...  (the first k of s in dev/)
    {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

A prompt that leaves no room for the answer letter within max_length loses shots from the end until it
does (as Hendrycks' code does; counted). The model's answer is the letter it finds likeliest next,

    pred = argmax_{l in A, B, C, D} log p(" l" | prompt)             (evaluate.score_choices)

one forward pass per question, each letter one token. A fine-tune on a multiple-choice task trains on
prompt ++ " X", the loss on the one answer token.

    python data/prepare.py --task mmlu --model smollm2 --data-dir path/to/mmlu/data
"""
import csv
from pathlib import Path

from data.sft import Sequences
from data.task import Examples, Task

LETTERS = ("A", "B", "C", "D")
SHOTS = 5  # solved examples before each question (--shots): the standard protocol
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
COLUMNS = ("question", "A", "B", "C", "D", "answer")
DIRECTORIES = {"dev": "val", "test": "test", "shots": "dev"}  # this project's split -> MMLU's directory
LAYOUT = ("MMLU CSV files without a header row (question, A, B, C, D, answer letter), one per subject and split: "
          "DIR/dev/SUBJECT_dev.csv (few-shot examples), DIR/val/SUBJECT_val.csv, DIR/test/SUBJECT_test.csv "
          "(the data/ directory of data.tar, github.com/hendrycks/test)")

# -----------------------------------------------------------------------------
# the prompt of every multiple-choice task


def question_block(question, choices) -> str:
    """'{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:', the block a prompt ends with (a shot adds ' X\\n\\n')."""
    if len(choices) != len(LETTERS):
        raise ValueError(f"a multiple-choice question needs {len(LETTERS)} choices, got {len(choices)}: {question!r}.")
    return question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices)) + "\nAnswer:"


def prompt_format(tokenizer, shots) -> str:
    """The prompt's form, part of the cache key: plain text, whatever the model's chat template."""
    return f"{shots}-shot plain text (MMLU's)"


def choice_ids(tokenizer) -> list[int]:
    """The token ids of " A", " B", " C", " D" (what follows 'Answer:'); each must be one token."""
    ids = tokenizer.encode([f" {letter}" for letter in LETTERS], add_special_tokens=False)
    if any(len(x) != 1 for x in ids):
        raise ValueError(f"the tokenizer {getattr(tokenizer, 'path', 'given')} splits the answer letters "
                         f"{[f' {l}' for l in LETTERS]} into {ids}, not one token each; the log-likelihood scoring "
                         "reads one token per letter: use a tokenizer that keeps ' A' whole (every LLaMA, Gemma, "
                         "Qwen and SmolLM tokenizer does).")
    return [x[0] for x in ids]


def choice_sequences(tokenizer, examples: Examples, pool: Examples | None, max_length, shots) -> Sequences:
    """Prompts (k-shot, from `pool`'s first examples of the same subject) and training sequences
    prompt ++ " X" (loss on " X") of the questions `examples` (texts: question blocks, pairs: subjects,
    labels: answer letters)."""
    if shots < 0:
        raise ValueError(f"shots={shots} is negative; pass 0 (zero-shot) or more (the standard protocol: {SHOTS}).")
    letters = dict(zip(LETTERS, choice_ids(tokenizer)))
    blocks, subjects, answers = examples
    solved = {}  # subject -> its shots, each "question block X\n\n"
    if shots:
        for block, subject, answer in zip(*pool):
            solved.setdefault(subject, [])
            if len(solved[subject]) < shots:
                solved[subject].append(f"{block} {answer}\n\n")
    short = sorted({s for s in subjects if len(solved.get(s, [])) < shots})
    if short:
        raise ValueError(f"--shots {shots} needs {shots} solved examples of every subject, but the few-shot split has "
                         f"{[(s, len(solved.get(s, []))) for s in short[:5]]}{' ...' if len(short) > 5 else ''}: "
                         f"pass --shots {min(len(solved.get(s, [])) for s in short)} or add the examples.")

    def prompt(i, k):
        return HEADER.format(subject=subjects[i]) + "".join(solved.get(subjects[i], [])[:k]) + blocks[i]

    # every prompt with k shots; the ones with no room for the answer token lose a shot and are tried again
    k = [shots] * len(blocks)
    prompts = tokenizer.encode([prompt(i, shots) for i in range(len(blocks))], add_special_tokens=True)
    while too_long := [i for i in range(len(blocks)) if len(prompts[i]) + 1 > max_length and k[i] > 0]:
        for i in too_long:
            k[i] -= 1
        for i, ids in zip(too_long, tokenizer.encode([prompt(i, k[i]) for i in too_long], add_special_tokens=True)):
            prompts[i] = ids
    ids, type_ids, kept = [], [], []
    for i, p in enumerate(prompts):
        if len(p) + 1 <= max_length:  # prompt ++ " X", the loss on " X" alone
            ids.append(p + [letters[answers[i]]])
            type_ids.append([0] * len(p) + [1])
            kept.append(i)
    fewer = sum(n < shots for n in k)
    stats = {"num_truncated": 0, "num_dropped": len(blocks) - len(kept),
             "num_long_prompts": sum(len(p) >= max_length for p in prompts),
             "note": f"{shots}-shot, {fewer} prompts with fewer shots to fit max_length {max_length}"}
    return Sequences(prompts, ids, type_ids, kept, stats, list(blocks), list(answers), {"subjects": list(subjects)})


# -----------------------------------------------------------------------------
# MMLU's files


def subject_files(split, data_dir) -> list[Path]:
    """The CSV files of one split (this project's dev/test, or "shots": MMLU's dev/), sorted by subject."""
    if data_dir is None or not Path(data_dir).is_dir():
        where = "no directory was given" if data_dir is None else f"{str(data_dir)!r} is not a directory"
        raise FileNotFoundError(f"task 'mmlu', split {split!r}: {where}. MMLU is not bundled: pass --data-dir DIR, "
                                f"laid out as {LAYOUT}.")
    folder = Path(data_dir) / DIRECTORIES[split]
    files = sorted(folder.glob(f"*_{DIRECTORIES[split]}.csv"))
    if not files:
        raise FileNotFoundError(f"task 'mmlu', split {split!r}: {folder} holds no *_{DIRECTORIES[split]}.csv file; "
                                f"expected {LAYOUT}.")
    return files


def source(split, data_dir=None) -> Path:
    """The MMLU directory itself: data/prepare.py keys the cache by every file under it."""
    subject_files(split, data_dir)  # a clear error now when the split's files are missing
    return Path(data_dir)


def read_file(path) -> Examples:
    """(question blocks, subjects, answer letters) of one subject's CSV file, in file order."""
    subject = path.name.rsplit("_", 1)[0].replace("_", " ")
    blocks, letters = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row_number, row in enumerate(csv.reader(f), start=1):
            if len(row) != len(COLUMNS):
                raise ValueError(f"{path}, row {row_number}: expected {len(COLUMNS)} fields ({', '.join(COLUMNS)}) "
                                 f"but found {len(row)}. The file is damaged or not MMLU's: expected {LAYOUT}.")
            if row[-1].strip() not in LETTERS:
                raise ValueError(f"{path}, row {row_number}, field 'answer': {row[-1]!r} is not one of "
                                 f"{list(LETTERS)}. The file is damaged or not MMLU's: expected {LAYOUT}.")
            blocks.append(question_block(row[0], row[1:5]))
            letters.append(row[-1].strip())
    return Examples(blocks, [subject] * len(blocks), letters)


def read(split, data_dir=None) -> Examples:
    """Every question of the split, subject by subject (files sorted by name), each in file order."""
    parts = [read_file(path) for path in subject_files(split, data_dir)]
    return Examples(*([x for part in parts for x in part[i]] for i in range(3)))


def tokenize(tokenizer, split, data_dir, max_length, shots) -> Sequences:
    """The split's k-shot prompts and training sequences, the shots from MMLU's dev/ files."""
    pool = read("shots", data_dir) if shots else None
    return choice_sequences(tokenizer, read(split, data_dir), pool, max_length, shots)


MMLU = Task("mmlu", "multiple-choice", ("accuracy", "macro_accuracy"), None, ("dev", "test"), source=source,
            read=read, tokenize=tokenize, prompt_format=prompt_format,
            split_rule="MMLU's own files: dev = val/, test = test/, shots from dev/, subjects in file-name order",
            withheld={"train": "MMLU has no training split here; the paper fine-tunes on ShareGPT (--task sharegpt) "
                               "and scores the adapter with evaluate.py RUN --task mmlu --split test --data-dir DIR."})
