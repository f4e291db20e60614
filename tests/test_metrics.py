"""GLUE metrics against direct formulas (independent of the scikit-learn/scipy calls they wrap)."""

import math

import numpy as np
import pytest

from bench import plugins

PREDS = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
REFS = [1, 0, 0, 1, 0, 1, 1, 0, 1, 0]


@pytest.fixture(scope="module")
def metric():
    return plugins.load().metrics.get


def test_accuracy(metric):
    assert metric("accuracy")(PREDS, REFS) == pytest.approx(np.mean(np.equal(PREDS, REFS)))


def _confusion():
    tp = sum(p == r == 1 for p, r in zip(PREDS, REFS, strict=True))
    tn = sum(p == r == 0 for p, r in zip(PREDS, REFS, strict=True))
    fp = sum(p == 1 and r == 0 for p, r in zip(PREDS, REFS, strict=True))
    fn = sum(p == 0 and r == 1 for p, r in zip(PREDS, REFS, strict=True))
    return tp, tn, fp, fn


def test_f1(metric):
    tp, _, fp, fn = _confusion()
    assert metric("f1")(PREDS, REFS) == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_matthews(metric):
    tp, tn, fp, fn = _confusion()
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metric("matthews_correlation")(PREDS, REFS) == pytest.approx(expected)


def test_pearson_and_spearman(metric):
    x = np.array([0.1, 2.5, 3.0, 4.2, 1.0, 5.0])
    y = np.array([0.0, 2.0, 3.5, 4.0, 1.5, 4.5])
    assert metric("pearson")(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731 - no ties here
    assert metric("spearmanr")(x, y) == pytest.approx(np.corrcoef(rank(x), rank(y))[0, 1])
