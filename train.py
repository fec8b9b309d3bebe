"""Fine-tune a sequence classifier with any initialiser: a plain training loop.

The paper's NLU protocol (Section 4.2): only A, B (and the task head) train, AdamW over
those parameters, a linear schedule with warmup, evaluation on dev after every epoch,
and the best epoch's dev score is the result. The learning rate at step t of T, with
W = warmup_ratio * T warmup steps, is

    lr_t = lr * t / W               for t < W
    lr_t = lr * (T - t) / (T - W)   afterwards (linear decay to 0)

A run directory (default runs/MODEL-TASK-INIT-rRANK-seedSEED) holds config.json, metrics.jsonl,
best/ (the best epoch's adapter), checkpoint-STEP/ with last.json naming the latest (the adapter,
plus the optimizer moments, RNG state and position as one artifact, so that --resume continues
to the same result), and final.json (best epoch, peak memory) once training has ended.

The model, the rank against its shapes and the task files are all checked before the directory
is made, and a run that fails before its first checkpoint leaves nothing behind. Ctrl-C (or
SIGTERM) saves a checkpoint at the next step and exits with 130 (143);
`python train.py --resume --out DIR` continues with the configuration stored in DIR.

Run: python train.py --init beta-kaiming-uniform --epochs 3
     (writes runs/minilm-rotten-tomatoes-beta-kaiming-uniform-r8-seed0)
"""
import argparse
import json
import math
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

import inilora
from common import EXIT_INTERRUPTED, ArtifactError, pick_device, read_artifact, run_cli, save_artifact, write_json
from data.prepare import TASKS, load_split, pad_batch
from evaluate import evaluate
from model import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # bfloat16: autocast, float32 weights
STATE_FORMAT, STATE_VERSION = "inilora-train-state", 1  # a checkpoint's optimizer, RNG and position
HARMLESS = {"log_every", "save_every"}  # settings a --resume may change: they do not change the result


@dataclass
class TrainConfig:
    model: str = "minilm"          # local directory, hub id, or "minilm" (packaged)
    task: str = "rotten-tomatoes"
    glue_dir: str | None = None    # GLUE TSV files (for the GLUE tasks)
    lr: float = 3e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 3
    max_length: int = 512          # truncation; batches are padded to their longest sequence
    seed: int = 0
    dtype: str = "float32"
    log_every: int = 20            # steps between log lines
    save_every: int = 0            # steps between checkpoints (0: once per epoch)

    def validate(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {sorted(TASKS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        for name in ("batch_size", "epochs", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be at least 1.")
        if not (self.lr > 0 and 0 <= self.warmup_ratio < 1 and self.weight_decay >= 0 and self.save_every >= 0):
            raise ValueError(
                f"lr={self.lr}, warmup_ratio={self.warmup_ratio}, weight_decay={self.weight_decay}, "
                f"save_every={self.save_every}: expected lr > 0, 0 <= warmup_ratio < 1, weight_decay >= 0, save_every >= 0."
            )
        return self


def lr_at(step, total, cfg):
    # lr_t = lr * t / W before warmup ends, then lr * (T - t) / (T - W)  (linear schedule)
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * step / warmup
    return cfg.lr * max(0.0, (total - step) / max(1, total - warmup))


def batches(split, order, batch_size, pad_id, device):
    """Yields (input_ids, attention_mask, token_type_ids, labels) in the given example order."""
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size].tolist()
        ids, types, mask = pad_batch([split["input_ids"][j] for j in idx],
                                     [split["token_type_ids"][j] for j in idx], pad_id)  # (B, T) each
        yield ids.to(device), mask.to(device), types.to(device), split["labels"][idx].to(device)


def epoch_order(n, seed, epoch):
    # one permutation per (seed, epoch): the data order needs no state to be restored
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def loss_fn(logits, labels):
    # cross-entropy for classes; mean squared error for regression (num_labels = 1, STS-B)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0].float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


# -----------------------------------------------------------------------------
# checkpoints: written to a new directory, then last.json names it (atomic replace)


def save_checkpoint(run, model, opt, state, lcfg, model_id, fingerprint, extra):
    ckpt = run / f"checkpoint-{state['step']}"
    tmp = run / f"{ckpt.name}.tmp"  # filled completely, then renamed: last.json never names a partial one
    shutil.rmtree(tmp, ignore_errors=True)
    inilora.save_adapter(model, tmp / "adapter.safetensors", lcfg, model_id, fingerprint, extra)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng_cuda"] = torch.cuda.get_rng_state()
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


def restore_state(ckpt, model, opt, device):
    """Optimizer moments, RNG state and position of checkpoint `ckpt` (the adapter is loaded already)."""
    path = ckpt / "state.safetensors"
    tensors, meta = read_artifact(path, STATE_FORMAT, STATE_VERSION,
                                  "This checkpoint cannot be resumed: start a new run with another --out.")
    params = dict(model.named_parameters())
    unknown = sorted({key.rsplit(".", 1)[0] for key in tensors} - params.keys() - {"rng_cpu", "rng_cuda"})
    if unknown:
        raise ArtifactError(f"{str(path)!r} holds optimizer state for {unknown[:3]}, which this model does not "
                            "have: it belongs to another model. Start a new run with another --out.")
    torch.set_rng_state(tensors.pop("rng_cpu"))
    cuda_rng = tensors.pop("rng_cuda", None)
    if cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng)
    for key, value in tensors.items():
        name, slot = key.rsplit(".", 1)
        opt.state[params[name]][slot] = value if slot == "step" else value.to(device)
    return meta["state"]


# -----------------------------------------------------------------------------
# the run directory: named by the configuration, made only once every check has passed


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


def stored_configs(run, argv):
    """(cfg, lcfg) stored in run/config.json, with the flags given beside --resume applied: they
    must agree with it, except the harmless ones (log_every, save_every), which they override."""
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
    unknown = sorted(set(train_saved) - set(asdict(TrainConfig())) | set(lora_saved) - set(dests) - {"seed"})
    if unknown:
        raise ValueError(f"{str(path)!r} holds settings {unknown} that this train.py does not know: it was "
                         "written by another version. Resume it with that version, or start a new run.")
    # the stored values become the defaults: only a flag given on the command line can differ from them
    p = build_parser()
    p.set_defaults(**train_saved, **{dests[k]: ",".join(v) if k == "targets" else v  # a string default is parsed
                                     for k, v in lora_saved.items() if k in dests})
    cfg, lcfg = configs_from_args(p.parse_args(argv))
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


class TrainingDiverged(FloatingPointError):
    """The loss is not finite: the message names the step and what to try."""


class StopRequest:
    """While active, Ctrl-C / SIGTERM asks the loop to save a checkpoint and stop at the next step."""

    def __enter__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def request(self, signum, frame):
        print(f"\nsignal {signum}: stopping after this step (a second Ctrl-C is not needed)", flush=True)
        self.signum = signum


def peak_memory(device):
    """(MiB, what was measured): the peak of CUDA tensor memory, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    import resource  # POSIX: ru_maxrss is in KiB on Linux, in bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "peak resident set size of the process (ru_maxrss)"


# -----------------------------------------------------------------------------
# set-up (every check, before the run directory exists) and the training loop


@dataclass
class Setup:
    """What the loop needs, built and checked before the run directory is made."""
    model: torch.nn.Module
    pad_id: int
    model_id: str
    fingerprint: str
    splits: dict
    opt: torch.optim.Optimizer
    state: dict                    # {"step", "best"}: what a checkpoint's sidecar holds
    extra: dict                    # stored in every adapter sidecar


def build(cfg, lcfg, device, ckpt=None, cache_dir=None):
    """Loads the model and the task's splits, injects the adapters (or loads checkpoint `ckpt`'s),
    and restores its optimizer state: every error a run can meet at its start happens here."""
    task = TASKS[cfg.task]
    model, tokenizer, model_id = load_model(cfg.model, num_labels=task.num_labels, head_seed=cfg.seed)
    splits = {s: load_split(cfg.task, s, tokenizer, cfg.max_length, cfg.glue_dir) for s in ("train", "dev")}
    fingerprint = inilora.base_fingerprint(model, lcfg.targets)
    if ckpt is not None:
        inilora.load_adapter(model, ckpt / "adapter.safetensors", model_id)
    else:
        inilora.inject(model, lcfg, model_id, cache_dir)  # checks the rank against every target's shape
    trainable, total_params = inilora.mark_trainable(model, lcfg)
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    state = restore_state(ckpt, model, opt, device) if ckpt is not None else {"step": 0, "best": None}
    extra = {"task": cfg.task, "num_labels": task.num_labels, "max_length": cfg.max_length,
             "trainable_params": trainable, "total_params": total_params}
    return Setup(model, tokenizer.pad_id, model_id, fingerprint, splits, opt, state, extra)


def train(cfg, lcfg, run, device, s: Setup):
    """The loop. Returns the final state, with "signal" added when a signal stopped it."""
    task, model, opt, state = TASKS[cfg.task], s.model, s.opt, s.state
    n = len(s.splits["train"]["labels"])
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    metrics_path = run / "metrics.jsonl"
    if state["step"] > 0 and metrics_path.exists():  # drop what the interrupted run logged after its checkpoint
        kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= state["step"]]
        metrics_path.write_text("".join(l + "\n" for l in kept))
    print(f"{n} training examples, {steps_per_epoch} steps/epoch, {total} steps; run directory {run}")
    with metrics_path.open("a") as log, StopRequest() as stop:
        while state["step"] < total:
            epoch, done = divmod(state["step"], steps_per_epoch)
            order = epoch_order(n, cfg.seed, epoch)[done * cfg.batch_size:]
            model.train()
            t0, losses = time.perf_counter(), []
            for ids, mask, types, labels in batches(s.splits["train"], order, cfg.batch_size, s.pad_id, device):
                if stop.signum:  # it came during the last step or dev evaluation: save, then stop before this step
                    save_checkpoint(run, model, opt, state, lcfg, s.model_id, s.fingerprint, s.extra)
                    print(f"stopped at step {state['step']}/{total}, saved as {run / ('checkpoint-%d' % state['step'])}"
                          f"; continue with: python train.py --resume --out {shlex.quote(str(run))}", flush=True)
                    return {**state, "signal": stop.signum}
                lr = lr_at(state["step"], total, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                    logits = model(ids, mask, types)  # (B, num_labels)
                loss = loss_fn(logits, labels)
                if not torch.isfinite(loss):
                    kept = (f"the last good checkpoint is named in {run / 'last.json'}"
                            if (run / "last.json").is_file() else "no checkpoint was written yet, so the run is removed")
                    raise TrainingDiverged(
                        f"the loss is {loss.item()} at step {state['step'] + 1} (epoch {epoch + 1}): training "
                        f"diverged. Nothing was saved after it; {kept}. Lower --lr, or train in --dtype float32."
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state["step"] += 1
                losses.append(loss.item())
                if state["step"] % cfg.log_every == 0 or state["step"] % steps_per_epoch == 0:
                    dt = (time.perf_counter() - t0) / len(losses)
                    record = {"step": state["step"], "epoch": epoch + 1, "loss": sum(losses) / len(losses), "lr": lr}
                    print(f"step {state['step']}/{total} | loss {record['loss']:.4f} | lr {lr:.1e} | "
                          f"{1000 * dt:.1f} ms/step | {cfg.batch_size / dt:.0f} samples/s", flush=True)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    t0, losses = time.perf_counter(), []
                if cfg.save_every and state["step"] % cfg.save_every == 0:
                    save_checkpoint(run, model, opt, state, lcfg, s.model_id, s.fingerprint, s.extra)
            # end of an epoch: evaluate on dev, keep the best epoch (the paper's protocol) and the last
            dev = evaluate(model, s.splits["dev"], task, s.pad_id, cfg.batch_size, device)
            print(f"epoch {epoch + 1}/{cfg.epochs} | dev " + " | ".join(f"{k} {v:.4f}" for k, v in dev.items()))
            log.write(json.dumps({"step": state["step"], "epoch": epoch + 1, "dev": dev}) + "\n")
            log.flush()
            score = dev[task.metrics[0]]
            if state["best"] is None or score > state["best"]["score"]:
                state["best"] = {"epoch": epoch + 1, "step": state["step"], "score": score, "dev": dev}
                inilora.save_adapter(model, run / "best" / "adapter.safetensors", lcfg, s.model_id, s.fingerprint,
                                     {**s.extra, "epoch": epoch + 1, "dev": dev})
            save_checkpoint(run, model, opt, state, lcfg, s.model_id, s.fingerprint, s.extra)
    mib, measure = peak_memory(device)
    print(f"best epoch {state['best']['epoch']}: dev {task.metrics[0]} {state['best']['score']:.4f}; "
          f"peak memory {mib:,.0f} MiB ({measure}, this process)")
    write_json(run / "final.json", {"step": state["step"], "best": state["best"], "device": str(device),
                                    "peak_memory_mib": round(mib, 1), "peak_memory_measure": measure})
    return state


# -----------------------------------------------------------------------------
# the command line


def build_parser():
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Fine-tune a classifier with LoRA / IniLoRA / baselines.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="local directory, hub id, or 'minilm' (packaged)")
    p.add_argument("--task", default=d.task, help=f"one of {sorted(TASKS)}")
    p.add_argument("--glue-dir", default=d.glue_dir, help="directory with the GLUE TSV files")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of AdamW")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of steps of linear warmup")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example at most")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data order, head, dropout and adapters")
    p.add_argument("--dtype", default=d.dtype, help=f"one of {sorted(DTYPES)}")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: each epoch)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (None: the first available)")
    p.add_argument("--out", default=None, help="run directory (None: runs/MODEL-TASK-INIT-rRANK-seedSEED)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the configuration stored there")
    inilora.add_lora_args(p)
    return p


def configs_from_args(args):
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())}).validate()
    return cfg, inilora.lora_config_from_args(args, cfg.seed)


def main(argv=None):
    args = build_parser().parse_args(argv)
    ckpt = None
    if args.resume:
        run = Path(args.out) if args.out else default_run_dir(*configs_from_args(args))
        cfg, lcfg = stored_configs(run, argv)
        ckpt = last_checkpoint(run)
    else:
        cfg, lcfg = configs_from_args(args)
        run = Path(args.out) if args.out else default_run_dir(cfg, lcfg)
        if check_new_run_dir(run):
            print(f"{run} holds only the config.json of a run that never started: starting it afresh")
    resolved = {"train": asdict(cfg), "lora": asdict(lcfg)}
    print(f"configuration: {json.dumps(resolved)}")
    torch.manual_seed(cfg.seed)  # the one seed call: dropout (the rest use their own generators)
    device, why = pick_device(args.device)
    print(f"device {device} ({why}), dtype {cfg.dtype}")
    setup = build(cfg, lcfg, device, ckpt, args.cache_dir)
    if ckpt is not None:
        step, best = setup.state["step"], setup.state["best"]
        print(f"resuming {run} from {ckpt.name} at step {step}"
              + (f" (best so far: epoch {best['epoch']}, dev {best['score']:.4f})" if best else ""))
        return train(cfg, lcfg, run, device, setup)
    made = [d for d in (run, *run.parents) if not d.exists()]  # what to remove if it fails at once
    try:
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / "config.json", resolved)
        return train(cfg, lcfg, run, device, setup)
    except BaseException:
        if run.is_dir() and not (run / "last.json").exists():
            remove_failed_start(run, made)
        raise


def cli():
    state = main()
    if state.get("signal"):  # stopped by a signal: non-zero, so `train.py ... && evaluate.py ...` stops here
        raise SystemExit(EXIT_INTERRUPTED if state["signal"] == signal.SIGINT else 128 + state["signal"])


if __name__ == "__main__":
    run_cli(cli)
