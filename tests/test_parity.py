"""ops/parity.py's online metrics and how the review page shows them (fast; the parity run itself
is checked against a real pipeline run in tests/test_pipeline_e2e.py)."""

import itertools
import json
import re
import warnings

import numpy as np
import pytest

from ops import parity, review


def test_online_auc_is_the_pairwise_rank_probability_and_null_with_one_class():
    labels = np.array([0, 1, 0, 1, 1, 0])
    scores = np.array([0.2, 0.7, 0.7, 0.9, 0.4, 0.1])
    pairs = [(p, n) for p, n in itertools.product(scores[labels == 1], scores[labels == 0])]
    by_pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    metrics = parity.online_metrics(labels, scores)
    assert metrics["auc"] == pytest.approx(by_pairs)
    assert metrics["binary_accuracy"] == pytest.approx(4 / 6) and metrics["example_count"] == 6

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old hand-written loop divided 0 by 0 here (RuntimeWarning)
        one_class = parity.online_metrics(np.array([0, 0, 0]), np.array([0.1, 0.6, 0.3]))
    assert one_class["auc"] is None and one_class["binary_accuracy"] == pytest.approx(2 / 3)
    written = json.dumps({"online_from_rest": one_class}, allow_nan=False)  # NaN would raise here
    assert '"auc": null' in written


def test_the_review_page_says_not_defined_for_an_auc_parity_could_not_define(tmp_path):
    report = {"model": "taxi", "version": 3, "rows": 3, "tolerance": parity.TOLERANCE,
              "training_path_unmatched_rows": 0,
              "paths": {"rest": {"max_abs_diff": 0.0, "rows_over_tolerance": 0}},
              "metrics": {"online_from_rest": parity.online_metrics(np.array([0, 0, 0]), np.array([0.1, 0.6, 0.3])),
                          "offline_evaluator": {"auc": None, "binary_accuracy": 0.6667, "example_count": 3.0}}}
    path = tmp_path / "parity.json"
    path.write_text(json.dumps(report, allow_nan=False))
    found = review.parity_evidence(str(path), "taxi", 3)
    assert found["report"]["metrics"]["online_from_rest"]["auc"] is None
    html = str(review._parity_section({"parity": found}))
    auc_row = re.search(r"<tr>(?:(?!</tr>).)*>auc<(?:(?!</tr>).)*</tr>", html, re.S).group(0)
    assert auc_row.count("not defined") == 2 and "nan" not in auc_row.lower()
