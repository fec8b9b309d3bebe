"""Fine-tune with any initialiser: one plain training loop for classifiers and causal LMs.

Only A, B (and an encoder's task head) train, AdamW over those parameters, evaluation on dev
after every epoch, and the best epoch's dev score is the result (paper Section 4.2). The task's
kind (data.task.KINDS) picks the model, the batches, the loss and the evaluation, never the loop:

  classification / regression (BERT/RoBERTa, models/encoder.py): cross-entropy (MSE for STS-B) over the
      examples of a step; dev metrics from data.prepare.TASKS.
  generation (LLaMA-family decoders, models/decoder.py): supervised fine-tuning with the token-mean
      cross-entropy over the response tokens of the whole optimizer step (data/sft.py),

          L = sum_b sum_t m_bt CE(logits_b,t-1, x_b,t) / sum_b sum_t m_bt    (m = 1 on response tokens)

      where b runs over all --grad-accum micro-batches of the step, so accumulation equals one big
      batch; dev score = exact match of greedy generations (evaluate.py), on --eval-limit examples.

The learning rate at step t of T, with W = int(warmup_ratio * T) warmup steps, is lr * t / W for
t < W, then (progress p = (t - W) / (T - W))

    linear  lr_t = lr * (1 - p)                         (the NLU protocol; the default)
    cosine  lr_t = lr * 0.5 * (1 + cos(pi * p))          (transformers' cosine schedule, the LLM scripts)

--preset paper-llm is the paper's LLM protocol (PRESETS; flags beside it override it). --dtype bfloat16
keeps the frozen weights and R = W0 - s B0 A0 (computed in float32, rounded once) in bfloat16 and trains
under bf16 autocast, with the adapters, head and optimizer state in float32; the run says at its start
how far rounding R moves the step-0 weights (inilora.report_rounding). --grad-checkpointing recomputes
decoder blocks in backward.

Every check happens before the run directory exists (lib/runs.py: directories, checkpoints, resume,
signals); Ctrl-C saves a checkpoint and exits 130; `python train.py --resume --out DIR` continues.
`torchrun --nproc_per_node N train.py ...` trains data-parallel (lib/distributed.py): the same global batch of
batch_size x grad_accum examples, shared by the N processes; a plain `python train.py` is one process.

Run: python train.py --init beta-kaiming-uniform --epochs 3
         (writes runs/minilm-rotten-tomatoes-beta-kaiming-uniform-r8-seed0)
     python train.py --model smollm2 --task arithmetic --init inilora --epochs 1 --eval-limit 50
"""
import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lib import distributed
import inilora
from tools import memory
from lib.common import EXIT_INTERRUPTED, pick_device, run_cli, write_json
from data.prepare import TASKS, load_split, loss_units, training_batch
from data.sft import IGNORE_INDEX
from models import DEFAULT_TARGETS
from evaluate import dev_scores
from evaluate import load_base as load_base_model
from lib.runs import (StopRequest, TensorPeak, TrainingDiverged, check_new_run_dir, default_run_dir, last_checkpoint,
                  memory_report, peak_memory, remove_failed_start, restore_state, rng_states, save_checkpoint,
                  stored_configs)

# bfloat16: the frozen weights (and R) in bfloat16, bf16 autocast; what trains (adapters, head, full fine-tuning's
# weights) and its optimizer state in float32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEDULES = ("linear", "cosine")
DEFAULT_MODELS = {"generation": "smollm2"}  # --model left out: the packaged decoder, else the packaged encoder
# the paper's LLM protocol (Section 4.2, the authors' MetaMath-style scripts); train and LoRA flags by dest
PRESETS = {"paper-llm": dict(lr=2e-5, warmup_ratio=0.03, schedule="cosine", epochs=3, batch_size=8, grad_accum=8,
                             max_length=512, weight_decay=0.0, lora_alpha=None, lora_dropout=0.0, seed=11)}


@dataclass
class TrainConfig:
    model: str | None = None       # local directory, hub id, "minilm" or "smollm2"; None: by the task's kind
    task: str = "rotten-tomatoes"
    glue_dir: str | None = None    # GLUE TSV files, or the directory / file of the paper's math files
    lr: float = 3e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    batch_size: int = 32           # examples per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step: a step sees batch_size * grad_accum
    epochs: int = 3
    max_length: int = 512          # truncation; batches are padded to their longest sequence
    group_by_length: bool = False  # each step draws examples of similar length (less padding; off: plain shuffle)
    schedule: str = "linear"
    seed: int = 0
    dtype: str = "float32"
    grad_checkpointing: bool = False
    compile: bool = False          # torch.compile the model (opt-in: minutes of compiling, then faster steps)
    eval_batch_size: int | None = None  # dev examples per forward pass; None: 128, generation --batch-size
    eval_limit: int = 0            # generation: score the first N dev examples after each epoch (0: all)
    max_new_tokens: int = 256      # generation: tokens generated per dev example at most
    log_every: int = 20            # steps between log lines
    save_every: int = 0            # steps between checkpoints (0: once per epoch)

    def validate(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {sorted(TASKS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {list(SCHEDULES)}; pass --schedule linear "
                             "(the NLU protocol) or cosine (the LLM protocol).")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={self.eval_batch_size!r} must be at least 1 (or None: the default).")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "log_every", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be at least 1.")
        if not (self.lr > 0 and 0 <= self.warmup_ratio < 1 and self.weight_decay >= 0 and self.save_every >= 0):
            raise ValueError(f"lr={self.lr}, warmup_ratio={self.warmup_ratio}, weight_decay={self.weight_decay}, "
                             f"save_every={self.save_every}: expected lr > 0, 0 <= warmup_ratio < 1, "
                             "weight_decay >= 0, save_every >= 0.")
        if self.eval_limit < 0:
            raise ValueError(f"eval_limit={self.eval_limit} is negative; pass 0 (the whole dev split) or a count.")
        if TASKS[self.task].kind == "generation" and self.model == "minilm":
            raise ValueError(f"task {self.task!r} fine-tunes a causal LM, but --model minilm is an encoder; pass "
                             "--model smollm2 (offline), a decoder's directory or .gguf file, or a Hub id.")
        if self.grad_checkpointing and TASKS[self.task].kind != "generation":
            raise ValueError(f"--grad-checkpointing recomputes decoder blocks, but task {self.task!r} trains an "
                             "encoder; leave the flag out, or pick a generation task.")
        return self


def lr_at(step, total, cfg):
    # lr_t = lr * t / W before warmup ends; then, with p = (t - W) / (T - W),
    # linear: lr * (1 - p) = lr * (T - t) / (T - W);  cosine: lr * 0.5 * (1 + cos(pi * p))
    # W = int(warmup_ratio * T) for both (transformers' Trainer rounds up: at most one warmup step more)
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "cosine":
        p = (step - warmup) / max(1, total - warmup)
        return cfg.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    return cfg.lr * max(0.0, (total - step) / max(1, total - warmup))


# -----------------------------------------------------------------------------
# the objectives: a micro-batch's share of the step's loss (what L is a mean over: data.prepare.loss_units)
# Legend: B examples in a micro-batch, T tokens (the longest in it), V vocabulary, N response tokens.


def loss_fn(logits, labels):
    # cross-entropy for classes; mean squared error for regression (num_labels = 1, STS-B)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0].float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def classification_loss(model, batch, units):
    ids, mask, types, labels = batch
    logits = model(ids, mask, types)  # (B, num_labels)
    # the mean over the micro-batch's B examples, weighted by B / (examples in the step): exactly 1 without
    # accumulation, so the loss and its gradients are those of a plain batch
    return loss_fn(logits, labels) * (len(labels) / units)


def token_loss(logits, targets):
    # sum_n CE(logits_n, x_n) over the N loss tokens: logits (N, V) at positions t - 1, targets x_t (N,)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def sft_loss(model, batch, units):
    ids, mask, labels = batch
    # right padding needs no mask (SDPA's fast causal path): real tokens never attend to the padding after
    # them, their positions are 0..T-1 either way, and no loss token is padding; other padding keeps its mask
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
    h = model.hidden_states(ids, None if right_padded else mask)  # (B, T, C)
    # logits at t - 1 predict token t: lm_head only where m_t = 1, (N, V) instead of (B, T, V)
    predicts = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    logits = model.lm_head(h[:, :-1][predicts])  # (N, C) -> (N, V)
    # L = sum over the micro-batch's response tokens of CE / (response tokens of the whole step)
    return token_loss(logits, labels[:, 1:][predicts]) / units


OBJECTIVES = {False: classification_loss, True: sft_loss}  # Task.generates -> its loss


GROUP_STEPS = 50  # --group-by-length: steps per length-sorted chunk (transformers' mega-batch of 50 batches)


def epoch_order(n, seed, epoch, lengths=None, per_step=1):
    # one permutation per (seed, epoch): the data order needs no state to be restored
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if lengths is None:
        return order
    # --group-by-length (transformers' LengthGroupedSampler): cut the permutation into chunks of 50 steps and
    # sort each chunk by length, longest first; a step then pads to about its own examples' length
    return torch.cat([chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
                      for chunk in order.split(GROUP_STEPS * per_step)])


# -----------------------------------------------------------------------------
# set-up (every check, before the run directory exists) and the training loop


@dataclass
class Setup:
    """What the loop needs, built and checked before the run directory is made."""
    model: torch.nn.Module
    tokenizer: object
    pad_id: int
    model_id: str
    fingerprint: str
    splits: dict
    opt: torch.optim.Optimizer
    state: dict                    # {"step", "best"}: what a checkpoint's sidecar holds
    extra: dict                    # stored in every adapter sidecar
    world: distributed.World = distributed.World()  # torchrun's ranks (one process: rank 0 of 1)
    estimated: tuple | None = None  # memory.py's estimate of (the peak, the tensors' peak), MiB, at the start


def estimate(cfg, lcfg, device, runtime=None):
    """(lines, the peak, the tensors' peak; bytes): memory.py's estimate of this run (its --dry-run)."""
    return memory.dry_run(cfg.model, cfg.task, lcfg.init, lcfg.rank, lcfg.targets, cfg.batch_size, cfg.max_length,
                          cfg.dtype, cfg.grad_checkpointing, device.type, cfg.glue_dir, runtime=runtime)


def compile_model(model, device):
    """torch.compile in place (nn.Module.compile): parameter names, and so adapters and checkpoints, unchanged.
    Each new batch shape compiles anew until torch marks the length dynamic (the second shape)."""
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        raise RuntimeError("--compile on the CPU needs a C++ compiler (torch.compile's inductor writes C++), and "
                           "none is on PATH (cc, gcc, g++): install one (e.g. apt install g++), or leave out --compile.")
    model.compile()


def build(cfg, lcfg, device, ckpt=None, cache_dir=None, world=distributed.World()):
    """Loads the model and the task's splits, injects the adapters (or loads checkpoint `ckpt`'s),
    and restores its optimizer state: every error a run can meet at its start happens here."""
    task = TASKS[cfg.task]
    # a causal LM for generation tasks, else an encoder with a head; in --dtype (what trains is made float32 below)
    model, tokenizer, model_id = load_base_model(cfg.model, task, head_seed=cfg.seed, dtype=DTYPES[cfg.dtype])
    splits = {s: load_split(cfg.task, s, tokenizer, cfg.max_length, cfg.glue_dir)
              for s in ("train", "dev") if s in task.splits or s == "train"}
    if task.kind == "generation" and not splits["train"]["input_ids"]:
        n = len(splits["train"]["prompt_ids"])
        raise ValueError(f"--max-length {cfg.max_length} leaves no response token in any of the {n} training "
                         f"examples of {cfg.task!r} (every prompt fills it): raise --max-length.")
    fingerprint = inilora.base_fingerprint(model, lcfg.targets)
    if not world.main:
        distributed.barrier(world)  # under torchrun, rank 0 injects first: an approximation is computed once
    if ckpt is not None:
        inilora.load_adapter(model, ckpt / "adapter.safetensors", model_id)
    else:
        inilora.inject(model, lcfg, model_id, cache_dir)  # checks the rank against every target's shape
    if world.main:
        distributed.barrier(world)
    trainable, total_params = inilora.mark_trainable(model, lcfg)  # decoders: A, B only (no head.*)
    for p in model.parameters():  # what trains is float32, whatever the frozen weights' dtype
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.grad_checkpointing:  # models/decoder.py: recompute each block in the backward pass instead of storing it
        model.gradient_checkpointing = True
    model.to(device)
    if cfg.compile:
        compile_model(model, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    state = restore_state(ckpt, model, opt, device, world.rank) if ckpt is not None else {"step": 0, "best": None}
    extra = {"task": cfg.task, "num_labels": task.num_labels, "max_length": cfg.max_length,
             "trainable_params": trainable, "total_params": total_params}
    return Setup(model, tokenizer, tokenizer.pad_id, model_id, fingerprint, splits, opt, state, extra, world)


def settle(pending, step, steps_per_epoch, run, world=distributed.World()):
    """The losses of the steps up to `step` not yet read, as floats, and `pending` emptied: the loop's one host
    sync, at log and save steps rather than every step. A non-finite loss raises TrainingDiverged naming its
    step, before anything after it is saved (its update already reached the weights in memory, not on disk)."""
    # under torchrun each rank holds its share of every step's loss: summed, the whole step's
    values = distributed.sum_tensor(torch.stack(pending), world).tolist() if pending else []
    pending.clear()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            bad = step - len(values) + 1 + i
            kept = (f"the last good checkpoint is named in {run / 'last.json'}" if (run / "last.json").is_file()
                    else "no checkpoint was written yet, so the run is removed")
            raise TrainingDiverged(f"the loss is {value} at step {bad} (epoch {(bad - 1) // steps_per_epoch + 1}): "
                                   f"training diverged. Nothing was saved after it; {kept}. Lower --lr, or "
                                   "train in --dtype float32.")
    return values


def train(cfg, lcfg, run, device, s: Setup):
    """The loop. Returns the final state, with "signal" added when a signal stopped it. Under torchrun each
    rank runs it on its share of every step (lib/distributed.py); rank 0 alone writes."""
    task, model, opt, state, world = TASKS[cfg.task], s.model, s.opt, s.state, s.world
    objective = OBJECTIVES[task.generates]
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(s.splits["train"]["input_ids"])
    per_step = cfg.batch_size * cfg.grad_accum  # examples per optimizer step (all ranks together)
    steps_per_epoch = math.ceil(n / per_step)
    total = cfg.epochs * steps_per_epoch
    tokens = torch.tensor([len(x) for x in s.splits["train"]["input_ids"]])
    lengths = tokens if cfg.group_by_length else None
    watch = TensorPeak(int(tokens.argmax()), device)  # the longest example's step: what memory.py sizes
    metrics_path = run / "metrics.jsonl"
    if world.main and state["step"] > 0 and metrics_path.exists():  # drop what was logged after the checkpoint
        kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= state["step"]]
        metrics_path.write_text("".join(l + "\n" for l in kept))
    state["world_size"] = world.size
    accum = f" ({cfg.grad_accum} micro-batches of {cfg.batch_size})" if cfg.grad_accum > 1 else ""
    ranks = f", shared by {world.size} processes" if world.size > 1 else ""
    print(f"{n} training examples, {per_step} a step{accum}{ranks}, {steps_per_epoch} steps/epoch, {total} steps; "
          f"run directory {run}")
    if "dev" not in s.splits:
        print(f"task {task.name!r} has no dev split: no evaluation after each epoch, best/ is the last epoch")

    def checkpoint():  # every rank's RNG state goes to rank 0, which alone writes
        rngs = distributed.gather(rng_states(), world)
        if world.main:
            save_checkpoint(run, model, opt, state, lcfg, s.model_id, s.fingerprint, s.extra, rngs)
        distributed.barrier(world)

    log_file = metrics_path if world.main else os.devnull
    with open(log_file, "a") as log, StopRequest("stopping after this step (a second Ctrl-C is not needed)") as stop:
        while state["step"] < total:
            epoch, done = divmod(state["step"], steps_per_epoch)
            order = epoch_order(n, cfg.seed, epoch, lengths, per_step)[done * per_step:]
            model.train()
            t0, losses, pending = time.perf_counter(), [], []  # losses: floats since the last log line
            for start in range(0, len(order), per_step):
                # it came during the last step or dev evaluation (on any rank): save, then stop before this step
                if distributed.any_rank(stop.signum, world, device):
                    losses += settle(pending, state["step"], steps_per_epoch, run, world)
                    checkpoint()
                    print(f"stopped at step {state['step']}/{total}, saved as {run / ('checkpoint-%d' % state['step'])}"
                          f"; continue with: python train.py --resume --out {shlex.quote(str(run))}", flush=True)
                    return {**state, "signal": stop.signum or signal.SIGINT}
                lr = lr_at(state["step"], total, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                step_order = order[start:start + per_step].tolist()
                units = loss_units(task, s.splits["train"], step_order)  # the WHOLE step's examples or response tokens
                mine = distributed.share(step_order, world)  # this rank's examples (all of them in one process)
                opt.zero_grad(set_to_none=True)
                with watch.watching(mine, model, opt, state["step"] + 1):  # the CPU's tensor peak, in one step
                    micro = [training_batch(task, s.splits["train"], mine[i:i + cfg.batch_size], s.pad_id, device)
                             for i in range(0, len(mine), cfg.batch_size)]
                    step_loss = torch.zeros((), device=device)
                    for batch in micro:  # gradients add up over the micro-batches: one step of the whole batch
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                            loss = objective(model, batch, units)
                        loss.backward()
                        step_loss = step_loss + loss.detach()  # stays on the device: no host sync per step
                    distributed.sum_gradients(params, world)  # torchrun: the sum over ranks, the whole batch's
                    opt.step()
                state["step"] += 1
                pending.append(step_loss)
                end_of_epoch = state["step"] % steps_per_epoch == 0
                saving = cfg.save_every and state["step"] % cfg.save_every == 0
                if state["step"] % cfg.log_every == 0 or end_of_epoch or saving:
                    losses += settle(pending, state["step"], steps_per_epoch, run, world)  # checked before any save
                if state["step"] % cfg.log_every == 0 or end_of_epoch:
                    dt = (time.perf_counter() - t0) / len(losses)
                    record = {"step": state["step"], "epoch": epoch + 1, "loss": sum(losses) / len(losses), "lr": lr}
                    print(f"step {state['step']}/{total} | loss {record['loss']:.4f} | lr {lr:.1e} | "
                          f"{1000 * dt:.1f} ms/step | {per_step / dt:.0f} samples/s", flush=True)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    t0, losses = time.perf_counter(), []
                if saving:
                    checkpoint()
            # end of an epoch: evaluate on dev, keep the best epoch (the paper's protocol) and the last
            if "dev" in s.splits:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                    dev, what = dev_scores(cfg, task, s, device)
                print(f"epoch {epoch + 1}/{cfg.epochs} | {what} " + " | ".join(f"{k} {v:.4f}" for k, v in dev.items()))
                record = {"step": state["step"], "epoch": epoch + 1, "dev": dev}
                log.write(json.dumps(record if what == "dev" else {**record, "dev_subset": what}) + "\n")
                log.flush()
                score = dev[task.metrics[0]]
                better = state["best"] is None or score > state["best"]["score"]
            else:
                dev, score, better = None, None, True  # no dev split: best/ is the last epoch
            if better:
                state["best"] = {"epoch": epoch + 1, "step": state["step"], "score": score, "dev": dev}
                if world.main:
                    inilora.save_adapter(model, run / "best" / "adapter.safetensors", lcfg, s.model_id, s.fingerprint,
                                         {**s.extra, "epoch": epoch + 1, "dev": dev})
            checkpoint()
    peaks = distributed.gather((peak_memory(device), watch.bytes, watch.step), world)  # every rank's
    lines, memory_fields = memory_report(peaks, s.estimated, int(tokens.max()), device)
    best = state["best"]
    scored = f"dev {task.metrics[0]} {best['score']:.4f}" if best["score"] is not None else "no dev split"
    print(f"best epoch {best['epoch']}: {scored}; " + "\n".join(lines))
    if world.main:
        write_json(run / "final.json", {"step": state["step"], "best": best, "device": str(device),
                                        "world_size": world.size, **memory_fields})
    return state


# -----------------------------------------------------------------------------
# the command line


def build_parser():
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Fine-tune a classifier or a causal LM with LoRA / IniLoRA / baselines.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help=f"a protocol's settings, which flags given beside it override: {PRESETS}")
    p.add_argument("--model", default=d.model, help="local directory, hub id, .gguf, 'minilm' or 'smollm2' "
                   "(packaged); None: smollm2 for generation tasks, minilm otherwise")
    p.add_argument("--task", default=d.task, help=f"one of {sorted(TASKS)}")
    p.add_argument("--glue-dir", "--data-dir", dest="glue_dir", default=d.glue_dir,
                   help="directory with the GLUE TSV files, or with the paper's math files (gsm8k, metamathqa, ...)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of AdamW")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of steps of linear warmup")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="learning-rate decay after warmup")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per optimizer step (a step sees batch-size x grad-accum examples)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example at most")
    p.add_argument("--group-by-length", action="store_true",
                   help="steps of examples of similar length: the shuffle cut into chunks of 50 steps, each "
                   "sorted by length (less padding, faster; off keeps the plain shuffle of published numbers)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data order, head, dropout and adapters")
    p.add_argument("--dtype", default=d.dtype, help=f"one of {sorted(DTYPES)}")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="decoders: recompute each block in the backward pass (less memory, ~1/3 more compute)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: the first steps (and each new batch length, at first) compile, "
                   "for a minute or more; then steps are faster. Results differ by float rounding only, dropout "
                   "aside (compiled dropout draws other random numbers)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="dev examples per forward pass (no gradients: larger than training's fits); "
                   "None: 128, generation tasks --batch-size")
    p.add_argument("--eval-limit", type=int, default=d.eval_limit,
                   help="generation tasks: score the first N dev examples after each epoch (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="generation tasks: tokens generated per dev example at most")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: each epoch)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (None: the first available)")
    p.add_argument("--out", default=None, help="run directory (None: runs/MODEL-TASK-INIT-rRANK-seedSEED)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory estimate (memory.py: the model on the meta device, no weight read) and "
                   "exit: nothing is trained or written")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the configuration stored there")
    inilora.add_lora_args(p)
    return p


def parse(argv, defaults=None):
    """The command line over `defaults` (a resumed run's stored values); a --preset's values come
    before any flag, so a flag given beside it wins."""
    p = build_parser()
    p.set_defaults(**(defaults or {}))
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


def configs_from_args(args):
    values = {k: getattr(args, k) for k in asdict(TrainConfig())}
    kind = TASKS[args.task].kind if args.task in TASKS else None
    values["model"] = values["model"] or DEFAULT_MODELS.get(kind, "minilm")
    cfg = TrainConfig(**values).validate()
    # decoders adapt q_proj, v_proj (Section 4.2), the same in every family models/decoder.py knows
    targets = DEFAULT_TARGETS["decoder" if kind == "generation" else "encoder"]
    return cfg, inilora.lora_config_from_args(args, cfg.seed, default_targets=targets)


def main(argv=None):
    args = parse(argv)
    world, ddp_device = distributed.init(args.device)  # torchrun: join the ranks; else one process
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(sys.stdout if world.main else quiet):
            return run(args, argv, world, ddp_device)  # rank 0 alone prints
    finally:
        distributed.finish(world)


def run(args, argv, world, ddp_device):
    runtime = memory.runtime_now()  # the estimate's runtime term: this process before any model or data
    if args.dry_run:
        cfg, lcfg = configs_from_args(args)
        print(f"configuration: {json.dumps({'train': asdict(cfg), 'lora': asdict(lcfg)})}")
        print("\n".join(estimate(cfg, lcfg, pick_device(args.device)[0], runtime)[0]))
        return {}
    ckpt = None
    if args.resume:
        run_dir = Path(args.out) if args.out else default_run_dir(*configs_from_args(args))
        cfg, lcfg = stored_configs(run_dir, argv, lambda stored: configs_from_args(parse(argv, stored)), TrainConfig())
        ckpt = last_checkpoint(run_dir)
    else:
        cfg, lcfg = configs_from_args(args)
        run_dir = Path(args.out) if args.out else default_run_dir(cfg, lcfg)
        if check_new_run_dir(run_dir):
            print(f"{run_dir} holds only the config.json of a run that never started: starting it afresh")
    resolved = {"train": asdict(cfg), "lora": asdict(lcfg)}
    print(f"configuration: {json.dumps(resolved)}")
    torch.manual_seed(cfg.seed + world.rank)  # the one seed call: dropout (the rest use their own generators)
    device, why = (ddp_device, f"rank {world.rank} of {world.size}") if ddp_device else pick_device(args.device)
    print(f"device {device} ({why}), dtype {cfg.dtype}")
    # the estimate before anything loads (its data term is what loading the data adds); checked against the
    # measured peak at the end
    estimated = tuple(n / 2**20 for n in estimate(cfg, lcfg, device, runtime)[1:]) if world.main else None
    if world.main:
        print(f"memory estimate {estimated[0]:,.0f} MiB (python train.py ... --dry-run lists its terms)")
    setup = build(cfg, lcfg, device, ckpt, args.cache_dir, world)
    setup.estimated = estimated
    if ckpt is not None:
        best = setup.state["best"]
        print(f"resuming {run_dir} from {ckpt.name} at step {setup.state['step']}" + (f" (best so far: epoch "
              f"{best['epoch']}, dev {best['score']:.4f})" if best and best["score"] is not None else ""))
        note = distributed.steps_note(world, setup.state.get("world_size"))
        if note:
            print(f"note: {note}")
        return train(cfg, lcfg, run_dir, device, setup)
    made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # what to remove if it fails at once
    distributed.barrier(world)  # every rank has checked the directory before rank 0 makes it
    try:
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "config.json", resolved)
        return train(cfg, lcfg, run_dir, device, setup)
    except BaseException:
        if world.main and run_dir.is_dir() and not (run_dir / "last.json").exists():
            remove_failed_start(run_dir, made)
        raise


def cli():
    state = main()
    if state.get("signal"):  # stopped by a signal: non-zero, so `train.py ... && evaluate.py ...` stops here
        raise SystemExit(EXIT_INTERRUPTED if state["signal"] == signal.SIGINT else 128 + state["signal"])


if __name__ == "__main__":
    run_cli(cli)
