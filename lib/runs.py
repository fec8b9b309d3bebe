"""The run directory of train.py: the one module that knows its layout, spells its file names, and reads and
writes it; it knows nothing of IniLoRA (what an adapter holds is the caller's `write_adapter`).

    RUN/config.json          the resolved configuration (written when the run starts)
    RUN/metrics.jsonl        one JSON record per log line and per dev evaluation
    RUN/best/                the best epoch's adapter (adapter.safetensors + adapter.json)
    RUN/checkpoint-STEP/     the latest checkpoint: the adapter and state.safetensors (optimizer, RNG, position)
    RUN/last.json            names the latest checkpoint
    RUN/final.json           once training has ended: steps, best epoch, device, measured peak memory

A checkpoint is written to checkpoint-STEP.tmp and renamed, and only then does last.json name it: last.json
never names a partial checkpoint, and `train.py --resume` continues from it to the same result, bit for bit.
`stored_configs` reads a run's config.json back for --resume, and refuses a flag given beside it that
disagrees with the stored value. Ctrl-C or SIGTERM inside `StopRequest` only sets a flag; the training loop
saves a checkpoint at its next step and exits 130 (143).

    python train.py --resume --out runs/smollm2-arithmetic-lora-r8-seed0   (continues a run)
"""
import json
import re
import shlex
import shutil
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from lib.artifacts import ArtifactError, read_artifact, save_artifact
from lib.common import write_json

STATE_FORMAT, STATE_VERSION = "inilora-train-state", 1  # a checkpoint's optimizer, RNG and position
# settings a --resume may change, because they do not change the result (checkpointing recomputes the same
# values; the evaluation batch and the CPU thread count change results by float rounding at most)
RESUME_MAY_CHANGE = {"log_every", "save_every", "grad_checkpointing", "eval_batch_size", "threads"}

# -----------------------------------------------------------------------------
# the layout: every name in the run directory, spelled here only

CONFIG, METRICS, BEST, LAST, FINAL = "config.json", "metrics.jsonl", "best", "last.json", "final.json"
ADAPTER, STATE = "adapter.safetensors", "state.safetensors"


def config_file(run) -> Path:
    return Path(run) / CONFIG


def metrics_file(run) -> Path:
    return Path(run) / METRICS


def best_adapter(run) -> Path:
    return Path(run) / BEST / ADAPTER


def final_file(run) -> Path:
    return Path(run) / FINAL


def checkpoint_dir(run, step) -> Path:
    return Path(run) / f"checkpoint-{step}"


def has_checkpoint(run) -> bool:
    return (Path(run) / LAST).is_file()


def started(run):
    """Whether train.py's loop ever ran in `run`: it opens metrics.jsonl first and then writes checkpoints.
    A directory with config.json alone is the leftover of a start that failed (train.py no longer leaves one)."""
    return metrics_file(run).is_file() or has_checkpoint(run)


def append_record(log, record):
    """One line of metrics.jsonl (`log` is the open file, or os.devnull's off rank 0), flushed at once."""
    log.write(json.dumps(record) + "\n")
    log.flush()


def keep_records_until(run, step):
    """Drops the metrics.jsonl records logged after `step` (a resumed run logs them again)."""
    path = metrics_file(run)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))

# -----------------------------------------------------------------------------
# checkpoints: written to a new directory, then last.json names it (atomic replace)


def rng_states():
    """This process's RNG states (CPU; CUDA when there is one): what dropout draws from next."""
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def save_checkpoint(run, write_adapter, model, opt, state, rngs, progress=None):
    """Checkpoint state["step"]: the adapter (`write_adapter(path)` writes it) and the optimizer moments, RNG
    states and position. rngs: [rng_states() of rank 0, of rank 1, ...] (one process: [rng_states()]), stored
    as rng_cpu, rng_cpu.rank1, ... `progress` (the run's seconds and peak memory so far, across resumes) goes
    in the sidecar beside the state, so a resumed run's final.json describes the whole run."""
    ckpt = checkpoint_dir(run, state["step"])
    tmp = run / f"{ckpt.name}.tmp"  # filled completely, then renamed: last.json never names a partial one
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(tmp / ADAPTER)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"rng_{kind}" + (f".rank{rank}" if rank else ""): value
               for rank, states in enumerate(rngs) for kind, value in states.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():  # AdamW: step, exp_avg, exp_avg_sq
                tensors[f"{names[id(p)]}.{key}"] = value.detach().cpu().reshape(value.shape).contiguous()
    # optimizer moments and RNG as tensors, the position and best epoch in the sidecar: one artifact
    save_artifact(tmp / STATE, tensors, {"state": state, "progress": progress or {}}, STATE_FORMAT, STATE_VERSION)
    if ckpt.exists():  # this step is saved already (a resume stopped at once): the same state
        shutil.rmtree(tmp)
    else:
        tmp.rename(ckpt)
    write_json(run / LAST, {"checkpoint": ckpt.name, "step": state["step"]})
    for old in run.glob("checkpoint-*"):  # keep only the newest
        if old != ckpt:
            shutil.rmtree(old, ignore_errors=True)


def last_checkpoint(run):
    """The directory of the checkpoint last.json names."""
    pointer = run / LAST
    if not pointer.is_file():
        raise FileNotFoundError(f"nothing to resume in {str(run)!r}: it has no last.json, so no checkpoint was "
                                "written. Start the run again without --resume.")
    return run / json.loads(pointer.read_text())["checkpoint"]


def restore_state(ckpt, model, opt, device, rank=0):
    """Optimizer moments, RNG state (rank `rank`'s, under torchrun; left as seeded when the checkpoint has
    none for it) and position of checkpoint `ckpt` (the adapter is loaded already). Returns (state, progress)."""
    path = ckpt / STATE
    tensors, meta = read_artifact(path, STATE_FORMAT, STATE_VERSION,
                                  "This checkpoint cannot be resumed: start a new run with another --out.")
    params = dict(model.named_parameters())
    rng = {key: tensors.pop(key) for key in [k for k in tensors if k.startswith("rng_")]}
    unknown = sorted({key.rsplit(".", 1)[0] for key in tensors} - params.keys())
    if unknown:
        raise ArtifactError(f"{str(path)!r} holds optimizer state for {unknown[:3]}, which this model does not "
                            "have: it belongs to another model. Start a new run with another --out.")
    suffix = f".rank{rank}" if rank else ""
    if f"rng_cpu{suffix}" in rng:
        torch.set_rng_state(rng[f"rng_cpu{suffix}"])
    if f"rng_cuda{suffix}" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng[f"rng_cuda{suffix}"])
    for key, value in tensors.items():
        name, slot = key.rsplit(".", 1)
        opt.state[params[name]][slot] = value if slot == "step" else value.to(device)
    return meta["state"], meta.get("progress", {})


# -----------------------------------------------------------------------------
# the run directory: named by the configuration, made only once every check has passed; resumed by it


def default_run_dir(model, task, method, seed):
    """runs/MODEL-TASK-METHOD-seedSEED, MODEL the last component of a directory or hub id, METHOD e.g. lora-r8."""
    path = Path(model).expanduser()
    last = path.resolve().name if path.exists() else model.rstrip("/\\").rsplit("/", 1)[-1]
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip(".-") or "model"
    return Path("runs") / f"{model}-{task}-{method}-seed{seed}"


def check_new_run_dir(run):
    """A new run needs a directory that does not exist yet, is empty, or holds only the
    config.json an earlier version left when its start failed; returns True for the last."""
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {str(run)!r} is a file; pass a directory for the run.")
    content = sorted(p.name for p in run.iterdir()) if run.exists() else []
    if content not in ([], [CONFIG]):
        hint = ("Pass --resume to continue it, or choose another --out." if has_checkpoint(run)
                else "It has no checkpoint to resume: choose another --out, or delete it.")
        raise ValueError(f"run directory {str(run)!r} already exists and is not empty; nothing was overwritten. {hint}")
    return content == [CONFIG]


def remove_failed_start(run, made):
    """Removes what a run that stopped before its first checkpoint wrote: the directories it made,
    or, in a directory that was there before, only its content."""
    if run not in made:
        for p in run.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    shutil.rmtree(run, ignore_errors=True)
    for parent in made[1:]:
        try:
            parent.rmdir()  # only while empty: never another run's files
        except OSError:
            break
    print(f"removed {run}: the run stopped before its first checkpoint, so there is nothing to resume")


def stored_configs(run, resolve, train_defaults, lora_flags, launcher="python train.py", lora_defaults=None):
    """(cfg, lora_cfg) stored in run/config.json, with the flags given beside --resume applied: they must agree
    with it, except the RESUME_MAY_CHANGE ones, which they override. resolve(stored flag values) ->
    (cfg, lora_cfg) parses the command line over the stored values; train_defaults is a default TrainConfig
    (its known settings); lora_flags maps each LoRA setting that has a flag to its argparse name; lora_defaults
    the default LoRA settings. A setting added after the run was made (missing from its config.json) resumes at its
    default, which by this project's rule is what train.py did before the setting existed (rslora False, ...)."""
    path = config_file(run)
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume in {str(run)!r}: it has no config.json. Pass the --out "
                                "directory of an earlier run, or start a new run without --resume.")
    try:
        saved = json.loads(path.read_text())
        train_saved, lora_saved = dict(saved["train"]), dict(saved["lora"])
        # --glue-dir was renamed --data-dir: a run stored before the rename resumes as it was
        if "glue_dir" in train_saved:
            train_saved["data_dir"] = train_saved.pop("glue_dir")
            saved["train"] = dict(train_saved)
            saved["train"] = dict(train_saved)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is not a train.py configuration ({type(e).__name__}: {e}): "
                         "restore it, or start a new run with another --out.") from None
    dests = lora_flags
    unknown = sorted(set(train_saved) - set(asdict(train_defaults)) | set(lora_saved) - set(dests) - {"seed"})
    if unknown:
        raise ValueError(f"{str(path)!r} holds settings {unknown} that this train.py does not know: it was "
                         "written by another version. Resume it with that version, or start a new run.")
    # the stored values become the defaults: only a flag given on the command line can differ from them
    cfg, lora_cfg = resolve({**train_saved, **{  # a string default is parsed: targets joined
        dests[k]: ",".join(v) if k == "targets" else v for k, v in lora_saved.items() if k in dests}})
    resolved = json.loads(json.dumps({"train": asdict(cfg), "lora": asdict(lora_cfg)}))  # tuples become lists
    defaults = json.loads(json.dumps({"train": asdict(train_defaults), "lora": lora_defaults or {}}))
    diffs, flags = [], set()
    for section, values in resolved.items():
        for key, value in values.items():
            if key not in saved[section] and key in defaults[section] and value == defaults[section][key]:
                continue  # a setting newer than the run, at its default: the run did what the default does
            if key not in RESUME_MAY_CHANGE and saved[section].get(key) != value:
                flag = "--" + (dests.get(key, "seed") if section == "lora" else key).replace("_", "-")
                how = flag if key in saved[section] else "config.json lacks it: this train.py's default"
                flags |= {flag} if key in saved[section] else set()
                diffs.append(f"{section}.{key}: {saved[section].get(key)!r} -> {value!r} ({how})")
    if diffs:
        advice = (f"Leave out {' '.join(sorted(flags))} to continue with the stored values ({launcher} --resume "
                  f"--out {shlex.quote(str(run))})" if flags else "An older train.py wrote it: resume it with that one")
        raise ValueError(f"run directory {str(run)!r} was made with a different configuration ({'; '.join(diffs)}). "
                         f"{advice}, or start a new run with another --out.")
    return cfg, lora_cfg


# -----------------------------------------------------------------------------
# reading a run: its adapter, its settings, its best epoch


def read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({e}): the file is damaged. "
                         "Train the run again, or restore the file.") from None



def find_adapter(path, checkpoint=None):
    """(adapter file, its run directory or None) for a run directory (train.py's --out) or an adapter file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; pass a run directory written by train.py "
                                "(it holds config.json) or an adapter file such as RUN/best/adapter.safetensors.")
    if path.is_file():
        if path.suffix != ".safetensors" or not path.with_suffix(".json").is_file():
            raise ValueError(f"{str(path)!r} is not an adapter: an adapter is a .safetensors file with a .json "
                             "sidecar beside it (e.g. RUN/best/adapter.safetensors). Pass that file or the run directory.")
        if checkpoint is not None:
            raise ValueError(f"--checkpoint {checkpoint} picks an adapter inside a run directory, but {str(path)!r} "
                             "is already an adapter file: drop --checkpoint, or pass the run directory.")
        return path, None
    if not config_file(path).is_file():
        raise ValueError(f"{str(path)!r} is neither a run directory (it has no config.json) nor an adapter file; "
                         "pass train.py's --out directory (e.g. runs/minilm-rotten-tomatoes-lora-r8-seed0) or an adapter .safetensors.")
    if not started(path):
        raise FileNotFoundError(f"run directory {str(path)!r} never started: it holds a config.json but no checkpoint "
                                "or metrics (an older train.py left it when its start failed). Delete it and train again.")
    if checkpoint in (None, "best"):
        adapter = best_adapter(path)
        if not adapter.is_file():
            raise FileNotFoundError(
                f"run directory {str(path)!r} has no best/adapter.safetensors: training has not finished an epoch "
                "yet (the best adapter is saved after each epoch's dev evaluation). Wait for the first epoch, or "
                "evaluate the latest checkpoint with --checkpoint last.")
        return adapter, path
    if not has_checkpoint(path):
        raise FileNotFoundError(f"run directory {str(path)!r} has no last.json: no checkpoint was written yet. "
                                "Wait for the end of the first epoch (or --save-every steps).")
    adapter = path / read_json(path / LAST, "checkpoint pointer").get("checkpoint", "?") / ADAPTER
    if not adapter.is_file():
        raise FileNotFoundError(f"{str(path / LAST)!r} names {str(adapter)!r}, which does not exist: the "
                                "run directory is incomplete. Use --checkpoint best, or resume the training.")
    return adapter, path



def adapter_settings(adapter, run):
    """task, max_length, model, data_dir, shots and max_new_tokens (None unless recorded) to evaluate `adapter`
    with: from its sidecar, else config.json."""
    meta = read_json(adapter.with_suffix(".json"), "adapter sidecar")
    train = read_json(config_file(run), "run configuration").get("train", {}) if run else {}
    s = {"task": meta.get("task", train.get("task")), "max_length": meta.get("max_length", train.get("max_length")),
         "model": meta.get("model_id", train.get("model")),
         "data_dir": train.get("data_dir", train.get("glue_dir")),  # glue_dir: its name in runs made before 2026-12
         "shots": train.get("shots"),  # multiple-choice tasks; runs made before 2026-12 do not record it
         "max_new_tokens": train.get("max_new_tokens")}  # generation tasks: what the run's dev scores used
    if None in (s["task"], s["max_length"], s["model"]):
        raise ValueError(f"{str(adapter)!r} does not record its task, max_length and base model (got {s}): it was "
                         "not saved by train.py. Pass the run directory that train.py wrote instead.")
    return s






def best_dev(run, first):
    """The dev record of the best epoch in RUN/metrics.jsonl: the largest `first` metric, the earliest
    epoch on ties (as train.py keeps it). None if no epoch has been evaluated yet."""
    metrics_path = metrics_file(run)
    if not metrics_path.is_file():
        return None
    text, best = metrics_path.read_text(), None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        try:
            dev = json.loads(line).get("dev")
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break  # the line train.py is writing right now
            raise ValueError(f"{metrics_path}:{number} is not valid JSON: the log is damaged. "
                             "Leave this run out of --compare, or train it again.") from None
        if dev is not None and first not in dev:
            raise ValueError(f"{metrics_path}:{number} has dev metrics {sorted(dev)} but no {first!r}, the "
                             "metric that picks the best epoch: was it trained on another task?")
        if dev is not None and (best is None or dev[first] > best[first]):
            best = dev
    return best


# -----------------------------------------------------------------------------
# stopping: a diverged loss, a signal; and the peak memory final.json reports


class TrainingDiverged(FloatingPointError):
    """The loss is not finite: the message names the step and what to try."""


class StopRequest:
    """While active, Ctrl-C / SIGTERM only records the signal (and prints `say`, if given): the loop that
    asked saves a checkpoint and stops at its next step (train.py), or passes it on (sweep.py)."""

    def __init__(self, say=None):
        self.say = say

    def __enter__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def request(self, signum, frame):
        if self.say:
            print(f"\nsignal {signum}: {self.say}", flush=True)
        self.signum = signum


def peak_memory(device):
    """(MiB, what was measured): the peak of CUDA tensor memory, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    return peak_resident() / 2**20, "peak resident set size of the process (ru_maxrss)"


def peak_resident() -> int:
    """Bytes: the peak resident set of this process so far (POSIX ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
