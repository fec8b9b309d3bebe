"""Benchmark of one training step (forward, backward, AdamW) on a fixed batch.

Times train.py's step for a fixed batch of real tokens on the chosen model: ms/step,
samples/s and peak memory, for LoRA-style adapters and for full fine-tuning, so that
the cost of an initialiser (none at step time: they differ only in A0, B0) and of full
fine-tuning can be compared. Not a test: its figures go into the README.

Run: python bench/train.py --model minilm --batch-size 32 --seq-len 48 --steps 20
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
from common import pick_device, run_cli
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
    args = p.parse_args(argv)
    device, why = pick_device(args.device)
    print(f"device {device} ({why}), dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size} x {args.seq_len} tokens")
    for init in args.init.split(","):
        bench(init.strip(), args, device)


if __name__ == "__main__":
    run_cli(main)
