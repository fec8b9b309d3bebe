"""The run directory of train.py: checkpoints, resume, the directory's name and clean-up, signals, memory.

A run directory (default runs/MODEL-TASK-INIT-rRANK-seedSEED) holds config.json, metrics.jsonl,
best/ (the best epoch's adapter), checkpoint-STEP/ with last.json naming the latest, and final.json
once training has ended. A checkpoint is the adapter (inilora's artifact) plus one more common.py
artifact, the optimizer moments, RNG state and position, so that `train.py --resume` continues to
the same result, bit for bit. A checkpoint is written to checkpoint-STEP.tmp and renamed, and only
then does last.json name it: last.json never names a partial checkpoint.

`stored_configs` reads a run's config.json back for --resume, and refuses a flag given beside it that
disagrees with the stored value. Ctrl-C or SIGTERM inside `StopRequest` only sets a flag; the training loop saves a checkpoint at its
next step and exits 130 (143).

    python train.py --resume --out runs/smollm2-arithmetic-lora-r8-seed0   (continues a run)
"""
import json
import re
import shlex
import shutil
import signal
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

import inilora
from common import ArtifactError, read_artifact, save_artifact, write_json

STATE_FORMAT, STATE_VERSION = "inilora-train-state", 1  # a checkpoint's optimizer, RNG and position
# settings a --resume may change: they do not change the result (checkpointing recomputes the same values;
# the evaluation batch changes dev scores by float rounding at most)
HARMLESS = {"log_every", "save_every", "grad_checkpointing", "eval_batch_size"}

# -----------------------------------------------------------------------------
# checkpoints: written to a new directory, then last.json names it (atomic replace)


def rng_states():
    """This process's RNG states (CPU; CUDA when there is one): what dropout draws from next."""
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def save_checkpoint(run, model, opt, state, lcfg, model_id, fingerprint, extra, rngs):
    """rngs: [rng_states() of rank 0, of rank 1, ...] (one process: [rng_states()]), stored as rng_cpu,
    rng_cpu.rank1, ..."""
    ckpt = run / f"checkpoint-{state['step']}"
    tmp = run / f"{ckpt.name}.tmp"  # filled completely, then renamed: last.json never names a partial one
    shutil.rmtree(tmp, ignore_errors=True)
    inilora.save_adapter(model, tmp / "adapter.safetensors", lcfg, model_id, fingerprint, extra)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"rng_{kind}" + (f".rank{rank}" if rank else ""): value
               for rank, states in enumerate(rngs) for kind, value in states.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():  # AdamW: step, exp_avg, exp_avg_sq
                tensors[f"{names[id(p)]}.{key}"] = value.detach().cpu().reshape(value.shape).contiguous()
    # optimizer moments and RNG as tensors, the position and best epoch in the sidecar: one artifact
    save_artifact(tmp / "state.safetensors", tensors, {"state": state}, STATE_FORMAT, STATE_VERSION)
    if ckpt.exists():  # this step is saved already (a resume stopped at once): the same state
        shutil.rmtree(tmp)
    else:
        tmp.rename(ckpt)
    write_json(run / "last.json", {"checkpoint": ckpt.name, "step": state["step"]})
    for old in run.glob("checkpoint-*"):  # keep only the newest
        if old != ckpt:
            shutil.rmtree(old, ignore_errors=True)


def last_checkpoint(run):
    pointer = run / "last.json"
    if not pointer.is_file():
        raise FileNotFoundError(f"nothing to resume in {str(run)!r}: it has no last.json, so no checkpoint was "
                                "written. Start the run again without --resume.")
    return run / json.loads(pointer.read_text())["checkpoint"]


def restore_state(ckpt, model, opt, device, rank=0):
    """Optimizer moments, RNG state (rank `rank`'s, under torchrun; left as seeded when the checkpoint has
    none for it) and position of checkpoint `ckpt` (the adapter is loaded already)."""
    path = ckpt / "state.safetensors"
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
    return meta["state"]


# -----------------------------------------------------------------------------
# the run directory: named by the configuration, made only once every check has passed; resumed by it


def default_run_dir(cfg, lcfg):
    """runs/MODEL-TASK-INIT-rRANK-seedSEED, MODEL the last component of a directory or hub id
    (full fine-tuning has no rank)."""
    path = Path(cfg.model).expanduser()
    last = path.resolve().name if path.exists() else cfg.model.rstrip("/\\").rsplit("/", 1)[-1]
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip(".-") or "model"
    rank = "" if lcfg.init == "full" else f"-r{lcfg.rank}"
    return Path("runs") / f"{model}-{cfg.task}-{lcfg.init}{rank}-seed{cfg.seed}"


def check_new_run_dir(run):
    """A new run needs a directory that does not exist yet, is empty, or holds only the
    config.json an earlier version left when its start failed; returns True for the last."""
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {str(run)!r} is a file; pass a directory for the run.")
    content = sorted(p.name for p in run.iterdir()) if run.exists() else []
    if content not in ([], ["config.json"]):
        hint = ("Pass --resume to continue it, or choose another --out." if (run / "last.json").is_file()
                else "It has no checkpoint to resume: choose another --out, or delete it.")
        raise ValueError(f"run directory {str(run)!r} already exists and is not empty; nothing was overwritten. {hint}")
    return content == ["config.json"]


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


def stored_configs(run, argv, resolve, train_defaults):
    """(cfg, lcfg) stored in run/config.json, with the flags given beside --resume applied: they must agree
    with it, except the HARMLESS ones, which they override. resolve(stored flag values) -> (cfg, lcfg) parses
    the command line over the stored values; train_defaults is a default TrainConfig (its known settings)."""
    path = run / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume in {str(run)!r}: it has no config.json. Pass the --out "
                                "directory of an earlier run, or start a new run without --resume.")
    try:
        saved = json.loads(path.read_text())
        train_saved, lora_saved = dict(saved["train"]), dict(saved["lora"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is not a train.py configuration ({type(e).__name__}: {e}): "
                         "restore it, or start a new run with another --out.") from None
    # LoRAConfig field -> the argparse name of its flag (inilora declares each flag beside its field)
    dests = {f.name: f.metadata["flag"].lstrip("-").replace("-", "_") for f in fields(inilora.LoRAConfig)
             if f.metadata.get("flag")}
    unknown = sorted(set(train_saved) - set(asdict(train_defaults)) | set(lora_saved) - set(dests) - {"seed"})
    if unknown:
        raise ValueError(f"{str(path)!r} holds settings {unknown} that this train.py does not know: it was "
                         "written by another version. Resume it with that version, or start a new run.")
    # the stored values become the defaults: only a flag given on the command line can differ from them
    cfg, lcfg = resolve({**train_saved, **{  # a string default is parsed: targets joined
        dests[k]: ",".join(v) if k == "targets" else v for k, v in lora_saved.items() if k in dests}})
    resolved = json.loads(json.dumps({"train": asdict(cfg), "lora": asdict(lcfg)}))  # tuples become lists
    diffs, flags = [], set()
    for section, values in resolved.items():
        for key, value in values.items():
            if key not in HARMLESS and saved[section].get(key) != value:
                flag = "--" + (dests.get(key, "seed") if section == "lora" else key).replace("_", "-")
                how = flag if key in saved[section] else "config.json lacks it: this train.py's default"
                flags |= {flag} if key in saved[section] else set()
                diffs.append(f"{section}.{key}: {saved[section].get(key)!r} -> {value!r} ({how})")
    if diffs:
        advice = (f"Leave out {' '.join(sorted(flags))} to continue with the stored values (python train.py --resume "
                  f"--out {shlex.quote(str(run))})" if flags else "An older train.py wrote it: resume it with that one")
        raise ValueError(f"run directory {str(run)!r} was made with a different configuration ({'; '.join(diffs)}). "
                         f"{advice}, or start a new run with another --out.")
    return cfg, lcfg


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
    import resource  # POSIX: ru_maxrss is in KiB on Linux, in bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "peak resident set size of the process (ru_maxrss)"
