"""Fine-tune with any initialiser: one plain training loop for classifiers and causal LMs.

Only A, B (and an encoder's task head) train, AdamW over those parameters, evaluation on dev
after every epoch, and the best epoch's dev score is the result (paper Section 4.2). The task's
kind (data.task.KINDS) picks the model, the batches, the objective and the evaluation; the loop is one:

  classification / regression (BERT/RoBERTa, models/encoder.py): cross-entropy (MSE for STS-B) over the
      examples of a step; dev metrics from data.prepare.TASKS.
  generation (LLaMA-family decoders, models/decoder.py): supervised fine-tuning with the token-mean
      cross-entropy over the response tokens of the whole optimizer step (data/sft.py),

          L = sum_b sum_t m_bt CE(logits_b,t-1, x_b,t) / sum_b sum_t m_bt    (m = 1 on response tokens)

      where b runs over all --grad-accum micro-batches of the step, so accumulation equals one big
      batch; dev score = exact match of greedy generations (evaluate.py), on --eval-limit examples; for
      code tasks (humaneval's protocol: code-functions, codealpaca) greedy pass@1, the completions run with
      their tests in the sandbox.
  multiple choice and conversations (causal LMs too): the same loss, m = 1 on the answer letter after a
      --shots-shot prompt (data/mmlu.py; dev score = accuracy of the likeliest letter, evaluate.py), or on
      every assistant turn of a conversation (data/sharegpt.py; no dev split: scored on MMLU afterwards).

The learning rate at step t of T, with W = int(warmup_ratio * T) warmup steps, is lr * t / W for
t < W, then (progress p = (t - W) / (T - W))

    linear  lr_t = lr * (1 - p)                         (the NLU protocol; the default)
    cosine  lr_t = lr * 0.5 * (1 + cos(pi * p))          (transformers' cosine schedule, the LLM scripts)

The file reads in nanoGPT's order: configuration, learning-rate schedule, data order, objectives, building
the job, one step, the loop, the command line. --preset paper-llm is the paper's LLM protocol (PRESETS;
flags beside it override it). --dtype bfloat16 keeps the frozen weights and R = W0 - s B0 A0 (computed in
float32, rounded once) in bfloat16 and trains under bf16 autocast, with the adapters, head and optimizer
state in float32; the run says at its start how far rounding R moves the step-0 weights
(inilora.report_rounding). --grad-checkpointing recomputes decoder blocks in backward. --dry-run prints
the memory estimate of the run (tools/memory.py; the statistics pass below is not in it) and trains nothing.
The data-driven initialisers (--init eva, lora-ga) first read the first --init-batches micro-batches of the
run's own order (datainit.py, init_data): the run prints that pass's seconds and peak memory and keeps them
in its checkpoints and final.json ("init_cost"); --resume restores A0, B0 from the checkpoint, reading nothing.

Every check happens before the run directory exists (lib/runs.py owns it: checkpoints, resume, signals);
Ctrl-C saves a checkpoint and exits 130; `python train.py --resume --out DIR` continues.
`torchrun --nproc_per_node N train.py ...` trains data-parallel (lib/distributed.py): the same global batch of
batch_size x grad_accum examples, shared by the N processes; a plain `python train.py` is one process.

Run: python train.py --init beta-kaiming-uniform --epochs 3
         (writes runs/minilm-rotten-tomatoes-beta-kaiming-uniform-r8-seed0)
     python train.py --model smollm2 --task arithmetic --init inilora --epochs 1 --eval-limit 50
     python train.py --task arithmetic-mc --init inilora --epochs 1 --batch-size 8 --lr 1e-3 --max-length 512
"""
import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import datainit
import inilora
import models
from data.mmlu import SHOTS
from data.prepare import TASKS, draw_training, load_split, loss_units, training_batch
from data.sft import IGNORE_INDEX
from evaluate import dev_scores
from lib import distributed, runs
from lib.common import DTYPES, EXIT_INTERRUPTED, TRAIN_DTYPES, choose_threads, pick_device, run_cli, write_json

SCHEDULES = ("linear", "cosine")
# the paper's LLM protocol (Section 4.2, the authors' MetaMath-style scripts); train and LoRA flags by dest
PRESETS = {"paper-llm": dict(lr=2e-5, warmup_ratio=0.03, schedule="cosine", epochs=3, batch_size=8, grad_accum=8,
                             max_length=512, weight_decay=0.0, lora_alpha=None, lora_dropout=0.0, seed=11)}
PACKAGED_MODELS = {"encoder": "minilm", "decoder": "smollm2"}  # --model left out: by the task's model family
ROOT = Path(__file__).resolve().parent  # the repository: `python -m tools.memory` runs from here

# -----------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    model: str | None = None       # local directory, hub id, "minilm" or "smollm2"; None: by the task's family
    task: str = "rotten-tomatoes"
    data_dir: str | None = None    # GLUE TSV files, or the directory / file of the paper's math files
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
    train_limit: int = 0           # train on N examples drawn once from the training split, same for every seed (0: all)
    eval_limit: int = 0            # generation: score the first N dev examples after each epoch (0: all)
    max_new_tokens: int = 256      # generation: tokens generated per dev example at most
    shots: int = SHOTS             # multiple choice: solved examples before each question (data/mmlu.py)
    log_every: int = 20            # steps between log lines
    save_every: int = 0            # steps between checkpoints (0: once per epoch)
    threads: int | None = None     # CPU threads; None: one per free core at start, then stored (--resume reuses it)

    def validate(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {sorted(TASKS)}")
        TASKS[self.task].check_split("train")  # a task with no training split (MMLU) says so before anything loads
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {list(TRAIN_DTYPES)} (float16 would need loss "
                             "scaling, which this loop does not do); pass --dtype float32 or bfloat16.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {list(SCHEDULES)}; pass --schedule linear "
                             "(the NLU protocol) or cosine (the LLM protocol).")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads!r} must be at least 1 (or None: one per free core).")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={self.eval_batch_size!r} must be at least 1 (or None: the default).")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "log_every", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be at least 1.")
        if not (self.lr > 0 and 0 <= self.warmup_ratio < 1 and self.weight_decay >= 0 and self.save_every >= 0):
            raise ValueError(f"lr={self.lr}, warmup_ratio={self.warmup_ratio}, weight_decay={self.weight_decay}, "
                             f"save_every={self.save_every}: expected lr > 0, 0 <= warmup_ratio < 1, "
                             "weight_decay >= 0, save_every >= 0.")
        if self.shots < 0:
            raise ValueError(f"shots={self.shots} is negative; pass 0 (zero-shot) or more (the standard protocol: "
                             f"{SHOTS}).")
        if self.train_limit < 0:
            raise ValueError(f"train_limit={self.train_limit} is negative; pass 0 (the whole training split) or a "
                             "count.")
        if self.eval_limit < 0:
            raise ValueError(f"eval_limit={self.eval_limit} is negative; pass 0 (the whole dev split) or a count.")
        if self.grad_checkpointing and not TASKS[self.task].generates:
            raise ValueError(f"--grad-checkpointing recomputes decoder blocks, but task {self.task!r} trains an "
                             "encoder; leave the flag out, or pick a generation task.")
        return self


# -----------------------------------------------------------------------------
# the learning-rate schedule and the data order


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


# -----------------------------------------------------------------------------
# building the job: every check, before the run directory exists


@dataclass
class Job:
    """What the loop needs, built and checked before the run directory is made."""
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    pad_id: int
    model_id: str
    fingerprint: str
    splits: dict
    opt: torch.optim.Optimizer
    state: dict                    # {"step", "best", ...}: what a checkpoint's sidecar holds
    extra: dict                    # stored in every adapter sidecar
    world: distributed.World = distributed.World()  # torchrun's ranks (one process: rank 0 of 1)
    started: float = 0.0  # time.perf_counter() when this process started building the job
    progress: dict | None = None  # seconds and peak memory of the earlier segments of a resumed run


def compile_model(model, device):
    """torch.compile in place (nn.Module.compile): parameter names, and so adapters and checkpoints, unchanged.
    Each new batch shape compiles anew until torch marks the length dynamic (the second shape)."""
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        raise RuntimeError("--compile on the CPU needs a C++ compiler (torch.compile's inductor writes C++), and "
                           "none is on PATH (cc, gcc, g++): install one (e.g. apt install g++), or leave out --compile.")
    model.compile()


def check_content(split, tokenizer, cfg):
    """Refuses a --max-length that leaves most training examples nothing but special tokens ([CLS] [SEP]), and
    says so when some are: a classifier trained on those learns the majority class and nothing else."""
    special = set(tokenizer.encode([""], [""])[0][0])  # the ids the tokenizer adds around a (pair of) text(s)
    empty = sum(set(ids.tolist()) <= special for ids in split["input_ids"])
    share = empty / max(1, len(split["input_ids"]))
    what = (f"--max-length {cfg.max_length} leaves {empty} of the {len(split['input_ids'])} training examples of "
            f"{cfg.task!r} ({share:.0%}) with no token but the special ones")
    if share > 0.5:
        raise ValueError(f"{what}: raise --max-length (e.g. 128; the examples' lengths are printed above).")
    if empty:
        print(f"warning: {what}; they train on nothing but the label.")

def build(cfg, lora_cfg, run_dir, device, ckpt=None, cache_dir=None, world=distributed.World()):
    """Loads the model and the task's splits, injects the adapters (or loads checkpoint `ckpt`'s),
    and restores its optimizer state: every error a run can meet at its start happens here."""
    started = time.perf_counter()
    task = TASKS[cfg.task]
    family = models.family_of(cfg.model)  # reads config.json or the .gguf suffix: no weight is loaded yet
    if task.family != family:
        wanted = "a causal LM" if task.generates else "an encoder with a classification head"
        remedy = ("--model smollm2 (offline), a decoder's directory or .gguf file, or a Hub id" if task.generates else
                  "--model minilm (offline), a BERT/RoBERTa directory, or a Hub id such as roberta-base")
        raise ValueError(f"task {cfg.task!r} fine-tunes {wanted}, but --model {cfg.model} is "
                         f"{'an encoder' if family == 'encoder' else 'a decoder (a causal LM)'}; pass {remedy}.")
    # a causal LM for generation tasks, else an encoder with a head; in --dtype (what trains is made float32 below)
    model, tokenizer, model_id, _, _ = models.load(cfg.model, task.family, task.num_labels, cfg.seed, DTYPES[cfg.dtype])
    splits = {s: load_split(cfg.task, s, tokenizer, cfg.max_length, cfg.data_dir, shots=cfg.shots)
              for s in ("train", "dev") if s in task.splits or s == "train"}
    if cfg.train_limit:  # a smaller run: the same drawn examples for every seed, so seeds differ in order and init only
        splits["train"] = draw_training(splits["train"], cfg.train_limit)
        print(f"--train-limit {cfg.train_limit}: training on {cfg.train_limit} drawn examples")
    if task.generates and not splits["train"]["input_ids"]:
        n = len(splits["train"]["prompt_ids"])
        raise ValueError(f"--max-length {cfg.max_length} leaves no response token in any of the {n} training "
                         f"examples of {cfg.task!r} (every prompt fills it): raise --max-length.")
    if not task.generates:
        check_content(splits["train"], tokenizer, cfg)
    fingerprint = inilora.base_fingerprint(model, lora_cfg.targets)
    if not world.main:
        distributed.barrier(world)  # under torchrun, rank 0 injects first: an approximation is computed once
    init_cost = None
    if ckpt is not None:  # the adapter's A0, B0 come back from the checkpoint: nothing is read or drawn again
        inilora.load_adapter(model, ckpt / runs.ADAPTER, model_id)
    else:
        stats = None
        if lora_cfg.init in inilora.DATA_DRIVEN:  # eva, lora-ga: statistics of the first --init-batches batches
            model.to(device)  # read where the run trains
            data = init_data(cfg, task, splits["train"], tokenizer.pad_id, device, lora_cfg.init_batches)
            stats, init_cost = datainit.collect(model, lora_cfg, data)
        injecting = time.perf_counter()
        inilora.inject(model, lora_cfg, model_id, cache_dir, stats)  # checks the rank against every target's shape
        if init_cost is not None:  # the decompositions of the statistics (eigh, SVD) happen in inject, on the CPU
            init_cost["inject_seconds"] = round(time.perf_counter() - injecting, 3)
            print(f"init {lora_cfg.init}: A0, B0 from the statistics and R = W0 - s B0 A0 in "
                  f"{init_cost['inject_seconds']:.2f} s")
    if world.main:
        distributed.barrier(world)
    trainable, total_params = inilora.mark_trainable(model, lora_cfg)  # decoders: A, B only (no head.*)
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
    state, progress = (runs.restore_state(ckpt, model, opt, device, world.rank) if ckpt is not None
                       else ({"step": 0, "best": None}, {}))
    if init_cost is not None:  # kept in every checkpoint's state, and written to final.json
        state["init_cost"] = init_cost
    extra = {"task": cfg.task, "num_labels": task.num_labels, "max_length": cfg.max_length,
             "trainable_params": trainable, "total_params": total_params}
    return Job(run_dir, model, tokenizer, tokenizer.pad_id, model_id, fingerprint, splits, opt, state, extra, world,
               started, progress)


def init_data(cfg, task, split, pad_id, device, n_batches):
    """The batches of a data-driven initialiser (inilora.DATA_DRIVEN): the first `n_batches` micro-batches of
    --batch-size examples in the run's own seeded order (epoch 0), each with its training loss (its mean over
    the batch), and as its tokens the real ones: an encoder's attention mask, a causal LM's response tokens (PEFT
    EVA's default label mask for language models)."""
    n = len(split["input_ids"])
    lengths = torch.tensor([len(x) for x in split["input_ids"]]) if cfg.group_by_length else None
    order = epoch_order(n, cfg.seed, 0, lengths, cfg.batch_size * cfg.grad_accum).tolist()
    picked = order[: n_batches * cfg.batch_size]
    chunks = [picked[i:i + cfg.batch_size] for i in range(0, len(picked), cfg.batch_size)]
    batches = [(training_batch(task, split, idx, pad_id, device), loss_units(task, split, idx)) for idx in chunks]

    def loss(model, item):
        batch, units = item
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            return OBJECTIVES[task.generates](model, batch, units)

    def tokens(item):
        batch, _ = item
        return batch[2] != IGNORE_INDEX if task.generates else batch[1]  # (B, T) bool; None: no padding

    return datainit.InitData(batches, loss, tokens)


# -----------------------------------------------------------------------------
# one optimizer step, and what the loop does around steps


def train_step(cfg, job, examples, lr, device):
    """One AdamW step over `examples`, the step's global batch: this rank's share of it, in micro-batches
    whose gradients add up to the whole batch's. Returns the step's loss, left on the device (no host sync)."""
    task, model = TASKS[cfg.task], job.model
    for group in job.opt.param_groups:
        group["lr"] = lr
    units = loss_units(task, job.splits["train"], examples)  # the WHOLE step's examples or response tokens
    mine = distributed.share(examples, job.world)  # this rank's examples (all of them in one process)
    job.opt.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)
    for i in range(0, len(mine), cfg.batch_size):  # micro-batches: one step of the whole batch
        batch = training_batch(task, job.splits["train"], mine[i:i + cfg.batch_size], job.pad_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss = OBJECTIVES[task.generates](model, batch, units)  # forward and this micro-batch's share of L
        loss.backward()
        step_loss = step_loss + loss.detach()
    distributed.sum_gradients([p for p in model.parameters() if p.requires_grad], job.world)  # torchrun: all ranks'
    job.opt.step()
    return step_loss


class StepLosses:
    """The step losses since the last log line. They stay on the device until `read` (the loop's one host sync,
    at log and save steps rather than every step), which checks them: a non-finite loss raises TrainingDiverged
    naming its step, before anything after it is saved (its update reached the weights in memory, not disk)."""

    def __init__(self):
        self.pending, self.values, self.start = [], [], time.perf_counter()

    def read(self, job, steps_per_epoch):
        step = job.state["step"]
        # under torchrun each rank holds its share of every step's loss: summed, the whole step's
        values = distributed.sum_tensor(torch.stack(self.pending), job.world).tolist() if self.pending else []
        self.pending.clear()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                bad = step - len(values) + 1 + i
                kept = ("the last good checkpoint is named in " + str(job.run_dir / runs.LAST)
                        if runs.has_checkpoint(job.run_dir) else "no checkpoint was written yet, so the run is removed")
                raise runs.TrainingDiverged(f"the loss is {value} at step {bad} (epoch {(bad - 1) // steps_per_epoch + 1}): "
                                            f"training diverged. Nothing was saved after it; {kept}. Lower --lr, or "
                                            "train in --dtype float32.")
        self.values += values

    def log_line(self, cfg, job, epoch, lr, total, log):
        """Prints and logs the mean loss since the last log line, then starts the next interval."""
        dt = (time.perf_counter() - self.start) / len(self.values)
        record = {"step": job.state["step"], "epoch": epoch + 1, "loss": sum(self.values) / len(self.values), "lr": lr}
        if sizes := inilora.update_sizes(job.model):  # ||s (B A - B0 A0)||_F / ||W0||_F per layer (no full fine-tuning)
            record["update"] = {name: round(v, 6) for name, v in sizes.items()}
        per_step = cfg.batch_size * cfg.grad_accum
        print(f"step {record['step']}/{total} | loss {record['loss']:.4f} | lr {lr:.1e} | "
              f"{1000 * dt:.1f} ms/step | {per_step / dt:.3g} samples/s", flush=True)
        runs.append_record(log, record)
        self.values, self.start = [], time.perf_counter()


def progress(job, device):
    """The whole run's seconds and peak memory so far (the largest of the ranks'), earlier segments included."""
    (mib, measure), *_ = sorted(distributed.gather(runs.peak_memory(device), job.world), reverse=True)
    before = job.progress or {}
    if before.get("peak_memory_mib", 0) > mib:
        mib, measure = before["peak_memory_mib"], before["peak_memory_measure"]
    return {"seconds": round(before.get("seconds", 0) + time.perf_counter() - job.started, 3),
            "peak_memory_mib": round(mib, 1), "peak_memory_measure": measure}


def save_checkpoint(job, lora_cfg, device):
    """Every rank's RNG state goes to rank 0, which alone writes the checkpoint."""
    rngs, so_far = distributed.gather(runs.rng_states(), job.world), progress(job, device)
    if job.world.main:
        write_adapter = lambda path: inilora.save_adapter(job.model, path, lora_cfg, job.model_id,  # noqa: E731
                                                           job.fingerprint, job.extra)
        runs.save_checkpoint(job.run_dir, write_adapter, job.model, job.opt, job.state, rngs, so_far)
    distributed.barrier(job.world)


def end_of_epoch(cfg, lora_cfg, job, epoch, device, log):
    """Dev evaluation, the best epoch so far (the paper's protocol: best dev over epochs) and a checkpoint."""
    task, state = TASKS[cfg.task], job.state
    dev, score, better = None, None, True  # no dev split: best/ is the last epoch
    if "dev" in job.splits:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            dev, what = dev_scores(cfg, task, job, device)
        print(f"epoch {epoch + 1}/{cfg.epochs} | {what} " + " | ".join(f"{k} {v:.4f}" for k, v in dev.items()))
        record = {"step": state["step"], "epoch": epoch + 1, "dev": dev}
        runs.append_record(log, record if what == "dev" else {**record, "dev_subset": what})
        score = dev[task.metrics[0]]
        better = state["best"] is None or score > state["best"]["score"]
    if better:
        state["best"] = {"epoch": epoch + 1, "step": state["step"], "score": score, "dev": dev}
        if job.world.main:
            inilora.save_adapter(job.model, runs.best_adapter(job.run_dir), lora_cfg, job.model_id, job.fingerprint,
                                 {**job.extra, "epoch": epoch + 1, "dev": dev})
    save_checkpoint(job, lora_cfg, device)


def stop_now(job, lora_cfg, losses, steps_per_epoch, total, signum, device):
    """A signal came during the last step or dev evaluation (on any rank): save, say how to continue, stop."""
    losses.read(job, steps_per_epoch)
    save_checkpoint(job, lora_cfg, device)
    step = job.state["step"]
    launcher = f"torchrun --nproc_per_node {job.world.size} train.py" if job.world.size > 1 else "python train.py"
    print(f"stopped at step {step}/{total}, saved as {runs.checkpoint_dir(job.run_dir, step)}; continue with: "
          f"{launcher} --resume --out {shlex.quote(str(job.run_dir))}", flush=True)
    return {**job.state, "signal": signum or signal.SIGINT}


# -----------------------------------------------------------------------------
# the loop


def train(cfg, lora_cfg, job, device):
    """The loop. Returns the final state, with "signal" added when a signal stopped it. Under torchrun each
    rank runs it on its share of every step (lib/distributed.py); rank 0 alone writes."""
    state, world = job.state, job.world
    n = len(job.splits["train"]["input_ids"])
    per_step = cfg.batch_size * cfg.grad_accum  # examples per optimizer step (all ranks together)
    steps_per_epoch = math.ceil(n / per_step)
    total = cfg.epochs * steps_per_epoch
    lengths = torch.tensor([len(x) for x in job.splits["train"]["input_ids"]]) if cfg.group_by_length else None
    if state["step"] >= total and runs.final_file(job.run_dir).is_file():
        print(f"{job.run_dir} has finished ({total} steps): nothing to train; its final.json is kept as it was")
        return state
    if world.main and state["step"] > 0:
        runs.keep_records_until(job.run_dir, state["step"])  # drop what was logged after the checkpoint
    state["world_size"] = world.size
    accum = f" ({cfg.grad_accum} micro-batches of {cfg.batch_size})" if cfg.grad_accum > 1 else ""
    ranks = f", shared by {world.size} processes" if world.size > 1 else ""
    print(f"{n} training examples, {per_step} a step{accum}{ranks}, {steps_per_epoch} steps/epoch, {total} steps; "
          f"run directory {job.run_dir}")
    if "dev" not in job.splits:
        print(f"task {cfg.task!r} has no dev split: no evaluation after each epoch, best/ is the last epoch")
    log_file = runs.metrics_file(job.run_dir) if world.main else os.devnull
    with open(log_file, "a") as log, runs.StopRequest("stopping after this step (a second Ctrl-C is not needed)") as stop:
        while state["step"] < total:
            epoch, done = divmod(state["step"], steps_per_epoch)
            order = epoch_order(n, cfg.seed, epoch, lengths, per_step)[done * per_step:].tolist()
            job.model.train()
            losses = StepLosses()
            for start in range(0, len(order), per_step):
                if distributed.any_rank(stop.signum, world, device):
                    return stop_now(job, lora_cfg, losses, steps_per_epoch, total, stop.signum, device)
                lr = lr_at(state["step"], total, cfg)
                losses.pending.append(train_step(cfg, job, order[start:start + per_step], lr, device))
                state["step"] += 1
                end = state["step"] % steps_per_epoch == 0
                # an epoch's last step is saved by end_of_epoch, after its evaluation: a checkpoint here would be
                # one whose epoch was never scored, and a run killed during that evaluation would resume past it
                saving = cfg.save_every and state["step"] % cfg.save_every == 0 and not end
                if state["step"] % cfg.log_every == 0 or end or saving:
                    losses.read(job, steps_per_epoch)  # checked before any save
                if state["step"] % cfg.log_every == 0 or end:
                    losses.log_line(cfg, job, epoch, lr, total, log)
                if saving:
                    save_checkpoint(job, lora_cfg, device)
            end_of_epoch(cfg, lora_cfg, job, epoch, device, log)
    return finish(cfg, job, device)


def finish(cfg, job, device):
    """The best epoch, and final.json with the whole run's time and measured peak memory (the largest of the
    ranks', and of every segment of a resumed run)."""
    so_far, best = progress(job, device), job.state["best"]
    scored = f"dev {TASKS[cfg.task].metrics[0]} {best['score']:.4f}" if best["score"] is not None else "no dev split"
    ranks = f"the largest of {job.world.size} processes" if job.world.size > 1 else "one process"
    print(f"best epoch {best['epoch']}: {scored}; peak memory {so_far['peak_memory_mib']:,.0f} MiB "
          f"({so_far['peak_memory_measure']}, {ranks}); {so_far['seconds']:,.0f} s in all (loading, training, evaluation)")
    if job.world.main:
        init = {"init_cost": job.state["init_cost"]} if "init_cost" in job.state else {}
        write_json(runs.final_file(job.run_dir), {"step": job.state["step"], "best": best, "device": str(device),
                                                  "world_size": job.world.size, **so_far, **init})
    return job.state


# -----------------------------------------------------------------------------
# the command line


def build_parser():
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Fine-tune a classifier or a causal LM with LoRA / IniLoRA / baselines.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a protocol's settings, which flags given beside it override; paper-llm: " +
                   ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["paper-llm"].items()))
    p.add_argument("--model", default=d.model, help="local directory, hub id, .gguf, 'minilm' or 'smollm2' "
                   "(packaged); None: smollm2 for generation tasks, minilm otherwise")
    p.add_argument("--task", default=d.task, help=f"one of {sorted(TASKS)}")
    p.add_argument("--data-dir", "--glue-dir", dest="data_dir", default=d.data_dir,
                   help="the task's data: the directory with the GLUE TSV files, or with the paper's math files "
                   "(gsm8k, metamathqa, ...), MMLU's directory, ShareGPT's JSON file; --glue-dir is its old name")
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
    p.add_argument("--dtype", default=d.dtype, help=f"one of {list(TRAIN_DTYPES)}")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="decoders: recompute each block in the backward pass (less memory, ~1/3 more compute)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: the first steps (and each new batch length, at first) compile, "
                   "for a minute or more; then steps are faster. Results differ by float rounding only, dropout "
                   "aside (compiled dropout draws other random numbers)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="dev examples per forward pass (no gradients: larger than training's fits); "
                   "None: 128, generation tasks --batch-size")
    p.add_argument("--train-limit", type=int, default=d.train_limit,
                   help="train on N examples drawn once from the training split by a fixed generator, the same N "
                   "for every --seed (0: all)")
    p.add_argument("--eval-limit", type=int, default=d.eval_limit,
                   help="generation tasks: score the first N dev examples after each epoch (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="generation tasks: tokens generated per dev example at most")
    p.add_argument("--shots", type=int, default=d.shots,
                   help="multiple-choice tasks (mmlu, arithmetic-mc): solved examples before each question, in "
                   "training and dev prompts alike")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: each epoch)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (None: the first available)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads; None: one per core that other programs leave free at start. The count "
                   "changes float sums in their last bits, so the run stores it and --resume reuses it")
    p.add_argument("--out", default=None, help="run directory (None: runs/MODEL-TASK-INIT-rRANK-seedSEED)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory estimate of this run (python -m tools.memory with these settings: the model "
                   "on the meta device, no weight read) and exit: nothing is trained or written")
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
    family = TASKS[args.task].family if args.task in TASKS else "encoder"
    values["model"] = values["model"] or PACKAGED_MODELS[family]
    cfg = TrainConfig(**values).validate()
    # the family's targets: query, value for encoders, q_proj, v_proj for every decoder family (Section 4.2)
    return cfg, inilora.lora_config_from_args(args, cfg.seed, default_targets=models.DEFAULT_TARGETS[family])


def dry_run(cfg, lora_cfg, device):
    """python -m tools.memory with this run's settings: its estimate, printed; nothing is trained or written."""
    flags = {"--model": cfg.model, "--task": cfg.task, "--init": lora_cfg.init, "--rank": lora_cfg.rank,
             "--targets": ",".join(lora_cfg.targets), "--batch-size": cfg.batch_size, "--max-length": cfg.max_length,
             "--dtype": cfg.dtype, "--device": device.type, **({"--data-dir": cfg.data_dir} if cfg.data_dir else {})}
    command = [sys.executable, "-m", "tools.memory", *(str(x) for kv in flags.items() for x in kv),
               *(["--grad-checkpointing"] if cfg.grad_checkpointing else [])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout, end="")
    if done.returncode != 0:
        raise ValueError((done.stderr.strip().splitlines() or ["the estimate failed"])[-1].removeprefix("error: "))
    return {}


def main(argv=None):
    args = parse(argv)
    world, ddp_device = distributed.init(args.device)  # torchrun: join the ranks; else one process
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(sys.stdout if world.main else quiet):
            return run(args, argv, world, ddp_device)  # rank 0 alone prints
    finally:
        distributed.finish(world)


def lora_flags():
    """LoRAConfig field -> the argparse name of its flag (inilora declares each flag beside its field)."""
    return {name: flag.lstrip("-").replace("-", "_") for name, flag in inilora.config_flags().items()}


def run(args, argv, world, ddp_device):
    if args.dry_run:
        cfg, lora_cfg = configs_from_args(args)
        print(f"configuration: {json.dumps({'train': asdict(cfg), 'lora': asdict(lora_cfg)})}")
        return dry_run(cfg, lora_cfg, pick_device(args.device)[0])
    ckpt = None
    if args.resume:
        run_dir = Path(args.out) if args.out else default_run_dir(*configs_from_args(args))
        cfg, lora_cfg = runs.stored_configs(run_dir, lambda stored: configs_from_args(parse(argv, stored)),
                                            TrainConfig(), lora_flags(), lora_defaults=asdict(inilora.LoRAConfig()))
        ckpt = runs.last_checkpoint(run_dir)
    else:
        cfg, lora_cfg = configs_from_args(args)
        run_dir = Path(args.out) if args.out else default_run_dir(cfg, lora_cfg)
        if runs.check_new_run_dir(run_dir):
            print(f"{run_dir} holds only the config.json of a run that never started: starting it afresh")
    # the CPU threads (lib/common.py): chosen once, stored with the run, so its numbers repeat on --resume
    threads, threads_why = choose_threads(cfg.threads)
    if cfg.threads is None:
        cfg = replace(cfg, threads=threads)
    elif args.resume and args.threads is None:
        threads_why = "the run's stored count, so the resumed steps repeat its numerics"
    resolved = {"train": asdict(cfg), "lora": asdict(lora_cfg)}
    print(f"configuration: {json.dumps(resolved)}")
    torch.manual_seed(cfg.seed + world.rank)  # the one seed call: dropout (the rest use their own generators)
    device, why = (ddp_device, f"rank {world.rank} of {world.size}") if ddp_device else pick_device(args.device)
    print(f"device {device} ({why}), dtype {cfg.dtype}, {threads} CPU thread{'s' * (threads > 1)} ({threads_why})")
    job = build(cfg, lora_cfg, run_dir, device, ckpt, args.cache_dir, world)
    if ckpt is not None:
        best = job.state["best"]
        print(f"resuming {run_dir} from {ckpt.name} at step {job.state['step']}" + (f" (best so far: epoch "
              f"{best['epoch']}, dev {best['score']:.4f})" if best and best["score"] is not None else ""))
        if note := distributed.steps_note(world, job.state.get("world_size")):
            print(f"note: {note}")
        return train(cfg, lora_cfg, job, device)
    made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # what to remove if it fails at once
    distributed.barrier(world)  # every rank has checked the directory before rank 0 makes it
    try:
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(runs.config_file(run_dir), resolved)
        return train(cfg, lora_cfg, job, device)
    except BaseException:
        if world.main and run_dir.is_dir() and not runs.has_checkpoint(run_dir):
            runs.remove_failed_start(run_dir, made)
        raise


def default_run_dir(cfg, lora_cfg):
    """runs/MODEL-TASK-INIT-rRANK-seedSEED (full fine-tuning has no rank)."""
    return runs.default_run_dir(cfg.model, cfg.task, lora_cfg.label, cfg.seed)


def cli():
    state = main()
    if state.get("signal"):  # stopped by a signal: non-zero, so `train.py ... && evaluate.py ...` stops here
        raise SystemExit(EXIT_INTERRUPTED if state["signal"] == signal.SIGINT else 128 + state["signal"])


if __name__ == "__main__":
    run_cli(cli)
