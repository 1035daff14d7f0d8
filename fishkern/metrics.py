"""GLUE metrics, computed locally in numpy (no download, no scikit-learn or scipy at run time).

The per-task conventions follow the GLUE benchmark (and the Hugging Face ``glue`` metric):

======================  ===========================================  ======================
task                    ``glue_metrics`` keys                        ``main_metric``
======================  ===========================================  ======================
cola                    ``matthews_correlation``                     ``matthews_correlation``
sst2, qnli, rte, wnli,  ``accuracy``                                 ``accuracy``
mnli, mnli_matched,
mnli_mismatched
mrpc, qqp               ``accuracy``, ``f1``, ``combined``           ``combined``
stsb                    ``pearson``, ``spearmanr``, ``combined``     ``combined``
======================  ===========================================  ======================

``combined`` is the mean of the task's two metrics — the number the GLUE score averages for MRPC,
QQP and STS-B. ``f1`` is the binary F1 of the positive class 1.

Degenerate inputs never crash:

* ``matthews_corrcoef`` is 0.0 when the predictions or the labels are constant (one row or column of
  the confusion matrix is empty), as in scikit-learn.
* ``f1_score`` is 0.0 when there is no positive label and no positive prediction (scikit-learn's
  ``zero_division`` default, without its warning).
* ``pearson`` / ``spearman`` return ``nan`` when either input is constant, has fewer than two
  entries or holds a NaN (the correlation is undefined; scipy also returns nan there). ``combined``
  is then nan too.

Inputs may be lists, numpy arrays or torch tensors (any device). Empty inputs, inputs of different
lengths, non-integer class ids and unknown tasks raise ``ValueError``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "GLUE_METRIC_TASKS",
    "accuracy",
    "f1_score",
    "glue_metrics",
    "main_metric",
    "majority_class",
    "matthews_corrcoef",
    "pearson",
    "spearman",
]

# task -> (metric keys, main metric)
_TASK_METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "cola": (("matthews_correlation",), "matthews_correlation"),
    "sst2": (("accuracy",), "accuracy"),
    "mrpc": (("accuracy", "f1", "combined"), "combined"),
    "qqp": (("accuracy", "f1", "combined"), "combined"),
    "stsb": (("pearson", "spearmanr", "combined"), "combined"),
    "mnli": (("accuracy",), "accuracy"),
    "mnli_matched": (("accuracy",), "accuracy"),
    "mnli_mismatched": (("accuracy",), "accuracy"),
    "qnli": (("accuracy",), "accuracy"),
    "rte": (("accuracy",), "accuracy"),
    "wnli": (("accuracy",), "accuracy"),
}

GLUE_METRIC_TASKS: tuple[str, ...] = tuple(_TASK_METRICS)
"""The task names ``glue_metrics`` and ``main_metric`` accept (also spelled ``SST-2``, ``STS-B``,
``MNLI-m``, ``MNLI-mm``: case, '-' and '_' variants are normalised)."""

_ALIASES = {
    "sst": "sst2",
    "sts": "stsb",
    "mnlim": "mnli_matched",
    "mnlimm": "mnli_mismatched",
    "mnlimatched": "mnli_matched",
    "mnlimismatched": "mnli_mismatched",
}


def _normalize_task(task: str) -> str:
    if not isinstance(task, str):
        raise ValueError(f"task must be a string naming a GLUE task, got {task!r}")
    name = task.strip().lower()
    if name in _TASK_METRICS:
        return name
    squashed = name.replace("-", "").replace("_", "")
    if squashed in _TASK_METRICS:
        return squashed
    if squashed in _ALIASES:
        return _ALIASES[squashed]
    raise ValueError(f"unknown GLUE task {task!r}; expected one of {', '.join(GLUE_METRIC_TASKS)}")


def main_metric(task: str) -> str:
    """The name of the task's headline metric (a key of ``glue_metrics(task, ...)``)."""
    return _TASK_METRICS[_normalize_task(task)][1]


# --------------------------------------------------------------------------------------------
# input handling


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, any device
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name} must be numeric, got an object array")
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a 1-D sequence, got a scalar")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (or of shape (N, 1)), got shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def _pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _to_numpy(predictions, "predictions")
    y = _to_numpy(labels, "labels")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"predictions and labels differ in length: {p.shape[0]} predictions, {y.shape[0]} labels")
    if p.shape[0] == 0:
        raise ValueError("predictions and labels are empty: a metric needs at least one example")
    return p, y


def _class_ids(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise ValueError(f"{name} must be integer class ids, got non-integer values (dtype {arr.dtype})")
    return arr.astype(np.int64)


def _classes_pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = _pair(predictions, labels)
    return _class_ids(p, "predictions"), _class_ids(y, "labels")


# --------------------------------------------------------------------------------------------
# classification


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of predictions equal to the labels."""
    p, y = _classes_pair(predictions, labels)
    return float(np.mean(p == y))


def majority_class(labels: Any) -> tuple[int, float]:
    """The most frequent class id of ``labels`` and its share: the accuracy of a classifier that
    always answers it — the chance level a report should show next to the accuracies (a model
    that learned nothing scores it). Ties go to the lowest class id."""
    y = _class_ids(_to_numpy(labels, "labels"), "labels")
    if y.size == 0:
        raise ValueError("labels are empty: the majority class needs at least one example")
    values, counts = np.unique(y, return_counts=True)  # values sorted: argmax picks the lowest on ties
    i = int(np.argmax(counts))
    return int(values[i]), float(counts[i] / y.size)


def f1_score(predictions: Any, labels: Any) -> float:
    """Binary F1 of the positive class 1: 2·TP / (2·TP + FP + FN). Values must be 0 or 1.

    0.0 when there are no positives at all (no positive label and no positive prediction).
    """
    p, y = _classes_pair(predictions, labels)
    for arr, name in ((p, "predictions"), (y, "labels")):
        bad = np.setdiff1d(np.unique(arr), [0, 1])
        if bad.size:
            raise ValueError(f"binary F1 needs {name} in {{0, 1}}, got also {bad[:5].tolist()}")
    tp = float(np.sum((p == 1) & (y == 1)))
    fp = float(np.sum((p == 1) & (y == 0)))
    fn = float(np.sum((p == 0) & (y == 1)))
    denom = 2.0 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation coefficient (multiclass form, as in scikit-learn).

    0.0 when predictions or labels are constant (the coefficient is undefined there).
    """
    p, y = _classes_pair(predictions, labels)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = classes.size
    yi, pi = inv[: y.size], inv[y.size:]
    cm = np.bincount(yi * k + pi, minlength=k * k).reshape(k, k).astype(np.float64)
    t_sum = cm.sum(axis=1)
    p_sum = cm.sum(axis=0)
    n = cm.sum()
    correct = np.trace(cm)
    cov_yp = correct * n - float(t_sum @ p_sum)
    cov_pp = n * n - float(p_sum @ p_sum)
    cov_yy = n * n - float(t_sum @ t_sum)
    if cov_pp == 0.0 or cov_yy == 0.0:
        return 0.0
    return float(cov_yp / math.sqrt(cov_yy * cov_pp))


# --------------------------------------------------------------------------------------------
# regression


def _pearson_arrays(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    if x.size < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return float("nan")
    if np.all(x == x[0]) or np.all(y == y[0]):  # a constant input has no defined correlation
        return float("nan")
    dx = x - x.mean()
    dy = y - y.mean()
    nx = np.linalg.norm(dx)
    ny = np.linalg.norm(dy)
    if nx == 0.0 or ny == 0.0:
        return float("nan")
    r = float(np.dot(dx / nx, dy / ny))
    return max(-1.0, min(1.0, r))


def pearson(predictions: Any, labels: Any) -> float:
    """Pearson correlation coefficient; nan when undefined (constant input, < 2 entries, NaN/inf)."""
    p, y = _pair(predictions, labels)
    return _pearson_arrays(p, y)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span (scipy's ``rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start of each run of equal values in sorted order
    starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))
    ends = np.concatenate([starts[1:], [xs.size]])  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    run_len = ends - starts
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, run_len)
    return ranks


def spearman(predictions: Any, labels: Any) -> float:
    """Spearman rank correlation (Pearson of average ranks, so ties are handled as scipy does);
    nan when undefined (constant input, < 2 entries, NaN)."""
    p, y = _pair(predictions, labels)
    p = p.astype(np.float64)
    y = y.astype(np.float64)
    if np.isnan(p).any() or np.isnan(y).any():
        return float("nan")
    return _pearson_arrays(_average_ranks(p), _average_ranks(y))


# --------------------------------------------------------------------------------------------
# GLUE


def glue_metrics(task: str, predictions: Any, labels: Any) -> dict[str, float]:
    """The GLUE metrics of ``task`` (see the module docstring for the keys).

    ``predictions`` are class ids (regression scores for stsb). A 2-D array of shape (N, C) with
    C > 1 is taken as logits or probabilities and reduced with argmax over the last axis; an
    (N, 1) array (a regression head's output) is flattened.
    """
    name = _normalize_task(task)
    p = predictions
    if name != "stsb":
        arr = _to_numpy_2d(p)
        if arr is not None:
            p = arr.argmax(axis=-1)
    if name == "cola":
        return {"matthews_correlation": matthews_corrcoef(p, labels)}
    if name in ("mrpc", "qqp"):
        acc = accuracy(p, labels)
        f1 = f1_score(p, labels)
        return {"accuracy": acc, "f1": f1, "combined": (acc + f1) / 2.0}
    if name == "stsb":
        pr = pearson(p, labels)
        sr = spearman(p, labels)
        return {"pearson": pr, "spearmanr": sr, "combined": (pr + sr) / 2.0}
    return {"accuracy": accuracy(p, labels)}


def _to_numpy_2d(x: Any) -> np.ndarray | None:
    """x as a numpy array if it is 2-D with more than one column (logits), else None."""
    shape = getattr(x, "shape", None)
    if shape is None:
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], (list, tuple)) and len(x[0]) > 1:
            return np.asarray(x)
        return None
    if len(shape) == 2 and shape[1] > 1:
        if hasattr(x, "detach"):
            x = x.detach().cpu().float().numpy()
        return np.asarray(x)
    return None
