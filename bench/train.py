"""Benchmark of one training step (forward, backward, AdamW) on a fixed batch.

Times train.py's step for a fixed batch of real tokens on the chosen model: ms/step,
samples/s and peak memory, for LoRA-style adapters and for full fine-tuning, so that
the cost of an initialiser (none at step time: they differ only in A0, B0) and of full
fine-tuning can be compared. Not a test: its figures go into the README.

--decoder times one supervised fine-tuning step of the packaged SmolLM2 instead (train.py's
sft_loss: token-mean cross-entropy over the second half of each row, the "response"), LoRA of
--rank on q_proj, v_proj with lora_alpha = r, against transformers + peft on the identical batch
and weights (transformers' own GGUF loading), the two timed in alternation in this one process.
With --task (e.g. arithmetic) the batch is that task's first --batch-size training sequences instead,
right-padded as train.py pads them, with their real response tokens.

Run: python bench/train.py --model minilm --batch-size 32 --seq-len 48 --steps 20
     python bench/train.py --decoder --batch-size 8 --seq-len 64 --steps 10
     python bench/train.py --decoder --task arithmetic --batch-size 8 --steps 10
"""
import argparse
import resource
import sys
import time
from pathlib import Path

# run as `python bench/train.py`: import the repository's modules, not this folder's
# (here `train` would otherwise be this very file)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

import inilora
import train
from checkpoint import packaged_path
from common import pick_device, run_cli
from data.prepare import load_split
from data.sft import IGNORE_INDEX
from decoder import load_causal_lm
from model import load_model


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench(init, args, device):
    torch.manual_seed(0)
    model, tokenizer, model_id = load_model(args.model, num_labels=2)
    cfg = inilora.LoRAConfig(init=init, rank=args.rank).validate()
    inilora.inject(model, cfg, model_id)
    trainable, total = inilora.mark_trainable(model, cfg)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=g).to(device)  # (B, T)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    labels = torch.randint(0, 2, (args.batch_size,), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            logits = model(ids, mask, types)
        loss = train.loss_fn(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    ms = 1000 * sorted(times)[len(times) // 2]  # median
    print(f"{init:>6} | trainable {trainable:>10,} of {total:,} | {ms:8.1f} ms/step | "
          f"{1000 * args.batch_size / ms:7.1f} samples/s | peak memory {peak_memory_mb(device):,.0f} MiB")


def sft_batch(vocab_size, args, device):
    """(ids, mask, labels), (B, T) each: random tokens, the loss on the second half of every row."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab_size, (args.batch_size, args.seq_len), generator=g)  # (B, T)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = IGNORE_INDEX  # the "prompt" half: no loss
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def bench_decoder(args, device):
    import peft  # the references, needed only here
    import transformers

    model, tokenizer, model_id = load_causal_lm("smollm2")
    cfg = inilora.LoRAConfig(init="lora", rank=args.rank, targets=("q_proj", "v_proj")).validate()
    inilora.inject(model, cfg, model_id)
    trainable, total = inilora.mark_trainable(model, cfg)
    gguf = packaged_path("smollm2")
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]))
    if args.task:  # a real batch: train.py's first micro-batch of the task
        split = load_split(args.task, "train", tokenizer, 512)
        ids, mask, labels = train.sft_batch_on(split, list(range(args.batch_size)), tokenizer.pad_id, device)
        print(f"task {args.task}: batch {tuple(ids.shape)}, {int(mask.sum())} real tokens")
    else:
        ids, mask, labels = sft_batch(model.config.vocab_size, args, device)
    units = int((labels[:, 1:] != IGNORE_INDEX).sum())
    steps = {}
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
            if device.type == "cuda":
                torch.cuda.synchronize()
            return loss.item()

        steps[name] = step
    first = {name: step() for name, step in steps.items()}  # B0 = 0: both start at the base model's loss
    print(f"decoder smollm2, lora r{args.rank} on q_proj,v_proj: trainable {trainable:,} of {total:,}; "
          f"first loss ours {first['ours']:.4f}, transformers+peft {first['transformers+peft']:.4f}")
    times = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):  # alternated, so that drifts in machine load hit both alike
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * sorted(t)[len(t) // 2] for name, t in times.items()}  # medians
    for name in steps:
        print(f"{name:>17} | {ms[name]:8.1f} ms/step | {1000 * args.batch_size / ms[name]:7.1f} samples/s")
    print(f"ratio transformers+peft / ours: {ms['transformers+peft'] / ms['ours']:.2f}x; peak memory of the process "
          f"{peak_memory_mb(device):,.0f} MiB (both models)")


def main(argv=None):
    p = argparse.ArgumentParser(description="Time one training step on a fixed batch.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm", help="local directory, hub id, or 'minilm' (packaged)")
    p.add_argument("--init", default="lora,full", help="comma-separated initialisers to time")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument("--seq-len", type=int, default=48, help="tokens per example (rotten-tomatoes: p95 47)")
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
    for init in args.init.split(","):
        bench(init.strip(), args, device)


if __name__ == "__main__":
    run_cli(main)
