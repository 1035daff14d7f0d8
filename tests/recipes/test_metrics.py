"""GLUE metrics against scikit-learn / scipy and hand-computed cases."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from fishkern import metrics as M

# scikit-learn and scipy are used here only to cross-check; fishkern.metrics never imports them


@pytest.fixture(scope="module")
def sklearn_metrics():
    return pytest.importorskip("sklearn.metrics")


@pytest.fixture(scope="module")
def scipy_stats():
    return pytest.importorskip("scipy.stats")


# --------------------------------------------------------------------------------------------
# against the reference implementations


@pytest.mark.parametrize("seed", range(8))
def test_classification_metrics_match_sklearn(seed, sklearn_metrics):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    k = int(rng.integers(2, 5))
    y = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    assert M.accuracy(p, y) == pytest.approx(sklearn_metrics.accuracy_score(y, p), abs=1e-12)
    assert M.matthews_corrcoef(p, y) == pytest.approx(sklearn_metrics.matthews_corrcoef(y, p), abs=1e-12)
    yb, pb = y % 2, p % 2
    assert M.f1_score(pb, yb) == pytest.approx(sklearn_metrics.f1_score(yb, pb, zero_division=0), abs=1e-12)
    assert M.matthews_corrcoef(pb, yb) == pytest.approx(sklearn_metrics.matthews_corrcoef(yb, pb), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_correlations_match_scipy(seed, scipy_stats):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(3, 400))
    y = rng.normal(size=n)
    p = 0.5 * y + rng.normal(size=n)
    assert M.pearson(p, y) == pytest.approx(scipy_stats.pearsonr(p, y)[0], abs=1e-12)
    assert M.spearman(p, y) == pytest.approx(scipy_stats.spearmanr(p, y)[0], abs=1e-12)
    # STS-B-like: labels on a coarse grid (many ties), predictions rounded too
    yt = np.round(rng.uniform(0, 5, n) * 5) / 5
    pt = np.round((yt + rng.normal(scale=0.8, size=n)) * 2) / 2
    assert M.spearman(pt, yt) == pytest.approx(scipy_stats.spearmanr(pt, yt)[0], abs=1e-12)
    assert M.pearson(pt, yt) == pytest.approx(scipy_stats.pearsonr(pt, yt)[0], abs=1e-12)


def test_average_ranks_match_scipy_rankdata(scipy_stats):
    rng = np.random.default_rng(7)
    x = rng.integers(0, 6, 50).astype(float)
    np.testing.assert_array_equal(M._average_ranks(x), scipy_stats.rankdata(x, method="average"))


# --------------------------------------------------------------------------------------------
# hand-computed cases


def test_hand_computed_classification():
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    p = [1, 0, 1, 0, 1, 0, 1, 0]
    # TP 3, FN 1, FP 1, TN 3
    assert M.accuracy(p, y) == 0.75
    assert M.f1_score(p, y) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert M.matthews_corrcoef(p, y) == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))
    assert M.matthews_corrcoef(y, y) == 1.0
    assert M.matthews_corrcoef([1 - v for v in y], y) == -1.0


def test_spearman_with_ties_by_hand():
    # ranks of x: [1, 2.5, 2.5, 4]; of y: [1, 2, 3, 4]
    x = [10, 20, 20, 30]
    y = [1, 2, 3, 4]
    rx = np.array([1, 2.5, 2.5, 4])
    ry = np.array([1, 2, 3, 4.0])
    expected = np.corrcoef(rx, ry)[0, 1]
    assert M.spearman(x, y) == pytest.approx(expected, abs=1e-15)
    assert M.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    # monotone but not linear: Spearman 1, Pearson below 1
    assert M.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9


def test_glue_metrics_keys_and_values():
    y = [1, 0, 1, 1]
    p = [1, 0, 0, 1]
    assert M.glue_metrics("cola", p, y) == {"matthews_correlation": pytest.approx(M.matthews_corrcoef(p, y))}
    for task in ("sst2", "qnli", "rte", "wnli", "mnli", "mnli_matched", "mnli_mismatched", "MNLI-mm", "SST-2"):
        assert M.glue_metrics(task, p, y) == {"accuracy": 0.75}
    for task in ("mrpc", "qqp"):
        r = M.glue_metrics(task, p, y)
        assert set(r) == {"accuracy", "f1", "combined"}
        assert r["f1"] == pytest.approx(0.8)
        assert r["combined"] == pytest.approx((0.75 + 0.8) / 2)
    s = M.glue_metrics("stsb", [0.1, 2.0, 3.5, 4.0], [0.0, 2.5, 3.0, 5.0])
    assert set(s) == {"pearson", "spearmanr", "combined"}
    assert s["spearmanr"] == pytest.approx(1.0)
    assert s["combined"] == pytest.approx((s["pearson"] + s["spearmanr"]) / 2)
    assert all(isinstance(v, float) for v in s.values())


def test_main_metric():
    assert M.main_metric("cola") == "matthews_correlation"
    for t in ("sst2", "mnli", "mnli_mismatched", "qnli", "rte", "wnli"):
        assert M.main_metric(t) == "accuracy"
    for t in ("mrpc", "qqp", "stsb", "STS-B"):
        assert M.main_metric(t) == "combined"
    for t in M.GLUE_METRIC_TASKS:
        p = np.array([0.5, 1.5, 2.0]) if t == "stsb" else np.array([0, 1, 1])
        assert M.main_metric(t) in M.glue_metrics(t, p, np.array([0.0, 1.0, 3.0]) if t == "stsb" else [0, 1, 0])


def test_inputs_torch_logits_and_column_vectors():
    y = torch.tensor([0, 2, 1, 1])
    logits = torch.tensor([[3.0, 0, 0], [0, 0, 2], [0, 1, 0], [5, 0, 0]])
    assert M.glue_metrics("mnli", logits, y) == {"accuracy": 0.75}
    assert M.glue_metrics("mnli", logits.argmax(-1).tolist(), y.numpy()) == {"accuracy": 0.75}
    reg = torch.tensor([[0.1], [0.9], [0.5]], dtype=torch.bfloat16)
    assert M.glue_metrics("stsb", reg, [0.0, 1.0, 0.4])["spearmanr"] == pytest.approx(1.0)
    assert M.accuracy(np.array([True, False]), [1, 1]) == 0.5
    assert M.accuracy([1.0, 0.0], [1, 1]) == 0.5  # integral floats are class ids


# --------------------------------------------------------------------------------------------
# degenerate inputs and errors


def test_degenerate_cases_do_not_crash():
    assert M.matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions
    assert M.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # constant labels
    assert M.matthews_corrcoef([1], [1]) == 0.0
    assert M.f1_score([0, 0], [0, 0]) == 0.0  # no positives anywhere
    assert M.f1_score([1, 1], [0, 0]) == 0.0
    for fn in (M.pearson, M.spearman):
        assert math.isnan(fn([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))  # constant predictions
        assert math.isnan(fn([1.0, 2.0, 3.0], [0.1, 0.1, 0.1]))  # constant labels (not exactly representable)
        assert math.isnan(fn([1.0], [2.0]))  # a single example
        assert math.isnan(fn([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]))
    r = M.glue_metrics("stsb", [3.0, 3.0, 3.0], [1.0, 2.0, 5.0])
    assert math.isnan(r["pearson"]) and math.isnan(r["spearmanr"]) and math.isnan(r["combined"])
    assert M.glue_metrics("cola", [1, 1, 1], [0, 1, 1]) == {"matthews_correlation": 0.0}


def test_errors():
    with pytest.raises(ValueError, match="differ in length: 3 predictions, 2 labels"):
        M.accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="differ in length"):
        M.glue_metrics("stsb", [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        M.glue_metrics("sst2", [], [])
    with pytest.raises(ValueError, match="empty"):
        M.pearson(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'"):
        M.glue_metrics("squad", [1], [1])
    with pytest.raises(ValueError, match="unknown GLUE task"):
        M.main_metric("imdb")
    with pytest.raises(ValueError, match="integer class ids"):
        M.accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match=r"binary F1 needs labels in \{0, 1\}"):
        M.f1_score([0, 1, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="1-D"):
        M.pearson(np.ones((2, 2, 2)), np.ones(2))
    with pytest.raises(ValueError, match="scalar"):
        M.accuracy(1, 1)


def test_no_sklearn_or_scipy_at_runtime():
    code = (
        "import sys, fishkern.metrics as m; "
        "m.glue_metrics('stsb', [1.0, 2.0, 3.5], [1.0, 3.0, 2.0]); m.glue_metrics('cola', [0, 1], [1, 1]); "
        "bad = [x for x in ('sklearn', 'scipy', 'datasets', 'transformers') if x in sys.modules]; "
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_majority_class_is_the_chance_level():
    import torch

    assert M.majority_class([0, 1, 1, 1]) == (1, 0.75)
    assert M.majority_class(torch.tensor([1, 0])) == (0, 0.5)  # ties: the lowest class id
    assert M.majority_class(np.array([2, 2, 0, 1, 1])) == (1, 0.4)
    assert M.majority_class([1, 0, 0]) == (0, M.accuracy([0, 0, 0], [1, 0, 0]))  # = always answering it
    with pytest.raises(ValueError, match="empty"):
        M.majority_class([])
    with pytest.raises(ValueError, match="integer class ids"):
        M.majority_class([0.5, 1.0])
