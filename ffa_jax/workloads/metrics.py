"""Classification metrics from predictions and scores (pure numpy, no scikit-learn).

Every evaluation of a classifier reports, next to accuracy, the metrics that do not reward
predicting the majority class: balanced accuracy (the mean of the per-class recalls), macro-F1
(the unweighted mean of the per-class F1 scores) and, for binary tasks, ROC-AUC (the
probability that a random positive scores above a random negative, ties counting one half:
the Mann-Whitney U statistic divided by ``n_pos * n_neg``).

Conventions for empty classes (a class absent from the labels of the evaluated split): its
recall is undefined and it is left out of balanced accuracy (reported as ``nan`` in the
per-class list); its F1 is 0 when it is predicted (every prediction of it is wrong) and it is
left out of macro-F1 when it is neither present nor predicted. ROC-AUC is ``nan`` when the
split holds only one class.
"""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64 counts, row = true class, column = predicted class."""
    labels = np.asarray(labels, np.int64).reshape(-1)
    preds = np.asarray(preds, np.int64).reshape(-1)
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC-AUC of ``scores`` ``[N]`` (higher = class 1) against ``labels`` ``[N]`` in
    {0, 1}: the Mann-Whitney U of the positives' mid-ranks over ``n_pos * n_neg``. ``nan``
    when one class is absent."""
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores, np.float64).reshape(-1)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Mid-ranks (1-based) of tied scores: ties count one half.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mid, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, preds: np.ndarray | None = None
) -> dict[str, float | list[float]]:
    """Accuracy, balanced accuracy, macro-F1, per-class recall and (two classes) ROC-AUC.

    Args:
      labels: ``[N]`` int true classes in ``[0, C)``.
      probs: ``[N, C]`` class scores (softmax probabilities); column 1 is the binary score.
      preds: ``[N]`` predicted classes (default ``argmax(probs, -1)``).

    Returns:
      ``{"accuracy", "balanced_accuracy", "macro_f1", "recall_per_class": [C]}`` and, when
      ``C == 2``, ``"auc"``; ``nan`` where undefined (see the module docstring). An empty
      split gives ``nan`` everywhere.
    """
    probs = np.asarray(probs, np.float64)
    num_classes = probs.shape[-1]
    labels = np.asarray(labels, np.int64).reshape(-1)
    preds = np.argmax(probs, -1) if preds is None else np.asarray(preds, np.int64).reshape(-1)
    cm = confusion_matrix(labels, preds, num_classes)
    support = cm.sum(1)
    predicted = cm.sum(0)
    tp = np.diag(cm).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        f1 = np.where(
            precision + np.nan_to_num(recall) > 0,
            2 * precision * np.nan_to_num(recall) / (precision + np.nan_to_num(recall)),
            0.0,
        )
    counted = (support > 0) | (predicted > 0)
    n = len(labels)
    out: dict[str, float | list[float]] = {
        "accuracy": float(tp.sum() / n) if n else math.nan,
        "balanced_accuracy": float(np.nanmean(recall)) if (support > 0).any() else math.nan,
        "macro_f1": float(f1[counted].mean()) if counted.any() else math.nan,
        "recall_per_class": [float(r) for r in recall],
    }
    if num_classes == 2:
        out["auc"] = roc_auc(labels, probs[:, 1]) if n else math.nan
    return out
