"""code-functions: a CPU-scale code task for SmolLM2-135M, small Python functions with their own unit tests.

Each example is one function drawn from a template (TEMPLATES: one line of description, a one-line body)
with its constants filled in, written the way HumanEval writes its problems: the prompt is the signature
and a docstring with one worked call, the response is the body, and the checks are five assertions on
other inputs, run in the same sandbox as HumanEval (data/humaneval.py, lib/sandbox.py):

    def sum_above_12(nums: list) -> int:                       <- prompt (the question, kind "code")
        \"\"\"Return the sum of the numbers in nums that are greater than 12.
        >>> sum_above_12([3, 15, 20])
        35
        \"\"\"
        return sum(x for x in nums if x > 12)                  <- response (the loss covers it, and EOS)

    def check(candidate):                                      <- checks (the example's label)
        assert candidate([13, 1, 40]) == 53
        ...
    check(sum_above_12)

The expected values are computed by running the reference function here (our own template code, never a
model's). Every function name carries its constants (sum_above_12, clamp_3_20), so none is a HumanEval
entry point (tests/test_code.py checks that) and two examples with one name are one function.

Splits: one list of GENERATED draws (random.Random(SEED + i)); each distinct function goes to one split by a
hash of its name,

    bucket = sha256(name) mod 100:  [0, 15) test, [15, 25) dev, [25, 100) train

so a test function (its template with those constants) is never trained on; the templates are shared.

    python data/prepare.py --task code-functions --model smollm2
"""
import hashlib
import random
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from data.task import Examples, Task

SEED = 20  # draw i uses random.Random(SEED + i)
GENERATED = 20_000  # draws; the splits take the first distinct functions of their bucket
SIZES = {"train": 400, "dev": 40, "test": 100}  # an epoch at batch 8 is ~2 min of SmolLM2 on 2 CPU cores
BUCKETS = {"test": range(0, 15), "dev": range(15, 25), "train": range(25, 100)}  # sha256(name) % 100
CHECKS = 5  # assertions per function
WORDS = ("apple", "bird", "cat", "door", "egg", "fish", "goat", "hat", "ice", "jam", "kite", "lamp", "moon", "nest",
         "owl", "pear", "queen", "rose", "sun", "tree", "umbrella", "van", "wolf", "yak", "zebra", "banana", "cloud",
         "drum", "river", "stone")


# -----------------------------------------------------------------------------
# the templates: {k}, {c}, ... are the constants; `constants` draws them, `call` draws one call's arguments


def ints(rng, n_max=6, lo=-20, hi=50):
    return [rng.randint(lo, hi) for _ in range(rng.randint(1, n_max))]


def letters(rng, extra=""):
    return "".join(rng.choice("abcdefgh" + extra * 3) for _ in range(rng.randint(0, 10)))


def words(rng, extra=""):
    pool = WORDS + ((extra + "ock", extra + "ite") if extra else ())
    return [rng.choice(pool) for _ in range(rng.randint(0, 6))]


@dataclass(frozen=True)
class Template:
    name: str  # the function's name, e.g. "sum_above_{k}"
    signature: str  # "(nums: list) -> int"
    doc: str  # the docstring's first line
    body: str  # the reference body, one line
    constants: Callable[[random.Random], dict]  # draws the constants
    call: Callable[[random.Random, dict], tuple]  # draws one call's arguments, given the constants


def letter(rng):
    return {"c": rng.choice(string.ascii_lowercase)}


TEMPLATES = (
    Template("add_{k}", "(x: int) -> int", "Return x plus {k}.", "return x + {k}",
             lambda r: {"k": r.randint(2, 99)}, lambda r, c: (r.randint(-50, 50),)),
    Template("times_{k}", "(x: int) -> int", "Return x multiplied by {k}.", "return x * {k}",
             lambda r: {"k": r.randint(2, 30)}, lambda r, c: (r.randint(-20, 20),)),
    Template("count_{c}", "(s: str) -> int", "Return how many times the letter '{c}' occurs in s.",
             "return s.count('{c}')", letter, lambda r, c: (letters(r, c["c"]),)),
    Template("sum_above_{k}", "(nums: list) -> int", "Return the sum of the numbers in nums that are greater than {k}.",
             "return sum(x for x in nums if x > {k})", lambda r: {"k": r.randint(0, 40)}, lambda r, c: (ints(r),)),
    Template("count_below_{k}", "(nums: list) -> int", "Return how many numbers in nums are smaller than {k}.",
             "return sum(1 for x in nums if x < {k})", lambda r: {"k": r.randint(0, 40)}, lambda r, c: (ints(r),)),
    Template("repeat_{k}", "(s: str) -> str", "Return s repeated {k} times.", "return s * {k}",
             lambda r: {"k": r.randint(2, 9)}, lambda r, c: (letters(r)[:4],)),
    Template("starting_with_{c}", "(words: list) -> list", "Return the words of the list that start with '{c}', "
             "in order.", "return [w for w in words if w.startswith('{c}')]", letter,
             lambda r, c: (words(r, c["c"]),)),
    Template("multiples_of_{k}", "(nums: list) -> list", "Return the numbers in nums that are divisible by {k}, "
             "in order.", "return [x for x in nums if x % {k} == 0]", lambda r: {"k": r.randint(2, 12)},
             lambda r, c: (ints(r, 8, 0, 60),)),
    Template("is_multiple_of_{k}", "(n: int) -> bool", "Return True if n is divisible by {k}, else False.",
             "return n % {k} == 0", lambda r: {"k": r.randint(2, 15)},
             lambda r, c: (c["k"] * r.randint(0, 9) + r.choice((0, 0, 1, 2)),)),
    Template("clamp_{lo}_{hi}", "(x: int) -> int", "Return x limited to the range from {lo} to {hi}: {lo} if x is "
             "smaller, {hi} if x is larger.", "return max({lo}, min({hi}, x))",
             lambda r: (lambda lo: {"lo": lo, "hi": lo + r.randint(5, 50)})(r.randint(0, 20)),
             lambda r, c: (r.randint(c["lo"] - 20, c["hi"] + 20),)),
    Template("last_{k}", "(items: list) -> list", "Return the last {k} items of the list (all of them if it has "
             "fewer).", "return items[-{k}:]", lambda r: {"k": r.randint(1, 9)}, lambda r, c: (ints(r, 12),)),
    Template("power_{k}", "(nums: list) -> list", "Return each number of nums raised to the power {k}.",
             "return [x ** {k} for x in nums]", lambda r: {"k": r.randint(2, 5)}, lambda r, c: (ints(r, 5, -9, 9),)),
    Template("replace_{a}_with_{b}", "(s: str) -> str", "Return s with every '{a}' replaced by '{b}'.",
             "return s.replace('{a}', '{b}')",
             lambda r: dict(zip("ab", r.sample(string.ascii_lowercase, 2))), lambda r, c: (letters(r, c["a"]),)),
    Template("shift_{k}", "(nums: list) -> list", "Return a list with {k} added to each number of nums.",
             "return [x + {k} for x in nums]", lambda r: {"k": r.randint(1, 99)}, lambda r, c: (ints(r),)),
    Template("longer_than_{k}", "(words: list) -> list", "Return the words longer than {k} characters, in order.",
             "return [w for w in words if len(w) > {k}]", lambda r: {"k": r.randint(1, 7)},
             lambda r, c: (words(r),)),
)


# -----------------------------------------------------------------------------
# one function: prompt, body, checks


def call_text(name, args):
    return f"{name}({', '.join(map(repr, args))})"


def function(template: Template, constants: dict, rng: random.Random):
    """(name, prompt, body, checks) of one template with its constants; expected values from the reference."""
    name = template.name.format(**constants)
    body = "    " + template.body.format(**constants)
    reference = {}
    exec(f"def {name}{template.signature}:\n{body}\n", reference)  # our own template code, not a model's
    calls = [template.call(rng, constants) for _ in range(CHECKS + 1)]  # the first is the docstring's example
    shown, *checked = [(args, reference[name](*args)) for args in calls]
    prompt = (f"def {name}{template.signature}:\n    \"\"\"{template.doc.format(**constants)}\n"
              f"    >>> {call_text(name, shown[0])}\n    {shown[1]!r}\n    \"\"\"\n")
    checks = "def check(candidate):\n" + "".join(f"    assert candidate{call_text('', args)} == {result!r}\n"
                                                 for args, result in checked) + f"\ncheck({name})\n"
    return name, prompt, body, checks


def name_split(name: str) -> str:
    # bucket = sha256(name) mod 100: [0, 15) test, [15, 25) dev, [25, 100) train
    bucket = int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16) % 100
    return next(split for split, r in BUCKETS.items() if bucket in r)


@lru_cache(maxsize=1)
def generate() -> dict[str, Examples]:
    """Every split at once: split -> Examples(prompts, bodies, checks), the first distinct functions of its bucket."""
    splits = {s: Examples([], [], []) for s in SIZES}
    seen = set()
    for i in range(GENERATED):
        rng = random.Random(SEED + i)
        template = rng.choice(TEMPLATES)
        constants = template.constants(rng)
        name = template.name.format(**constants)
        split = name_split(name)
        if name in seen or len(splits[split].texts) == SIZES[split]:
            continue
        seen.add(name)
        _, prompt, body, checks = function(template, constants, rng)
        splits[split].texts.append(prompt)
        splits[split].pairs.append(body)
        splits[split].labels.append(checks)
        if all(len(splits[s].texts) == n for s, n in SIZES.items()):
            return splits
    short = {s: len(e.texts) for s, e in splits.items()}
    raise ValueError(f"{GENERATED} draws hold only {short} distinct functions for the sizes {SIZES}: add templates "
                     "or widen their constants in data/code_functions.py, or lower SIZES.")


def source(split=None, data_dir=None) -> Path:
    """The data are generated: this file (its templates) keys the cache, so editing it rebuilds."""
    return Path(__file__).resolve()


def read(split, data_dir=None) -> Examples:
    """The split's prompts, reference bodies and checks (data_dir is not used)."""
    return generate()[split]


CODE_FUNCTIONS = Task(
    "code-functions", "code", ("pass@1",), None, tuple(SIZES), source=source, read=read,
    split_rule=(f"{len(TEMPLATES)} templates, draws random.Random({SEED} + i), first distinct function names of "
                f"sha256(name) % 100: <15 test, <25 dev, else train; sizes {SIZES}"),
)
