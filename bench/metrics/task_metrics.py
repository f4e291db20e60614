"""GLUE's official task metrics, registered as a built-in metric plugin.

Values follow ``evaluate``'s glue metric exactly: it wraps these same scikit-learn/scipy calls and
reports fractions in [0, 1] (accuracy, F1 of the positive class, Matthews corr., Pearson, Spearman).
scikit-learn and scipy are imported where a metric is computed: every ``bench`` command loads this plugin, and
they would add about 2 s to ``bench list``.
"""

import numpy as np

from bench import hookimpl


def accuracy(predictions, references) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(references, predictions))


def f1(predictions, references) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(references, predictions))


def matthews_correlation(predictions, references) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(references, predictions))


def pearson(predictions, references) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(np.asarray(predictions, float), np.asarray(references, float))[0])


def spearman(predictions, references) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(predictions, references)[0])


@hookimpl
def register_metrics(register):
    # fractions in [0, 1], shown x100 in the leaderboard (GLUE's convention)
    register("accuracy", accuracy, higher_is_better=True, percent=True)
    register("f1", f1, higher_is_better=True, percent=True)
    register("matthews_correlation", matthews_correlation, higher_is_better=True, percent=True)
    register("pearson", pearson, higher_is_better=True, percent=True)
    register("spearmanr", spearman, higher_is_better=True, percent=True)
