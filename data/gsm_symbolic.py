"""gsm-symbolic: GSM8K-style word problems from reasoning-gym's `gsm_symbolic` generator.

reasoning-gym turns GSM8K test problems into templates (names, items and numbers drawn at
random); `tasks_ok` lists the 85 usable ones. Each item's metadata holds a worked solution
ending '#### N' (`answer_cot`), which is the response; the gold answer is N.

Splits, all from one reasoning-gym dataset (SEED, GENERATED items; item i uses template
`dataset.task_indices[i]`), so the data are the same on every machine:

    held out(template) = sha256("gsm-symbolic template {id}") mod 100 < 15
                       -> templates 8, 11, 12, 16, 23, 24, 26, 45, 54, 72 (10 of 85)
    test              : the first 200 items of held-out templates (unseen templates)
    train             : the first 2000 items of the other templates whose question falls in
                        sha256(question) mod 10 != 0
    test-in-template  : the first 200 items of the other templates with sha256(question) mod 10 == 0
                        (the training templates, but none of the training questions)

A question is never repeated within or across splits. Generating all three takes well under a
second (the tests time it).

    python data/prepare.py --task gsm-symbolic --model smollm2
"""
import hashlib
import importlib.metadata
from functools import lru_cache
from pathlib import Path

from data.sft import normalize_number
from data.task import Examples, Task

SEED = 8  # reasoning-gym's seed: item i is drawn with random.Random(SEED + i)
GENERATED = 20_000  # items available; the splits take the first ones that fit
SIZES = {"train": 2000, "test": 200, "test-in-template": 200}
HELD_OUT_PERCENT = 15  # templates whose hash mod 100 is below this are test-only


def source(split=None, data_dir=None) -> Path:
    """The data are generated: this file (its parameters) keys the cache, so editing it rebuilds."""
    return Path(__file__).resolve()


def held_out(template: int) -> bool:
    # held out(template) = sha256("gsm-symbolic template {id}") mod 100 < 15
    digest = hashlib.sha256(f"gsm-symbolic template {template}".encode()).hexdigest()
    return int(digest, 16) % 100 < HELD_OUT_PERCENT


def item_split(template: int, question: str) -> str:
    if held_out(template):
        return "test"
    in_template_test = int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % 10 == 0
    return "test-in-template" if in_template_test else "train"


@lru_cache(maxsize=1)
def generate() -> tuple[dict[str, Examples], dict[str, list[int]]]:
    """(split -> Examples(questions, responses, answers), split -> template id of each example)."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=GENERATED, seed=SEED)
    splits = {s: Examples([], [], []) for s in SIZES}
    templates = {s: [] for s in SIZES}
    seen = set()
    for i in range(GENERATED):
        template = dataset.task_indices[i]
        if held_out(template) and len(splits["test"].texts) == SIZES["test"]:
            continue  # known from the template alone: no need to generate the item
        item = dataset[i]
        split = item_split(template, item["question"])
        if item["question"] in seen or len(splits[split].texts) == SIZES[split]:
            continue
        seen.add(item["question"])
        response = item["metadata"]["answer_cot"]
        if normalize_number(response.rsplit("####", 1)[-1]) != normalize_number(str(item["answer"])):
            raise ValueError(f"gsm_symbolic item {i} (template {template}) ends its solution with "
                             f"{response[-30:]!r}, not '#### {item['answer']}'; reinstall the pinned reasoning-gym.")
        splits[split].texts.append(item["question"])
        splits[split].pairs.append(response)
        splits[split].labels.append(str(item["answer"]))
        templates[split].append(template)
        if all(len(splits[s].texts) == n for s, n in SIZES.items()):
            return splits, templates
    short = {s: len(e.texts) for s, e in splits.items()}
    raise ValueError(f"{GENERATED} gsm_symbolic items fill only {short} of the sizes {SIZES}; "
                     "raise GENERATED in data/gsm_symbolic.py.")


def read(split, data_dir=None) -> Examples:
    """The split's questions, worked solutions and gold answers (data_dir is not used)."""
    return generate()[0][split]


GSM_SYMBOLIC = Task(
    "gsm-symbolic", "generation", ("exact_match",), None, tuple(SIZES), source=source, read=read,
    answer_format="gsm8k",
    split_rule=(f"reasoning-gym {importlib.metadata.version('reasoning-gym')} gsm_symbolic seed {SEED}; "
                f"templates with sha256('gsm-symbolic template ID') % 100 < {HELD_OUT_PERCENT} are test only; "
                "the other templates' questions with sha256(question) % 10 == 0 are test-in-template, the rest "
                f"train; first distinct questions, sizes {SIZES}"),
)
