"""The statistics of the A/B report: metric values from scikit-learn, tests of B - A from scipy.stats.

Metric values are scikit-learn's (roc_auc_score, accuracy_score, log_loss, mean_absolute_error,
root_mean_squared_error). The tests need one quantity per row whose mean is the metric
(row_losses); tests/test_ab_report.py checks that their means equal scikit-learn's values.

  accuracy        pooled two-proportion z-test (scipy chi2_contingency), Newcombe's interval from
                  Wilson intervals (scipy binomtest)  | McNemar exact test (scipy binomtest), Wald CI
  AUC             DeLong test (scipy has none; tested against enumeration) | paired DeLong test
  log loss, MAE   Welch t-test (scipy ttest_ind, equal_var=False) | paired t-test (scipy ttest_rel)
  RMSE            the same on squared errors
  error rate      Fisher exact test, one-sided (scipy fisher_exact)
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from scipy import stats
from sklearn import metrics as skm

Key = Tuple[str, int]  # (the proxy's request id, row)
# scikit-learn's log_loss clips probabilities to [eps, 1 - eps]; the per-row losses clip the same way
PROBABILITY_FLOOR = float(np.finfo(np.float64).eps)


class NotTestable(ValueError):
    """A comparison that the data cannot support (one class only, fewer than two rows)."""


# --- metrics ------------------------------------------------------------------------------

@dataclass
class Sample:
    """The labelled rows of one variant, in key order."""
    keys: List[Key]
    y: np.ndarray                        # class ids or true values
    predicted: np.ndarray                # served class ids or predicted values
    probabilities: Optional[np.ndarray]  # rows x classes (classification)

    @classmethod
    def of(cls, variant: Any, truth: Dict[Key, float], task: str, n_classes: int) -> "Sample":
        keys = sorted(k for k in variant.outputs if k in truth)
        outputs = [variant.outputs[k] for k in keys]
        y = np.array([truth[k] for k in keys], dtype=np.float64)
        if task == "regression":
            return cls(keys, y, np.array([o.value for o in outputs], dtype=np.float64), None)
        probabilities = np.array([o.probabilities for o in outputs], dtype=np.float64).reshape(len(keys), n_classes)
        return cls(keys, y.astype(np.int64), np.array([o.class_id for o in outputs], dtype=np.int64), probabilities)

    @classmethod
    def empty(cls) -> "Sample":
        return cls([], np.zeros(0), np.zeros(0), None)

    def subset(self, keys: List[Key]) -> "Sample":
        index = {k: i for i, k in enumerate(self.keys)}
        rows = np.array([index[k] for k in keys], dtype=np.int64)
        return Sample(list(keys), self.y[rows], self.predicted[rows],
                      None if self.probabilities is None else self.probabilities[rows])

    def __len__(self) -> int:
        return len(self.keys)


def auc(y: np.ndarray, score: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (ties count one half); None with one class only, where it is undefined."""
    if len(np.unique(y)) < 2:
        return None
    return float(skm.roc_auc_score(y, score))


def row_losses(sample: Sample, metric: str) -> np.ndarray:
    """The per-row quantity whose mean is the metric (or, for RMSE, its square): what the t-tests test."""
    if metric == "accuracy":
        return (sample.predicted == sample.y).astype(np.float64)
    if metric == "log_loss":
        p_true = sample.probabilities[np.arange(len(sample)), sample.y]
        return -np.log(np.clip(p_true, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR))
    if metric == "rmse":
        return (sample.predicted - sample.y) ** 2
    if metric == "mae":
        return np.abs(sample.predicted - sample.y)
    raise KeyError(metric)


def metric_value(sample: Sample, metric: str) -> Optional[float]:
    """The metric by scikit-learn; None without rows (and AUC with one class only)."""
    if len(sample) == 0:
        return None
    if metric == "auc":
        return auc(sample.y, sample.probabilities[:, 1])
    if metric == "accuracy":
        return float(skm.accuracy_score(sample.y, sample.predicted))
    if metric == "log_loss":  # every class named, so a class absent from the labels is no error
        return float(skm.log_loss(sample.y, sample.probabilities, labels=np.arange(sample.probabilities.shape[1])))
    if metric == "rmse":
        return float(skm.root_mean_squared_error(sample.y, sample.predicted))
    if metric == "mae":
        return float(skm.mean_absolute_error(sample.y, sample.predicted))
    raise KeyError(metric)


# --- significance tests: B - A, a two-sided p-value and a (1 - alpha) confidence interval ---

@dataclass
class Difference:
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    method: str


def _normal_difference(estimate: float, se: float, alpha: float, method: str,
                       p_value: Optional[float] = None) -> Difference:
    if not se > 0:  # every row agrees: nothing varies, the estimate is exact
        return Difference(estimate, estimate, estimate, 1.0 if estimate == 0 else 0.0, method)
    half = stats.norm.ppf(1 - alpha / 2) * se
    if p_value is None:
        p_value = float(2 * stats.norm.sf(abs(estimate) / se))
    return Difference(estimate, estimate - half, estimate + half, p_value, method)


def _wilson(successes: int, n: int, alpha: float) -> Tuple[float, float]:
    interval = stats.binomtest(successes, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(interval.low), float(interval.high)


def two_proportion_test(successes_a: int, n_a: int, successes_b: int, n_b: int, alpha: float) -> Difference:
    """Pooled two-proportion z-test (the chi-square test of the 2x2 table) with Newcombe's hybrid
    Wilson score interval for p_b - p_a."""
    if n_a < 1 or n_b < 1:
        raise NotTestable("no rows")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    estimate = p_b - p_a
    successes = successes_a + successes_b
    if 0 < successes < n_a + n_b:  # the z-test's p-value is the uncorrected chi-square test's
        table = [[successes_a, n_a - successes_a], [successes_b, n_b - successes_b]]
        p_value = float(stats.chi2_contingency(table, correction=False).pvalue)
    else:  # every row right (or every row wrong) in both: no difference to test
        p_value = 1.0
    low_a, high_a = _wilson(successes_a, n_a, alpha)
    low_b, high_b = _wilson(successes_b, n_b, alpha)
    return Difference(estimate, estimate - math.hypot(p_b - low_b, high_a - p_a),
                      estimate + math.hypot(high_b - p_b, p_a - low_a), p_value,
                      "two-proportion z-test, Newcombe CI")


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray, alpha: float) -> Difference:
    """Paired accuracy: McNemar's exact test on the discordant rows, Wald CI of the paired difference."""
    n = len(correct_a)
    if n < 1:
        raise NotTestable("no paired rows")
    b_only = int(np.sum(correct_b & ~correct_a))
    a_only = int(np.sum(correct_a & ~correct_b))
    discordant = a_only + b_only
    estimate = (b_only - a_only) / n
    p_value = float(stats.binomtest(b_only, discordant, 0.5).pvalue) if discordant else 1.0
    se = math.sqrt(max(discordant - (b_only - a_only) ** 2 / n, 0.0)) / n
    return _normal_difference(estimate, se, alpha, "McNemar exact test, Wald CI", p_value)


def delong_placements(y: np.ndarray, score: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components via midranks (Sun & Xu 2014): for each positive the share of
    negatives it outranks, for each negative the share of positives that outrank it (ties: one half)."""
    positives, negatives = score[y == 1], score[y == 0]
    m, n = len(positives), len(negatives)
    if m < 2 or n < 2:
        raise NotTestable(f"AUC needs at least two rows of each class (positives {m}, negatives {n})")
    ranks = stats.rankdata(np.concatenate([positives, negatives]))
    v10 = (ranks[:m] - stats.rankdata(positives)) / n
    v01 = 1.0 - (ranks[m:] - stats.rankdata(negatives)) / m
    return v10, v01


def delong_test(y_a: np.ndarray, score_a: np.ndarray, y_b: np.ndarray, score_b: np.ndarray,
                alpha: float) -> Difference:
    """DeLong test of AUC_b - AUC_a on independent samples."""
    auc_and_variance = []
    for y, score in ((y_a, score_a), (y_b, score_b)):
        v10, v01 = delong_placements(y, score)
        auc_and_variance.append((v10.mean(), v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01)))
    (auc_a, var_a), (auc_b, var_b) = auc_and_variance
    return _normal_difference(float(auc_b - auc_a), math.sqrt(var_a + var_b), alpha, "DeLong test")


def delong_paired_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, alpha: float) -> Difference:
    """DeLong test of AUC_b - AUC_a when both scored the same rows (correlated AUCs)."""
    (a10, a01), (b10, b01) = delong_placements(y, score_a), delong_placements(y, score_b)
    s = np.cov(np.vstack([a10, b10])) / len(a10) + np.cov(np.vstack([a01, b01])) / len(a01)
    variance = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    return _normal_difference(float(b10.mean() - a10.mean()), math.sqrt(max(variance, 0.0)), alpha,
                              "paired DeLong test")


def welch_test(values_a: np.ndarray, values_b: np.ndarray, alpha: float) -> Difference:
    """Welch's t-test of mean(values_b) - mean(values_a), unequal variances."""
    if len(values_a) < 2 or len(values_b) < 2:
        raise NotTestable("Welch's t-test needs at least two rows per variant")
    estimate = float(values_b.mean() - values_a.mean())
    if values_a.var() == 0 and values_b.var() == 0:
        return _normal_difference(estimate, 0.0, alpha, "Welch t-test")
    result = stats.ttest_ind(values_b, values_a, equal_var=False)
    ci = result.confidence_interval(1 - alpha)
    return Difference(estimate, float(ci.low), float(ci.high), float(result.pvalue), "Welch t-test")


def paired_t_test(values_a: np.ndarray, values_b: np.ndarray, alpha: float) -> Difference:
    if len(values_a) < 2:
        raise NotTestable("a paired t-test needs at least two paired rows")
    differences = values_b - values_a
    estimate = float(differences.mean())
    if differences.var() == 0:
        return _normal_difference(estimate, 0.0, alpha, "paired t-test")
    result = stats.ttest_rel(values_b, values_a)
    ci = result.confidence_interval(1 - alpha)
    return Difference(estimate, float(ci.low), float(ci.high), float(result.pvalue), "paired t-test")


def error_rate_test(errors_a: int, requests_a: int, errors_b: int, requests_b: int) -> float:
    """One-sided Fisher exact p-value that B's error rate is higher than A's."""
    table = [[errors_b, requests_b - errors_b], [errors_a, requests_a - errors_a]]
    return float(stats.fisher_exact(table, alternative="greater").pvalue)


