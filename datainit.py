"""The statistics of the data-driven initialisers (inilora.DATA_DRIVEN), read from a few training batches.

EVA and LoRA-GA set A0, B0 from what the base model does on the task's own data, before any weight changes.
This file runs the base model (the targets still plain nn.Linear) over the first --init-batches micro-batches
of the run's seeded order and keeps, per target matrix W0 (d_out, d_in):

    eva      C = sum_t (x_t - mu)(x_t - mu)^T,   mu = (1/n) sum_t x_t
             (EVA: Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
             Adaptation"; PEFT's peft/tuners/lora/eva.py)
             the scatter matrix of the layer's n input vectors x_t (d_in,): its eigenvectors are the right
             singular vectors of the centred inputs X - 1 mu^T, the principal components PEFT's EVA computes
    lora-ga  G = (1/N) sum_b dL_b / dW0
             (LoRA-GA: Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", Algorithm 1)
             the full-weight gradient of the mean training loss, averaged over the N batches

inilora.py's initialisers turn them into A0, B0 (init_eva, init_lora_ga). The pass runs in eval mode
(no dropout), so the statistics depend on the weights and the batches alone; EVA's runs under no_grad,
LoRA-GA's asks autograd for the target weights' gradients only (every parameter frozen meanwhile).
Both are accumulated on the model's device (C in float64, G in float32) and handed over on the CPU, where
the initialisers compute (as every initialiser does: CPU and GPU runs start from the same A0, B0).
Memory: C is d_in^2 float64 per target (1.2 MB for MiniLM's 384, 128 MiB for a 4096-wide layer);
G is one float32 copy of each target weight, plus the activations a backward pass keeps.

Run: python train.py --init eva --init-batches 4 --epochs 1
     (prints the pass's cost line, then inject's; both are kept in final.json as "init_cost")
"""
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lib.runs import peak_memory
from models import target_linears

# Shapes: n input vectors (tokens) of a layer, d_in / d_out its sizes, N batches.


@dataclass
class InitData:
    """The batches a data-driven initialiser reads (train.init_data builds it from the run's training split)."""
    batches: list                  # the first --init-batches micro-batches of the run's seeded order
    loss: Callable                 # loss(model, batch) -> the training objective on that batch (a scalar)
    tokens: Callable               # tokens(batch) -> (B, T) bool: the positions whose layer inputs count, or None


def _each_batch(model, data, hooks=None):
    """Runs data.loss over every batch in eval mode, yielding (batch, loss); `hooks` {linear: pre-hook(mask)}."""
    training = model.training
    model.eval()
    current = {}
    handles = [linear.register_forward_pre_hook(lambda module, inputs, hook=hook: hook(inputs[0], current["mask"]))
               for linear, hook in (hooks or {}).items()]
    try:
        for batch in data.batches:
            current["mask"] = data.tokens(batch)
            yield data.loss(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)


@torch.no_grad()
def input_scatter(model, linears, data):
    """EVA: {name: C (d_in, d_in) float64}, the scatter matrix of the target's inputs over the batches' tokens."""
    n, total, gram = {}, {}, {}

    def record(name):
        def hook(x, mask):  # x (B, T, d_in); mask (B, T) or None
            if mask is not None:  # a layer may see a prefix only (an encoder's last query: position 0)
                x = x[mask[:, : x.shape[1]].bool()]                  # (B, T, d_in) -> (n_b, d_in)
            x = x.reshape(-1, x.shape[-1]).double()                   # (n_b, d_in)
            n[name] = n.get(name, 0) + x.shape[0]
            total[name] = total.get(name, 0) + x.sum(0)               # (d_in,)
            gram[name] = gram.get(name, 0) + x.T @ x                  # (d_in, n_b) @ (n_b, d_in) -> (d_in, d_in)
        return hook

    for _ in _each_batch(model, data, {linear: record(name) for name, linear in linears.items()}):
        pass
    scatter = {}
    for name in linears:
        mu = total[name] / n[name]                                    # (d_in,)
        # C = sum_t (x_t - mu)(x_t - mu)^T = sum_t x_t x_t^T - n mu mu^T
        scatter[name] = gram[name] - n[name] * torch.outer(mu, mu)    # (d_in, d_in)
    return scatter, min(n.values())


def weight_gradients(model, linears, data):
    """LoRA-GA: {name: G (d_out, d_in) float32}, the gradient dL/dW0 averaged over the batches."""
    was = {p: p.requires_grad for p in model.parameters()}
    weights = [linear.weight for linear in linears.values()]
    model.requires_grad_(False)
    for W0 in weights:  # a temporary requires_grad on the frozen weights: autograd computes only what they need
        W0.requires_grad_(True)
    G = [torch.zeros(W0.shape, dtype=torch.float32, device=W0.device) for W0 in weights]
    try:
        for loss in _each_batch(model, data):
            for total, grad in zip(G, torch.autograd.grad(loss, weights)):
                total += grad.float()                                 # (d_out, d_in)
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)
    # G = (1/N) sum_b dL_b / dW0
    return {name: total / len(data.batches) for name, total in zip(linears, G)}, None


STATISTICS = {"eva": input_scatter, "lora-ga": weight_gradients}  # inilora.DATA_DRIVEN: init -> its statistics


def collect(model, cfg, data):
    """({target name: its statistics, on the CPU}, cost) for the data-driven init `cfg.init` on the base `model`
    (targets not yet adapted). Prints one line with the cost: seconds, peak memory and what was read."""
    if cfg.init not in STATISTICS:
        raise ValueError(f"init {cfg.init!r} reads no training batches; the data-driven initialisers are "
                         f"{sorted(STATISTICS)}.")
    if not data.batches:
        raise ValueError(f"init {cfg.init!r} needs at least one training batch, and none was given; pass "
                         "--init-batches 1 or more (and a training split that is not empty).")
    linears = target_linears(model, cfg.targets)
    name, smallest = min(linears.items(), key=lambda item: min(item[1].weight.shape))
    if cfg.init == "lora-ga" and 2 * cfg.rank > min(smallest.weight.shape):
        raise ValueError(f"lora-ga takes 2r = {2 * cfg.rank} singular vectors of each gradient, but {name} "
                         f"{tuple(smallest.weight.shape)} has {min(smallest.weight.shape)}; choose "
                         f"--rank {min(smallest.weight.shape) // 2} or less.")
    device = smallest.weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the pass's own peak (the model is on the device already)
    started = time.perf_counter()
    stats, tokens = STATISTICS[cfg.init](model, linears, data)
    if cfg.init == "eva" and tokens <= cfg.rank:
        raise ValueError(f"eva takes the top r = {cfg.rank} principal components of each target's inputs, but the "
                         f"{len(data.batches)} batches give only {tokens} tokens; raise --init-batches.")
    stats = {name: s.cpu() for name, s in stats.items()}
    seconds = time.perf_counter() - started
    mib, measure = peak_memory(device)
    cost = {"init": cfg.init, "batches": len(data.batches), "seconds": round(seconds, 3),
            "peak_memory_mib": round(mib, 1), "peak_memory_measure": measure}
    read = f"{len(data.batches)} training batches" + (f", {tokens:,} tokens a layer at least" if tokens else "")
    print(f"init {cfg.init}: statistics of {read} for {len(linears)} layers in {seconds:.2f} s; "
          f"peak memory {mib:,.0f} MiB ({measure})")
    return stats, cost
