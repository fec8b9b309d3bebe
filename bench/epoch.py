"""Benchmark of a whole rotten-tomatoes epoch and of evaluation, this project against transformers + peft.

Epoch: one epoch of LoRA r = --rank on query, value (lora_alpha = r, the head trained) from the packaged
MiniLM, batch 32, AdamW lr 3e-4 with train.py's linear schedule (warmup 0.06), --max-length tokens. Three
contestants train in this one process, step i of each in turn, so that drifts in the machine's load hit all:
  ours --group-by-length   train.py's steps in length-sorted chunks of 50 steps (train.epoch_order);
  ours                     the plain shuffle, the same order transformers gets;
  transformers+peft        BertForSequenceClassification + peft LoRA, batches padded to their longest.
Each step (batch padding included) is timed; then each model is scored on the dev split, ours by
evaluate.evaluate (inference mode, batches of 128 sorted by length), transformers in the split's order in
batches of 32 under no_grad, as a training script usually does. Printed: seconds per epoch, dev seconds,
dev accuracy, and the ratios.

Evaluation (--part eval): the trained-or-not models' dev passes alone, alternated --repeats times: examples/s.

Run: python -m bench.epoch                 (both parts; about 6 min on 2 CPU threads)
     python -m bench.epoch --part eval --repeats 5
"""
import argparse
import time

import torch

import inilora
import train
from bench.sidebyside import interleaved, reference_encoder
from data.prepare import TASKS, load_split, pad_batch, training_batch
from evaluate import EVAL_BATCH, evaluate
from lib.common import pick_device, run_cli
from models.encoder import load_model

TASK = "rotten-tomatoes"


def hf_batch(split, idx, pad_id, device):
    """What a data collator hands transformers: padded to the longest, with an attention mask of ones and 0s."""
    ids, types, mask = pad_batch([split["input_ids"][j] for j in idx], [split["token_type_ids"][j] for j in idx],
                                 pad_id)
    mask = torch.ones_like(ids) if mask is None else mask
    return ids.to(device), mask.to(device), types.to(device), split["labels"][idx].to(device)


@torch.no_grad()
def hf_evaluate(ref, split, pad_id, device, batch_size=32):
    """Accuracy of the transformers model on `split`, in the split's order."""
    ref.eval()
    n, correct = len(split["labels"]), 0
    for i in range(0, n, batch_size):
        ids, mask, types, labels = hf_batch(split, list(range(i, min(n, i + batch_size))), pad_id, device)
        correct += int((ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.argmax(-1) == labels).sum())
    return {"accuracy": correct / n}


def contestants(args, device):
    """{name: (model, forward(batch) -> logits, batch builder, order, evaluate(split) -> metrics)}."""
    torch.manual_seed(0)
    cfg = inilora.LoRAConfig(init="lora", rank=args.rank).validate()
    out = {}
    for name, grouped in (("ours --group-by-length", True), ("ours", False)):
        model, tokenizer, model_id = load_model("minilm", num_labels=2, head_seed=0)
        inilora.inject(model, cfg, model_id)
        inilora.mark_trainable(model, cfg, verbose=False)
        model.to(device)
        out[name] = (model, lambda b, m=model: m(b[0], b[1], b[2]),
                     lambda *a: training_batch(TASKS[TASK], *a), grouped,
                     lambda split, m=model: evaluate(m, split, TASKS[TASK], tokenizer.pad_id, EVAL_BATCH, device))
    ref = reference_encoder("minilm", 2, "lora", args.rank, cfg.targets, device)
    out["transformers+peft"] = (ref, lambda b: ref(input_ids=b[0], attention_mask=b[1], token_type_ids=b[2]).logits,
                                hf_batch, False, lambda split: hf_evaluate(ref, split, tokenizer.pad_id, device))
    return out, tokenizer


def run_epoch(args, device):
    models, tokenizer = contestants(args, device)
    splits = {s: load_split(TASK, s, tokenizer, args.max_length) for s in ("train", "dev")}
    split = splits["train"]
    n = len(split["labels"])
    lengths = torch.tensor([len(x) for x in split["input_ids"]])
    B = args.batch_size
    total = -(-n // B)
    cfg = train.TrainConfig(lr=args.lr, warmup_ratio=0.06)
    state = {}
    for name, (model, forward, batch, grouped, _) in models.items():
        order = train.epoch_order(n, 0, 0, lengths if grouped else None, B)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        model.train()
        state[name] = {"order": order, "opt": opt, "seconds": 0.0, "losses": [], "tokens": 0}
    print(f"{TASK}: {n} training examples, {total} steps of {B}, max length {args.max_length}; "
          f"{torch.get_num_threads()} threads; the contestants take turns step by step")
    for step in range(total):
        lr = train.lr_at(step, total, cfg)
        for name, (model, forward, batch, grouped, _) in models.items():
            st = state[name]
            idx = st["order"][step * B:(step + 1) * B].tolist()
            for group in st["opt"].param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            b = batch(split, idx, tokenizer.pad_id, device)
            loss = train.loss_fn(forward(b), b[3])
            st["opt"].zero_grad(set_to_none=True)
            loss.backward()
            st["opt"].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            st["seconds"] += time.perf_counter() - start
            st["losses"].append(loss.item())  # outside the clock
            st["tokens"] += b[0].numel()
        if (step + 1) % 50 == 0 or step + 1 == total:
            print(f"step {step + 1}/{total} | " + " | ".join(f"{name} {st['seconds']:.0f} s, loss "
                  f"{sum(st['losses'][-50:]) / len(st['losses'][-50:]):.3f}" for name, st in state.items()), flush=True)
    for name, (model, _, _, _, score) in models.items():
        start = time.perf_counter()
        state[name]["dev"] = score(splits["dev"])["accuracy"]
        state[name]["dev_seconds"] = time.perf_counter() - start
    real = int(lengths.sum())
    ref = state["transformers+peft"]
    print(f"\n| | train s/epoch | tokens fed (real {real:,}) | dev s | epoch + dev s | ratio to transformers+peft | dev accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, st in state.items():
        whole = st["seconds"] + st["dev_seconds"]
        print(f"| {name} | {st['seconds']:.1f} | {st['tokens']:,} | {st['dev_seconds']:.1f} | {whole:.1f} | "
              f"{whole / (ref['seconds'] + ref['dev_seconds']):.2f} | {st['dev']:.4f} |")
    return models, splits, tokenizer


def run_eval(args, device, models=None, splits=None, tokenizer=None):
    if models is None:
        models, tokenizer = contestants(args, device)
        splits = {"dev": load_split(TASK, "dev", tokenizer, args.max_length)}
    dev = splits["dev"]
    fns = {name: (lambda score=score: score(dev)) for name, (_, _, _, _, score) in models.items()
           if name != "ours --group-by-length"}  # the same model code as "ours"
    sec = interleaved(fns, args.repeats, 1, device)
    n = len(dev["labels"])
    print(f"\nevaluation of {n} dev examples, median of {args.repeats}: " + " | ".join(
        f"{name} {n / t:,.0f} examples/s" for name, t in sec.items())
        + f" | ratio {sec['transformers+peft'] / sec['ours']:.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--part", default="both", choices=("both", "epoch", "eval"), help="what to time")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--max-length", type=int, default=64, help="tokens per review at most (the CPU grids' 64)")
    p.add_argument("--repeats", type=int, default=3, help="evaluation: timed passes per contestant")
    p.add_argument("--device", default=None, help="cuda, mps or cpu; None: the first available")
    args = p.parse_args(argv)
    device, why = pick_device(args.device)
    print(f"device {device} ({why})")
    if args.part == "eval":
        return run_eval(args, device)
    trained = run_epoch(args, device)
    if args.part == "both":
        run_eval(args, device, *trained)


if __name__ == "__main__":
    run_cli(main)
