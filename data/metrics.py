"""The GLUE / rotten-tomatoes metrics in numpy.

Each metric takes (preds, labels), two 1-D arrays of the same non-zero length, and returns a float.
Classification tasks pass predicted class ids (argmax of the logits), STS-B passes the predicted
scores. Which task reports which metrics is in `data.prepare.TASKS`; the first metric of a task picks
the best epoch. (Generation tasks report exact_match, computed by evaluate.py's scorer.)

    accuracy   SST-2, QNLI, RTE, rotten-tomatoes (and MRPC's second number)
    f1         MRPC (binary, positive class 1)
    matthews   CoLA (binary)
    pearson    STS-B (and spearman)

Tests: python -m pytest tests/test_metrics.py -q
"""
from typing import Callable

import numpy as np


def _check(preds, labels, name):
    """Both inputs as 1-D float64 arrays of one non-zero length, or a ValueError saying why not."""
    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if preds.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"{name}: preds and labels must be 1-D arrays, got shapes {preds.shape} and "
            f"{labels.shape}. Pass one prediction per example (argmax the logits first)."
        )
    if len(preds) != len(labels):
        raise ValueError(
            f"{name}: got {len(preds)} predictions for {len(labels)} labels; "
            "they must be the same length (one prediction per example)."
        )
    if len(preds) == 0:
        raise ValueError(f"{name}: preds and labels are empty; evaluate on at least one example.")
    if not (np.isfinite(preds).all() and np.isfinite(labels).all()):
        raise ValueError(
            f"{name}: preds or labels contain NaN or inf; the model may have diverged "
            "(check the loss) or the labels are damaged."
        )
    return preds, labels


def _check_binary(preds, labels, name):
    """As `_check`, and every value must be 0 or 1."""
    preds, labels = _check(preds, labels, name)
    for what, x in (("preds", preds), ("labels", labels)):
        bad = np.setdiff1d(np.unique(x), [0.0, 1.0])
        if len(bad):
            raise ValueError(
                f"{name} is a binary metric: {what} must be 0 or 1, got {bad[:5].tolist()}. "
                "Pass class ids (argmax of the logits), not scores or probabilities."
            )
    return preds, labels


def _confusion(preds, labels):
    """(TP, TN, FP, FN) of binary predictions, positive class 1."""
    tp = float(np.sum((preds == 1) & (labels == 1)))
    tn = float(np.sum((preds == 0) & (labels == 0)))
    fp = float(np.sum((preds == 1) & (labels == 0)))
    fn = float(np.sum((preds == 0) & (labels == 1)))
    return tp, tn, fp, fn


def accuracy(preds, labels):
    preds, labels = _check(preds, labels, "accuracy")
    # accuracy = (1/N) sum_i [pred_i == label_i]
    return float(np.mean(preds == labels))


def f1(preds, labels):
    preds, labels = _check_binary(preds, labels, "f1")
    tp, _, fp, fn = _confusion(preds, labels)
    # F1 = 2 TP / (2 TP + FP + FN)   (harmonic mean of precision and recall; 0 when 0/0)
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator > 0 else 0.0


def matthews(preds, labels):
    preds, labels = _check_binary(preds, labels, "matthews")
    tp, tn, fp, fn = _confusion(preds, labels)
    # MCC = (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN))
    # 0 when a factor of the denominator is 0 (all one class predicted or present), as sklearn
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator > 0 else 0.0


def _pearson(x, y):
    # r = sum_i (x_i - x_bar)(y_i - y_bar) / sqrt(sum_i (x_i - x_bar)^2 * sum_i (y_i - y_bar)^2)
    # 0 when either side is constant (no variation to correlate; scipy returns nan there)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return float(np.clip(np.sum(dx * dy) / denominator, -1.0, 1.0)) if denominator > 0 else 0.0


def pearson(preds, labels):
    return _pearson(*_check(preds, labels, "pearson"))


def _average_ranks(x):
    """1-based ranks of x; tied values share the average of the ranks they span."""
    values, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    # sorted, the k-th group of equal values fills positions start_k + 1 .. end_k, so
    # rank_k = (start_k + 1 + end_k) / 2   with end_k = counts_1 + ... + counts_k
    end = np.cumsum(counts)
    start = end - counts
    return ((start + 1 + end) / 2.0)[group]


def spearman(preds, labels):
    preds, labels = _check(preds, labels, "spearman")
    # rho = pearson(rank(preds), rank(labels)), ties ranked by their average rank
    return _pearson(_average_ranks(preds), _average_ranks(labels))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
