"""What a task's kind decides for train.py: its batches, what its loss is a mean over, the loss, and the
dev evaluation after each epoch. The loop (train.py) is the same for every kind.

A step's loss is the sum of its micro-batches' shares: share = (loss of the micro-batch's units) / (units of
the whole step), units being examples (classification, regression) or response tokens predicted
(generation: supervised fine-tuning of a causal LM), so gradient accumulation, and data parallelism under
torchrun (lib/distributed.py), give the gradient of one big batch.

    classification  L = mean over the step's examples of CE(logits_b, y_b)      (MSE for regression)
    generation      L = (1/N) sum over the step's N response tokens x_t of CE(logits_{t-1}, x_t)
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lib import distributed
from data.prepare import pad_batch
from data.sft import IGNORE_INDEX, sft_batch
from evaluate import EVAL_BATCH, METRICS, predict
from generation import metrics_of as generation_metrics
from generation import score as evaluate_generation

# Legend: B examples in a micro-batch, T tokens (the longest in it), V vocabulary.


def loss_fn(logits, labels):
    # cross-entropy for classes; mean squared error for regression (num_labels = 1, STS-B)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0].float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def classification_batch(split, idx, pad_id, device):
    """(input_ids, attention_mask, token_type_ids, labels) of examples `idx`, padded to the longest."""
    ids, types, mask = pad_batch([split["input_ids"][j] for j in idx],
                                 [split["token_type_ids"][j] for j in idx], pad_id)  # (B, T) each
    mask = None if mask is None else mask.to(device)  # None: no padding
    return ids.to(device), mask, types.to(device), split["labels"][idx].to(device)


def classification_loss(model, batch, units):
    ids, mask, types, labels = batch
    logits = model(ids, mask, types)  # (B, num_labels)
    # the mean over the micro-batch's B examples, weighted by B / (examples in the step): exactly 1 without
    # accumulation, so the loss and its gradients are those of a plain batch
    return loss_fn(logits, labels) * (len(labels) / units)


def token_loss(logits, targets):
    # sum_n CE(logits_n, x_n) over the N loss tokens: logits (N, V) at positions t - 1, targets x_t (N,)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def sft_batch_on(split, idx, pad_id, device):
    """(input_ids, attention_mask, labels) of training sequences `idx`, right-padded (data.sft.sft_batch)."""
    ids, mask, labels = sft_batch([split["input_ids"][j] for j in idx], [split["token_type_ids"][j] for j in idx],
                                  pad_id)  # (B, T) each
    return ids.to(device), mask.to(device), labels.to(device)


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


@dataclass(frozen=True)
class Kind:
    batch: Callable                # (split, example indices, pad_id, device) -> a micro-batch
    count: Callable                # (split, example indices) -> what the loss is a mean over, from the data on
                                   # the CPU (no device sync): examples, or response tokens predicted
    loss: Callable                 # (model, micro-batch, units of the step) -> the micro-batch's share of L


def sft_count(split, idx):
    # the tokens sft_batch gives a label, past position 0 (no token predicts it): response tokens, type 1
    return sum(int(split["token_type_ids"][j][1:].sum()) for j in idx)


CLASSIFY = Kind(classification_batch, lambda split, idx: len(idx), classification_loss)
KINDS = {"classification": CLASSIFY, "regression": CLASSIFY, "generation": Kind(sft_batch_on, sft_count, sft_loss)}


def take(split, idx):
    """The examples `idx` of a prepared split: its per-example lists and tensors indexed, the rest (counts of
    a generation split's truncations) kept."""
    return {k: [v[i] for i in idx] if isinstance(v, list) else v[idx] if torch.is_tensor(v) else v
            for k, v in split.items()}


def dev_scores(cfg, task, s, device):
    """(metrics, printed description of what was scored) on the dev split; under torchrun each rank scores
    its share and the predictions are gathered, so every rank gets the metrics of the whole split."""
    dev, world = s.splits["dev"], s.world
    if task.kind != "generation":
        n = len(dev["labels"])
        mine = distributed.share(list(range(n)), world)
        preds = (predict(s.model, take(dev, mine), task, s.pad_id, cfg.eval_batch_size or EVAL_BATCH, device)
                 if mine else np.empty(0))
        preds = np.concatenate(distributed.gather(preds, world))  # (N,), in the split's order
        return {name: METRICS[name](preds, dev["labels"].numpy()) for name in task.metrics}, "dev"
    n = len(dev["prompt_ids"])
    limit = min(cfg.eval_limit or n, n)
    mine = distributed.share(list(range(limit)), world)
    batch = cfg.eval_batch_size or cfg.batch_size
    mine = evaluate_generation(s.model, s.tokenizer, take(dev, mine), task, batch, cfg.max_new_tokens, None, device,
                               desc="generating dev")[1] if mine else []
    records = [r for part in distributed.gather(mine, world) for r in part]  # every rank's, in order
    return generation_metrics(records), "dev" if limit == n else f"dev subset {limit} of {n}"
