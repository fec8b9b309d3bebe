"""Checks the metrics in evaluate.py: hand-computed cases (ties, one-class edge cases),
agreement with scipy where it is installed, and clear errors on bad inputs.

    python3 -m pytest tests/test_metrics.py -q
"""
import math

import numpy as np
import pytest

from data.metrics import METRICS, accuracy, f1, matthews, pearson, spearman


def test_metric_table_names():
    assert sorted(METRICS) == ["accuracy", "f1", "matthews", "pearson", "spearman"]


def test_accuracy_by_hand():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy([2, 0, 1], [2, 0, 1]) == 1.0  # not only binary
    assert accuracy(np.array([0]), np.array([1])) == 0.0


def test_f1_by_hand():
    # TP = 2, FP = 1, FN = 1 -> 2*2 / (2*2 + 1 + 1) = 4/6
    preds, labels = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
    assert f1(preds, labels) == pytest.approx(4 / 6)
    # precision 2/3, recall 2/3 -> harmonic mean 2/3: the same number
    assert f1(preds, labels) == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))


def test_f1_edge_cases():
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0  # no positives anywhere: 0/0 -> 0
    assert f1([0, 0, 0], [1, 1, 0]) == 0.0  # nothing predicted positive
    assert f1([1, 1, 1], [1, 1, 1]) == 1.0
    assert f1([1, 1, 1], [1, 0, 0]) == pytest.approx(2 / 4)  # all one class predicted


def test_matthews_by_hand():
    # TP = 2, TN = 1, FP = 1, FN = 1 -> (2 - 1) / sqrt(3 * 3 * 2 * 2) = 1/6
    preds, labels = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
    assert matthews(preds, labels) == pytest.approx(1 / 6)
    assert matthews([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert matthews([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_matthews_one_class_is_zero():
    assert matthews([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # all predicted one class
    assert matthews([1, 0, 1, 0], [0, 0, 0, 0]) == 0.0  # all labels one class
    assert matthews([1, 1], [1, 1]) == 0.0  # sklearn returns 0 here too


def test_pearson_by_hand():
    # x - x_bar = (-1, 0, 1), y - y_bar = (-2, 1, 1): r = 3 / sqrt(2 * 6)
    assert pearson([1, 2, 3], [1, 4, 4]) == pytest.approx(3 / math.sqrt(12))
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant predictions: no correlation


def test_spearman_with_ties_by_hand():
    # ranks of (10, 20, 20, 30) are (1, 2.5, 2.5, 4); of (1, 3, 2, 4) are (1, 3, 2, 4)
    # deviations (-1.5, 0, 0, 1.5) and (-1.5, 0.5, -0.5, 1.5): r = 4.5 / sqrt(4.5 * 5)
    assert spearman([10, 20, 20, 30], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    # monotone but not linear -> 1
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    assert spearman([5, 5, 5], [1, 2, 3]) == 0.0


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 11, size=50) / 2.0  # STS-B-like scores with many ties
        preds = labels + rng.normal(0, 1.5, size=50)
        preds[:10] = np.round(preds[:10])  # ties in the predictions too
        assert pearson(preds, labels) == pytest.approx(stats.pearsonr(preds, labels)[0], abs=1e-12)
        assert spearman(preds, labels) == pytest.approx(
            stats.spearmanr(preds, labels)[0], abs=1e-12
        )


def test_binary_metrics_against_formulas_on_random_data():
    rng = np.random.default_rng(1)
    preds, labels = rng.integers(0, 2, size=200), rng.integers(0, 2, size=200)
    tp = np.sum((preds == 1) & (labels == 1))
    fp = np.sum((preds == 1) & (labels == 0))
    fn = np.sum((preds == 0) & (labels == 1))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert f1(preds, labels) == pytest.approx(2 * precision * recall / (precision + recall))
    # MCC of binary labels equals the Pearson correlation of the 0/1 vectors
    assert matthews(preds, labels) == pytest.approx(np.corrcoef(preds, labels)[0, 1])


def test_bad_inputs():
    for name, metric in METRICS.items():
        with pytest.raises(ValueError, match=f"{name}: got 3 predictions for 2 labels"):
            metric([1, 0, 1], [1, 0])
        with pytest.raises(ValueError, match="empty"):
            metric([], [])
        with pytest.raises(ValueError, match="1-D"):
            metric([[1, 0]], [[1, 0]])
        with pytest.raises(ValueError, match="NaN"):
            metric([float("nan"), 1.0], [1.0, 0.0])


def test_binary_metrics_reject_non_binary_values():
    for metric in (f1, matthews):
        with pytest.raises(ValueError, match="preds must be 0 or 1, got \\[0.7"):
            metric([0.7, 1.0], [1, 0])
        with pytest.raises(ValueError, match="labels must be 0 or 1, got \\[2.0\\]"):
            metric([1, 0], [2, 0])
