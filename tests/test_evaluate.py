"""Checks evaluate.py beyond the metrics: the evaluation loop on a fake model whose logits are
fixed per example (classification and regression, in order, dynamically padded, eval mode, no
gradients).

    python3 -m pytest tests/test_evaluate.py -q
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate
from data.prepare import TASKS
from evaluate import METRICS, predict

# -----------------------------------------------------------------------------
# the evaluation loop


class FixedLogits(nn.Module):
    """logits[b] = table[input_ids[b, 0]]: each example's first token id picks its row.
    Records, per call: the batch shape, the real lengths (mask sums), train mode and grad mode."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)  # (V, num_labels)
        self.calls = []

    def forward(self, input_ids, attention_mask, token_type_ids):
        assert input_ids.shape == attention_mask.shape == token_type_ids.shape
        self.calls.append((tuple(input_ids.shape), attention_mask.sum(1).tolist(), self.training,
                           torch.is_grad_enabled()))
        return self.table[input_ids[:, 0]]  # (B, num_labels)


PAD = 9


def fake_split(labels, lengths=(3, 1, 4, 2, 2)):
    """Example i is [i, 7, 7, ...] of lengths[i] tokens."""
    ids = [torch.tensor([i] + [7] * (n - 1)) for i, n in enumerate(lengths)]
    return {"input_ids": ids, "token_type_ids": [torch.zeros_like(x) for x in ids], "labels": torch.tensor(labels)}


def test_classification_predictions_and_metrics():
    # argmax per example: 1, 0, 1, 1, 0
    model = FixedLogits([[0.0, 1.0], [2.0, -1.0], [-3.0, 3.0], [0.1, 0.2], [5.0, 4.0]]).train()
    split = fake_split([1, 0, 0, 1, 1])
    out = evaluate.evaluate(model, split, TASKS["mrpc"], PAD, batch_size=2)
    # TP = 2, FP = 1, FN = 1, TN = 1: F1 = 2*2 / (2*2 + 1 + 1), accuracy 3/5
    assert out == {"f1": pytest.approx(4 / 6), "accuracy": pytest.approx(3 / 5)}
    assert list(out) == list(TASKS["mrpc"].metrics)
    # in order, batches of 2, 2, 1, each padded to its own longest example, eval mode, no grad
    assert model.calls == [((2, 3), [3, 1], False, False), ((2, 4), [4, 2], False, False),
                           ((1, 2), [2], False, False)]
    assert not model.training
    np.testing.assert_array_equal(predict(model, split, TASKS["mrpc"], PAD, batch_size=64), [1, 0, 1, 1, 0])


def test_regression_predictions_are_the_scores():
    scores = [0.5, 2.0, 1.0, 4.0, 3.0]
    model = FixedLogits([[s] for s in scores])
    split = fake_split([1.0, 2.5, 2.0, 5.0, 3.5])
    preds = predict(model, split, TASKS["stsb"], PAD, batch_size=3)
    np.testing.assert_allclose(preds, scores, rtol=0, atol=1e-6)
    out = evaluate.evaluate(model, split, TASKS["stsb"], PAD, batch_size=3)
    labels = split["labels"].numpy()
    assert out["pearson"] == pytest.approx(METRICS["pearson"](np.array(scores), labels))
    assert out["pearson"] < 1.0
    assert out["spearman"] == pytest.approx(1.0)  # same order: 0.5 < 1 < 2 < 3 < 4 and 1 < 2 < 2.5 < 3.5 < 5


def test_wrong_number_of_logits_is_a_clear_error():
    model = FixedLogits(torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"needs \(2, 2\).*num_labels=2"):
        evaluate.evaluate(model, fake_split([0, 1, 0, 1, 0]), TASKS["sst2"], PAD, batch_size=2)
    with pytest.raises(ValueError, match="batch size of at least 1"):
        evaluate.evaluate(model, fake_split([0, 1, 0, 1, 0]), TASKS["sst2"], PAD, batch_size=0)
