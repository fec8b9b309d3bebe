"""Fine-tune a sequence classifier with any initialiser: a plain training loop.

The paper's NLU protocol (Section 4.2): only A, B (and the task head) train, AdamW over
those parameters, a linear schedule with warmup, evaluation on dev after every epoch,
and the best epoch's dev score is the result. The learning rate at step t of T, with
W = warmup_ratio * T warmup steps, is

    lr_t = lr * t / W               for t < W
    lr_t = lr * (T - t) / (T - W)   afterwards (linear decay to 0)

A run directory holds config.json, metrics.jsonl, best/ (the best epoch's adapter),
and checkpoint-STEP/ with last.json naming the latest: the adapter plus the optimizer
moments, RNG state and position, so that --resume continues to the same result.

Run: python train.py --init beta-kaiming-uniform --epochs 3
"""
import argparse
import json
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import inilora
from data.prepare import TASKS, load_split, pad_batch
from evaluate import evaluate
from common import pick_device, run_cli, write_atomic
from model import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # bfloat16: autocast, float32 weights


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
        if not self.lr > 0 or not 0 <= self.warmup_ratio < 1 or self.weight_decay < 0 or self.save_every < 0:
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


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2).encode())


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
    save_file(tensors, tmp / "state.safetensors")
    write_json(tmp / "state.json", state)
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
        raise FileNotFoundError(f"nothing to resume in {str(run)!r}: it has no last.json (no checkpoint was written).")
    return run / json.loads(pointer.read_text())["checkpoint"]


def restore_state(ckpt, model, opt, device):
    """Optimizer moments, RNG state and position of checkpoint `ckpt` (the adapter is loaded already)."""
    tensors = load_file(ckpt / "state.safetensors")
    torch.set_rng_state(tensors.pop("rng_cpu"))
    cuda_rng = tensors.pop("rng_cuda", None)
    if cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng)
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, slot = key.rsplit(".", 1)
        opt.state[params[name]][slot] = value if slot == "step" else value.to(device)
    return json.loads((ckpt / "state.json").read_text())


def prepare_run_dir(run, resolved, resume):
    """A new run needs a new (or empty) directory; --resume needs the same configuration."""
    config_path = run / "config.json"
    resolved = json.loads(json.dumps(resolved))  # compare as stored: tuples become lists
    if resume:
        if not config_path.is_file():
            raise FileNotFoundError(f"nothing to resume in {str(run)!r}: it has no config.json.")
        saved = json.loads(config_path.read_text())
        harmless = {"log_every", "save_every"}
        diffs = [f"{section}.{k}: {saved.get(section, {}).get(k)!r} -> {v!r}"
                 for section in ("train", "lora") for k, v in resolved[section].items()
                 if k not in harmless and saved.get(section, {}).get(k) != v]
        if diffs:
            raise ValueError(
                f"run directory {str(run)!r} was made with a different configuration ({'; '.join(diffs)}). "
                "Resume with the same flags, or start a new run with another --out."
            )
        return
    if run.exists() and any(run.iterdir()):
        raise ValueError(
            f"run directory {str(run)!r} already exists and is not empty; nothing was overwritten. "
            "Pass --resume to continue it, or choose another --out."
        )
    run.mkdir(parents=True, exist_ok=True)
    write_json(config_path, resolved)


class TrainingDiverged(FloatingPointError):
    """The loss is not finite: the message names the step and what to try."""


class StopRequest:
    """Ctrl-C / SIGTERM asks the loop to save a checkpoint and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request)

    def request(self, signum, frame):
        print(f"\nsignal {signum}: stopping after this step (a second Ctrl-C is not needed)")
        self.requested = True


# -----------------------------------------------------------------------------
# the training loop


def train(cfg, lcfg, run, device, resume=False, cache_dir=None):
    task = TASKS[cfg.task]
    model, tokenizer, model_id = load_model(cfg.model, num_labels=task.num_labels, head_seed=cfg.seed)
    splits = {s: load_split(cfg.task, s, tokenizer, cfg.max_length, cfg.glue_dir) for s in ("train", "dev")}
    fingerprint = inilora.base_fingerprint(model, lcfg.targets)
    if resume:
        ckpt = last_checkpoint(run)
        inilora.load_adapter(model, ckpt / "adapter.safetensors", model_id)
    else:
        inilora.inject(model, lcfg, model_id, cache_dir)
    trainable, total_params = inilora.mark_trainable(model, lcfg)
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    state = restore_state(ckpt, model, opt, device) if resume else {"step": 0, "best": None}
    n = len(splits["train"]["labels"])
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    extra = {"task": cfg.task, "num_labels": task.num_labels, "max_length": cfg.max_length,
             "trainable_params": trainable, "total_params": total_params}
    metrics_path = run / "metrics.jsonl"
    if resume and metrics_path.exists():  # drop what the interrupted run logged after its checkpoint
        kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= state["step"]]
        metrics_path.write_text("".join(l + "\n" for l in kept))
    log = metrics_path.open("a")
    stop = StopRequest()
    print(f"{n} training examples, {steps_per_epoch} steps/epoch, {total} steps; run directory {run}")

    while state["step"] < total:
        epoch, done = divmod(state["step"], steps_per_epoch)
        order = epoch_order(n, cfg.seed, epoch)[done * cfg.batch_size:]
        model.train()
        t0, losses = time.perf_counter(), []
        for ids, mask, types, labels in batches(splits["train"], order, cfg.batch_size, tokenizer.pad_id, device):
            lr = lr_at(state["step"], total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                logits = model(ids, mask, types)  # (B, num_labels)
            loss = loss_fn(logits, labels)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss is {loss.item()} at step {state['step'] + 1} (epoch {epoch + 1}): training diverged. "
                    f"Nothing was saved after it; the last good checkpoint is named in {run / 'last.json'}. "
                    "Lower --lr, or train in --dtype float32."
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
                      f"{1000 * dt:.1f} ms/step | {cfg.batch_size / dt:.0f} samples/s")
                log.write(json.dumps(record) + "\n")
                log.flush()
                t0, losses = time.perf_counter(), []
            if stop.requested or (cfg.save_every and state["step"] % cfg.save_every == 0):
                save_checkpoint(run, model, opt, state, lcfg, model_id, fingerprint, extra)
            if stop.requested:
                print(f"stopped at step {state['step']}; continue with --resume --out {run}")
                return state
        # end of an epoch: evaluate on dev, keep the best epoch (the paper's protocol) and the last
        dev = evaluate(model, splits["dev"], task, tokenizer.pad_id, cfg.batch_size, device)
        print(f"epoch {epoch + 1}/{cfg.epochs} | dev " + " | ".join(f"{k} {v:.4f}" for k, v in dev.items()))
        log.write(json.dumps({"step": state["step"], "epoch": epoch + 1, "dev": dev}) + "\n")
        log.flush()
        score = dev[task.metrics[0]]
        if state["best"] is None or score > state["best"]["score"]:
            state["best"] = {"epoch": epoch + 1, "step": state["step"], "score": score, "dev": dev}
            inilora.save_adapter(model, run / "best" / "adapter.safetensors", lcfg, model_id, fingerprint,
                                 {**extra, "epoch": epoch + 1, "dev": dev})
        save_checkpoint(run, model, opt, state, lcfg, model_id, fingerprint, extra)
    log.close()
    print(f"best epoch {state['best']['epoch']}: dev {task.metrics[0]} {state['best']['score']:.4f}")
    return state


def main(argv=None):
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Fine-tune a classifier with LoRA / IniLoRA / baselines.")
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
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--out", default=None, help="run directory (default runs/TASK-INIT-seedSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    inilora.add_lora_args(p)
    args = p.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(d)}).validate()
    lcfg = inilora.lora_config_from_args(args, cfg.seed)
    run = Path(args.out or f"runs/{cfg.task}-{lcfg.init}-seed{cfg.seed}")
    resolved = {"train": asdict(cfg), "lora": asdict(lcfg)}
    print(f"configuration: {json.dumps(resolved)}")
    prepare_run_dir(run, resolved, args.resume)
    torch.manual_seed(cfg.seed)  # the one seed call: dropout (the rest use their own generators)
    device, why = pick_device(args.device)
    print(f"device {device} ({why}), dtype {cfg.dtype}")
    return train(cfg, lcfg, run, device, args.resume, args.cache_dir)


if __name__ == "__main__":
    run_cli(main)
