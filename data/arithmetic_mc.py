"""arithmetic-mc: an offline multiple-choice task in MMLU's layout, for SmolLM2 on a CPU (MMLU itself is
not bundled). Four subjects, each a reasoning-gym generator with integer answers:

    chain sums                 chain_sum (2-3 terms of 1-2 digits), "... 12 + 30 - 7 ="
    greatest common divisors   gcd, "Find the Greatest Common Divisor (GCD) of these numbers: 780, 461. ..."
    least common multiples     lcm, "Find the Least Common Multiple (LCM) of these numbers: 98, 58"
    leg counting               leg_counting, "... how many legs are there in total if you have 12 chickens, ...?"

Each question gets four choices, one right: the answer a and three distractors a + d, d drawn without
replacement from OFFSETS (kept positive when a is), in an order drawn with the right one at a uniform
position; the draws use random.Random(sha256(subject, question)), so the data are the same on every machine.
The prompt, the scoring by the log-likelihood of the answer letters, and the training sequences are
MMLU's (data/mmlu.py), shots from this task's own "shots" split.

Splits: per subject one reasoning-gym dataset (SEED, GENERATED items); each distinct question goes to one
split by a hash,

    bucket = sha256(subject + "\\n" + question) mod 100:  [0, 5) shots, [5, 15) dev, [15, 40) test, else train

and the first SIZES[split] questions of its bucket, in index order, make the split (no question in two
splits). A split lists its subjects in turn (question 1 of each subject, then question 2, ...), so the first
N of a split (--limit, --eval-limit) cover every subject.

    python data/prepare.py --task arithmetic-mc --model smollm2
    python evaluate.py --base --model smollm2 --task arithmetic-mc --split test --out runs/base-smollm2-arithmetic-mc
"""
import hashlib
import importlib.metadata
import random
from functools import lru_cache
from pathlib import Path

from data.mmlu import LETTERS, choice_sequences, prompt_format, question_block
from data.sft import Sequences
from data.task import Examples, Task

# subject -> (reasoning-gym dataset, its parameters)
SUBJECTS = {"chain sums": ("chain_sum", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)),
            "greatest common divisors": ("gcd", {}),
            "least common multiples": ("lcm", {}),
            "leg counting": ("leg_counting", {})}
SEED = 8  # reasoning-gym's seed: item i is drawn with random.Random(SEED + i)
GENERATED = 3000  # items drawn per subject; the splits take the first distinct questions of their bucket
SIZES = {"shots": 5, "dev": 25, "test": 75, "train": 250}  # per subject: x4 subjects
BUCKETS = {"shots": range(0, 5), "dev": range(5, 15), "test": range(15, 40), "train": range(40, 100)}
OFFSETS = (-10, -5, -3, -2, -1, 1, 2, 3, 5, 10)  # distractor = answer + offset


def source(split=None, data_dir=None) -> Path:
    """The data are generated: this file (its parameters) keys the cache, so editing it rebuilds."""
    return Path(__file__).resolve()


def digest(subject, question) -> int:
    return int(hashlib.sha256(f"{subject}\n{question}".encode("utf-8")).hexdigest(), 16)


def choices(subject, question, answer: int) -> tuple[list[str], str]:
    """(four choices as strings, the letter of the right one): distractors answer + d, d from OFFSETS."""
    rng = random.Random(digest(subject, question))
    offsets = [d for d in OFFSETS if answer <= 0 or answer + d > 0]  # a positive answer: positive distractors
    options = [answer + d for d in rng.sample(offsets, len(LETTERS) - 1)]
    right = rng.randrange(len(LETTERS))  # the right answer's position, uniform
    options.insert(right, answer)
    return [str(x) for x in options], LETTERS[right]


@lru_cache(maxsize=1)
def generate() -> dict[str, Examples]:
    """Every split at once: split -> Examples(question blocks, subjects, answer letters), subjects in turn."""
    import reasoning_gym

    per_subject = {}
    for subject, (name, params) in SUBJECTS.items():
        dataset = reasoning_gym.create_dataset(name, size=GENERATED, seed=SEED, **params)
        splits, seen = {s: [] for s in SIZES}, set()
        for i in range(GENERATED):
            item = dataset[i]
            question = item["question"].strip()
            bucket = digest(subject, question) % 100
            split = next(s for s, r in BUCKETS.items() if bucket in r)
            if question in seen or len(splits[split]) == SIZES[split]:
                continue
            seen.add(question)
            options, letter = choices(subject, question, int(item["answer"]))
            splits[split].append((question_block(question, options), subject, letter))
            if all(len(splits[s]) == n for s, n in SIZES.items()):
                break
        else:
            short = {s: len(v) for s, v in splits.items()}
            raise ValueError(f"{GENERATED} {name} items hold only {short} distinct questions for the sizes {SIZES}: "
                             "raise GENERATED in data/arithmetic_mc.py or lower SIZES.")
        per_subject[subject] = splits
    out = {}
    for split, n in SIZES.items():
        rows = [per_subject[subject][split][i] for i in range(n) for subject in SUBJECTS]  # subjects in turn
        out[split] = Examples(*(list(column) for column in zip(*rows)))
    return out


def read(split, data_dir=None) -> Examples:
    """The split's question blocks, subjects and answer letters (data_dir is not used)."""
    return generate()[split]


def tokenize(tokenizer, split, data_dir, max_length, shots) -> Sequences:
    """MMLU's k-shot prompts and answer-letter sequences, the shots from this task's "shots" split."""
    return choice_sequences(tokenizer, read(split), read("shots") if shots else None, max_length, shots)


ARITHMETIC_MC = Task(
    "arithmetic-mc", "multiple-choice", ("accuracy", "macro_accuracy"), None, ("train", "dev", "test"),
    source=source, read=read, tokenize=tokenize, prompt_format=prompt_format,
    split_rule=(f"reasoning-gym {importlib.metadata.version('reasoning-gym')} "
                f"{', '.join(name for name, _ in SUBJECTS.values())} seed {SEED}, first distinct questions of "
                f"sha256(subject, question) % 100: <5 shots, <15 dev, <40 test, else train; per subject {SIZES}; "
                f"distractors answer + {OFFSETS}"),
)
