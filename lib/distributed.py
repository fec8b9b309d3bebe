"""Data parallelism under torchrun: one process (rank) per device, each taking its share of every step.

    torchrun --nproc_per_node 2 train.py --init inilora ...      (gloo on CPUs, NCCL on GPUs)

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them (a plain `python train.py`) the world is one
process and nothing here communicates. With N ranks, one optimizer step over a global batch of examples
G (batch_size x grad_accum, as in a single process) is:
    rank k takes its contiguous share G_k of G (the shares differ by at most one example);
    L = sum_k sum_{units u in G_k} loss_u / units(G)     (units of the WHOLE step: examples or response tokens)
    each rank back-propagates its own part; the gradients are SUMMED across ranks (one all-reduce a step),
    so every rank holds dL/dtheta of the whole batch, takes the same AdamW step, and keeps identical weights.
That is the single-process step up to the order of the float32 sums. Rank 0 alone writes checkpoints,
metrics and logs; dev evaluation is split the same way and gathered. Dropout draws differ per rank (seed +
rank), so with dropout on, N ranks follow another random path than one process (the same distribution).
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self):
        return self.rank == 0


def init(device_arg=None):
    """(World, device or None): joins torchrun's process group when WORLD_SIZE > 1 (NCCL with one GPU per
    rank, LOCAL_RANK's; gloo on CPUs). device None: a single process, which picks its device as usual."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg not in (None, "cpu", "cuda"):
        raise ValueError(f"--device {device_arg!r} under torchrun: pass cuda (one GPU per rank, NCCL) or cpu (gloo).")
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} has LOCAL_RANK {local}, but this machine has {torch.cuda.device_count()} "
                               "GPUs: pass --nproc_per_node at most the number of GPUs, or --device cpu.")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size), torch.device("cuda", local) if cuda else torch.device("cpu")


def share(items, world):
    """Rank `world.rank`'s contiguous share of `items` (a list or tensor): sizes differ by at most one."""
    n = len(items)
    start, end = (world.rank * n) // world.size, ((world.rank + 1) * n) // world.size
    return items[start:end]


def sum_gradients(params, world):
    """Replaces each parameter's gradient by its sum over the ranks: one all-reduce of one flat buffer.
    A rank whose share was empty contributes zeros."""
    if world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)  # SUM
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()


def sum_tensor(t, world):
    """The sum over ranks of `t` (a new tensor; `t` itself for one process)."""
    if world.size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def any_rank(flag, world, device):
    """True on every rank when `flag` is true on any: ranks agree to stop at the same step."""
    if world.size == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled by torch.distributed: objects this process
    made, never files)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world):
    if world.size > 1:
        dist.barrier()


def finish(world):
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def steps_note(world, stored_size):
    """What a resume across world sizes means, or None when the size is the one stored."""
    if stored_size in (None, world.size):
        return None
    return (f"this run was checkpointed with {stored_size} process(es) and resumes with {world.size}: the global "
            "batch, data order, learning rate and optimizer state carry over unchanged, so the steps are the same "
            "up to float32 sum order, but each rank's dropout draws start afresh from seed + rank (with dropout on, "
            "not the random path an uninterrupted run would take).")
