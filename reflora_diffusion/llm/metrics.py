"""GLUE's official metrics (Wang et al. 2019, Table 1), computed with scikit-learn and scipy.

CoLA: Matthews correlation. SST-2, QNLI, RTE, MNLI (matched and mismatched, evaluated apart): accuracy.
MRPC, QQP: accuracy and F1 of the positive class (1 = paraphrase / duplicate).
STS-B: Pearson and Spearman correlation of a regression output with the 0..5 gold score.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

# The number each task contributes to the usual "GLUE average" (LoRA / AdaLoRA / RefLoRA tables):
# CoLA Mcc, STS-B Pearson, MNLI matched accuracy, accuracy elsewhere.
MAIN_METRIC = {"cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "accuracy", "stsb": "pearson",
               "qqp": "accuracy", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def _correlation(fn, preds, labels) -> float:
    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if preds.std() == 0 or labels.std() == 0:  # undefined for a constant input: report 0, not NaN
        return 0.0
    return float(fn(preds, labels)[0])


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """Metrics for `task` from model outputs: logits (N, C) or class ids (N,) or, for STS-B, scores (N,) / (N, 1)."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if task == "stsb":
        scores = predictions.reshape(-1).astype(np.float64)
        pearson = _correlation(pearsonr, scores, labels)
        spearman = _correlation(spearmanr, scores, labels)
        return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2}
    preds = predictions.argmax(-1) if predictions.ndim == 2 else predictions
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    if task in ("mrpc", "qqp"):
        acc = accuracy(preds, labels)
        f1 = float(f1_score(labels, preds, zero_division=0.0))
        return {"accuracy": acc, "f1": f1, "combined_score": (acc + f1) / 2}
    if task in ("sst2", "mnli", "qnli", "rte"):
        return {"accuracy": accuracy(preds, labels)}
    raise ValueError(f"unknown GLUE task {task!r}; choose one of: {', '.join(MAIN_METRIC)}")


def main_value(task: str, metrics: dict, prefix: str = "eval_") -> float | None:
    """The task's headline number from Trainer-style metrics (`eval_accuracy`, `eval_matched_accuracy`, ...)."""
    name = MAIN_METRIC[task]
    for key in (f"{prefix}matched_{name}", f"{prefix}{name}", name):
        value = metrics.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None
