"""The run directory of train.py: checkpoints, resume, the directory's name and clean-up, signals, memory.

A run directory (default runs/MODEL-TASK-INIT-rRANK-seedSEED) holds config.json, metrics.jsonl,
best/ (the best epoch's adapter), checkpoint-STEP/ with last.json naming the latest, and final.json
once training has ended. A checkpoint is the adapter (inilora's artifact) plus one more lib/artifacts.py
artifact, the optimizer moments, RNG state and position, so that `train.py --resume` continues to
the same result, bit for bit. A checkpoint is written to checkpoint-STEP.tmp and renamed, and only
then does last.json name it: last.json never names a partial checkpoint.

`stored_configs` reads a run's config.json back for --resume, and refuses a flag given beside it that
disagrees with the stored value. Ctrl-C or SIGTERM inside `StopRequest` only sets a flag; the training loop
saves a checkpoint at its next step and exits 130 (143). At the end a run reports its memory
(`memory_report`): the peak it measured (`peak_memory`; on the CPU also the tensor peak of one step,
`TensorPeak`) beside memory.py's estimate.

    python train.py --resume --out runs/smollm2-arithmetic-lora-r8-seed0   (continues a run)
"""
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

import inilora
from lib.artifacts import ArtifactError, read_artifact, save_artifact
from lib.common import write_json

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
    return peak_resident() / 2**20, "peak resident set size of the process (ru_maxrss)"


def peak_resident() -> int:
    """Bytes: the peak resident set of this process so far (POSIX ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_report(peaks, estimated, tokens, device) -> tuple[list[str], dict]:
    """(lines, final.json's fields): the measured peak beside memory.py's estimate made at the start.
    peaks: [((MiB, measure), tensor bytes or None, its step), ...] of every rank (peak_memory, TensorPeak);
    estimated: (the peak, the tensors' peak) in MiB, None off rank 0; tokens: the longest example's."""
    (mib, measure), _, _ = max(peaks, key=lambda p: p[0][0])  # the largest rank's
    ranks = f"the largest of {len(peaks)} processes" if len(peaks) > 1 else "this process"
    lines, fields = [f"peak memory {mib:,.0f} MiB ({measure}, {ranks})"], {
        "peak_memory_mib": round(mib, 1), "peak_memory_measure": measure}
    if estimated is None:
        return lines, fields
    glibc = "; glibc's malloc keeps freed activations in its heap, see memory.py" if device.type != "cuda" else ""
    lines.append(f"memory.py's estimate for this run: {estimated[0]:,.0f} MiB (measured / estimated "
                 f"{mib / estimated[0]:.2f}{glibc})")
    fields["estimated_peak_mib"] = round(estimated[0], 1)
    measured = [(nbytes / 2**20, step) for _, nbytes, step in peaks if nbytes is not None]
    if measured:  # the CPU: tensors alone, in the step of the longest example (TensorPeak)
        tensors, step = max(measured)
        lines.append(f"tensor memory at most {tensors:,.0f} MiB in step {step} (the longest example, {tokens} "
                     f"tokens; TensorPeak); memory.py's estimate of it {estimated[1]:,.0f} MiB (measured / "
                     f"estimated {tensors / estimated[1]:.2f})")
        fields.update(tensor_peak_mib=round(tensors, 1), tensor_peak_step=step,
                      estimated_tensor_peak_mib=round(estimated[1], 1))
    return lines, fields


class TensorPeak:
    """The CPU's counterpart of torch.cuda.max_memory_allocated, measured over the training step that holds
    `example` (train.py passes the longest: the step memory.py sizes its estimate for):

        peak = bytes of the model's parameters and buffers and the optimizer's state when the step starts
               + the most bytes of the tensors allocated during the step alive at once

    The second term comes from c10's CPU allocator itself: torch.profiler with profile_memory reports each
    allocation and each free of a block allocated while it records ("[memory]" events, +/- bytes), so their
    running sum is what the step holds beyond what it started with. It leaves out what glibc's malloc keeps
    after a free, which the resident set (peak_memory) includes. One step is recorded; the others run as
    usual. On CUDA peak_memory is already this measure; off the CPU nothing is recorded."""

    def __init__(self, example: int, device):
        self.example, self.on = example, device.type == "cpu"
        self.bytes = self.step = None  # once measured

    def watching(self, examples, model, opt, step):
        """A context for the step's work (its batches, forward, backward, optimizer step): records it when
        the step holds the example and nothing was measured yet, else does nothing."""
        if not self.on or self.bytes is not None or self.example not in examples:
            return contextlib.nullcontext()
        return self.record(model, opt, step)

    @contextlib.contextmanager
    def record(self, model, opt, step):
        from torch.profiler import ProfilerActivity, profile

        alive = [*model.parameters(), *model.buffers(),
                 *(t for state in opt.state.values() for t in state.values() if torch.is_tensor(t))]
        start = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}.values())
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with quiet_stderr():  # kineto prints a line when recording starts and one when it stops
            prof.start()
        try:
            yield
        finally:
            with quiet_stderr():
                prof.stop()
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        now = most = 0
        for _, nbytes in sorted(events, key=lambda e: e[0]):  # stable: same-instant events keep their order
            now += nbytes
            most = max(most, now)
        self.bytes, self.step = start + most, step


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 goes to /dev/null inside (what C++ libraries print there), back after."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
