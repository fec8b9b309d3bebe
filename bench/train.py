"""Benchmark of one training step (forward, backward, AdamW), this project against transformers + peft.

The two run in this one process on the identical batch, timed in alternation step by step (so drifts in the
machine's load hit both alike); the medians and their ratio are printed, with each side's first loss.

Encoder (default): --model (packaged MiniLM) with --init's adapters of --rank on query, value (lora_alpha = r),
against transformers' *ForSequenceClassification with peft's LoRA of the same rank and targets (or both
fully trained for --init full). --pad picks the batch:
  none    random tokens, every row --seq-len long (no padding: neither needs a mask);
  random  random tokens, row lengths uniform in [--seq-len / 4, --seq-len], padded to --seq-len;
  real    train.py's first rotten-tomatoes step (the plain shuffle of seed 0): real reviews, padded to the
          longest (--seq-len unused).
Evaluation and a whole epoch are timed by bench/epoch.py.

--decoder times one supervised fine-tuning step of the packaged SmolLM2 instead (train.py's sft_loss:
token-mean cross-entropy over the second half of each row, the "response"), LoRA of --rank on q_proj, v_proj,
against transformers + peft on the identical batch and weights (transformers' own GGUF loading). With --task
(e.g. arithmetic) the batch is that task's first --batch-size training sequences instead, right-padded as
train.py pads them, with their real response tokens.

Run: python -m bench.train --batch-size 32 --seq-len 48 --pad none --steps 20
     python -m bench.train --batch-size 32 --seq-len 128 --pad random --steps 10
     python -m bench.train --pad real --steps 20
     python -m bench.train --decoder --task arithmetic --batch-size 8 --steps 10
"""
import argparse

import torch

import inilora
import train
from bench.sidebyside import interleaved, reference_encoder, require_references, trainable
from data.prepare import TASKS, load_split, pad_batch, training_batch
from data.sft import IGNORE_INDEX
from lib.common import pick_device, run_cli
from lib.runs import peak_memory
from models.checkpoint import packaged_path
from models.decoder import load_causal_lm
from models.encoder import load_model

# run as `python -m bench.train`: import the repository's modules and bench/'s helpers, not this folder's
# `train` (this very file) in place of the repository's



PADS = ("none", "random", "real")


def encoder_batch(args, tokenizer, vocab_size):
    """(ids, mask or None, types, labels) on the CPU, (B, T) each but labels (B,), for --pad."""
    g = torch.Generator().manual_seed(0)
    B, T = args.batch_size, args.seq_len
    if args.pad == "real":
        split = load_split("rotten-tomatoes", "train", tokenizer, 512)
        idx = train.epoch_order(len(split["labels"]), 0, 0)[:B].tolist()  # train.py's first step, seed 0
        return (*training_batch(TASKS["rotten-tomatoes"], split, idx, tokenizer.pad_id, "cpu")[:3], split["labels"][idx])
    lengths = [T] * B if args.pad == "none" else torch.randint(T // 4, T + 1, (B,), generator=g).tolist()
    lengths[0] = T  # padded to --seq-len
    rows = [torch.randint(1000, vocab_size, (n,), generator=g) for n in lengths]
    ids, types, mask = pad_batch(rows, [torch.zeros_like(r) for r in rows], tokenizer.pad_id)
    return ids, mask, types, torch.randint(0, 2, (B,), generator=g)


def bench_encoder(args, device):
    torch.manual_seed(0)
    model, tokenizer, model_id = load_model(args.model, num_labels=2)
    cfg = inilora.LoRAConfig(init=args.init, rank=args.rank).validate()
    inilora.inject(model, cfg, model_id)
    inilora.mark_trainable(model, cfg, verbose=False)
    ref = reference_encoder(args.model, 2, args.init, args.rank, cfg.targets, device)
    ids, mask, types, labels = (None if t is None else t.to(device) for t in encoder_batch(args, tokenizer,
                                                                                           model.config.vocab_size))
    full_mask = torch.ones_like(ids) if mask is None else mask  # what a tokenizer hands transformers
    real = int(full_mask.sum())
    print(f"encoder {args.model}, {args.init} r{args.rank} on {','.join(cfg.targets)}: batch {tuple(ids.shape)} "
          f"(--pad {args.pad}), {real} real tokens of {ids.numel()} ({100 * real / ids.numel():.0f}%); trainable "
          f"ours {trainable(model):,}, transformers+peft {trainable(ref):,}")
    forwards = {"ours": lambda: model(ids, mask, types),
                "transformers+peft": lambda: ref(input_ids=ids, attention_mask=full_mask, token_type_ids=types).logits}
    steps, first = {}, {}
    for name, forward in forwards.items():
        m = model if name == "ours" else ref
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)

        def step(forward=forward, opt=opt):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                loss = train.loss_fn(forward(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        steps[name] = step
        first[name] = step().item()
    report(steps, first, args, device)


def report(steps, first, args, device):
    """Times `steps` in alternation and prints the medians, their ratio and the first losses."""
    print("first loss " + ", ".join(f"{name} {loss:.4f}" for name, loss in first.items()))
    sec = interleaved(steps, args.steps, args.warmup, device)
    for name, t in sec.items():
        print(f"{name:>17} | {1000 * t:8.1f} ms/step | {args.batch_size / t:7.1f} samples/s")
    print(f"ours / transformers+peft: {sec['ours'] / sec['transformers+peft']:.2f} of its time "
          f"({sec['transformers+peft'] / sec['ours']:.2f}x faster); peak memory of the process "
          f"{peak_memory(device)[0]:,.0f} MiB (both models)")


def sft_batch(vocab_size, args, device):
    """(ids, mask, labels), (B, T) each: random tokens, the loss on the second half of every row."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab_size, (args.batch_size, args.seq_len), generator=g)  # (B, T)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = IGNORE_INDEX  # the "prompt" half: no loss
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def bench_decoder(args, device):
    transformers, peft = require_references()

    model, tokenizer, model_id = load_causal_lm("smollm2")
    cfg = inilora.LoRAConfig(init="lora", rank=args.rank, targets=("q_proj", "v_proj")).validate()
    inilora.inject(model, cfg, model_id)
    n_trainable, total = inilora.mark_trainable(model, cfg)
    gguf = packaged_path("smollm2")
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]))
    if args.task:  # a real batch: train.py's first micro-batch of the task
        split = load_split(args.task, "train", tokenizer, 512)
        ids, mask, labels = training_batch(TASKS[args.task], split, list(range(args.batch_size)), tokenizer.pad_id, device)
        print(f"task {args.task}: batch {tuple(ids.shape)}, {int(mask.sum())} real tokens")
    else:
        ids, mask, labels = sft_batch(model.config.vocab_size, args, device)
    units = int((labels[:, 1:] != IGNORE_INDEX).sum())
    print(f"decoder smollm2, lora r{args.rank} on q_proj,v_proj: trainable {n_trainable:,} of {total:,}")
    steps, first = {}, {}
    for name, m in (("ours", model), ("transformers+peft", ref)):
        m.to(device).train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)

        def step(m=m, opt=opt, name=name):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                if name == "ours":
                    loss = train.sft_loss(m, (ids, mask, labels), units)
                else:  # transformers' mean over the labels that are not -100: the same token mean
                    loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        steps[name] = step
        first[name] = step().item()  # B0 = 0: both start at the base model's loss
    report(steps, first, args, device)


def main(argv=None):
    p = argparse.ArgumentParser(description="Time one training step, ours against transformers + peft.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm", help="local directory, hub id, or 'minilm' (packaged)")
    p.add_argument("--init", default="lora", help="the initialiser (they cost the same per step); full: every "
                   "weight trained, on both sides")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument("--seq-len", type=int, default=48, help="tokens per example (rotten-tomatoes: p95 47)")
    p.add_argument("--pad", default="none", choices=PADS, help="encoder batch: no padding, random lengths padded "
                   "to --seq-len, or a real rotten-tomatoes step")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--dtype", default="float32", help=f"one of {sorted(train.DTYPES)}")
    p.add_argument("--device", default=None, help="cuda, mps or cpu; None: the first available")
    p.add_argument("--decoder", action="store_true",
                   help="time an SFT step of SmolLM2 (ours against transformers + peft) instead of --model")
    p.add_argument("--task", default=None,
                   help="with --decoder: a generation task (e.g. arithmetic) whose first training batch is timed "
                        "instead of random tokens (--seq-len then unused)")
    args = p.parse_args(argv)
    device, why = pick_device(args.device)
    print(f"device {device} ({why}), dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size} x {args.seq_len} tokens")
    if args.decoder:
        return bench_decoder(args, device)
    return bench_encoder(args, device)


if __name__ == "__main__":
    run_cli(main)
