"""The third cause of skew, simulated: a model whose answers change the outcomes it later learns from.

    python -m ops.feedback_loop [--users 200000] [--share 0.1] [--seed 7] [--json build/feedback_loop.json]

A shop shows an offer to the users its model scores as likely buyers; the offer itself makes a
purchase more likely. Retraining on the logged traffic ("naive") then learns the purchase rate
*with* the offer for exactly the users who got it, and scores them higher still: the model feeds
on its own decisions. The guard is the proxy's holdback (serving/proxy.py, PROXY_HOLDBACK_*): a
sticky share of users answered by the fallback (no offer). The assignment is the proxy's own
(`Holdback.holds` on the user id), and each row carries what the proxy logs: its policy ("model",
"holdback:fallback") and that policy's propensity (1 - share, share).

Retraining runs once per way a spec can train on served spans, with the weights the pipeline
computes: `components.preprocessing.sample_weight`, the function preprocessing_fn calls, on a spec
with that `served.use`:

  naive               no `served` block: every row weighs 1;
  holdback_only       the held-back rows alone: the natural purchase rate, unbiased, fewer rows;
  inverse_propensity  every row weighted by 1 / its policy's propensity. The weighted rows stand for
                      the whole population once under the model and once under the holdback, so
                      the fit learns the mean of the two policies' outcomes: on the users the model
                      targets, about half of naive's bias, from every row (less variance). It is
                      not an unbiased estimate of the natural rate.

and one reference that no spec can choose, because the proxy does not log what it needs:

  answer_propensity   off-policy (IPS) estimate of the baseline policy: the rows that got its
                      answer (no offer), each weighted by 1 / P(that answer | user) under the
                      logging policy (1 below the model's threshold, where both policies give no
                      offer; `share` above it). With a deterministic model policy the baseline's
                      outcome is observed only on rows whose answer the baseline would have given,
                      and P(answer | user) mixes both policies: the proxy would need the model's
                      answer for held-back rows (it never asks the model for them) and the
                      baseline's for the model's rows, and a definition of which answers are the
                      same action. It logs the policy's probability only.

Figures: mean absolute error and mean bias of each retrained model's predicted natural purchase
probability against the truth, over all users and over the users the policy targets (where the
loop does its damage), on a fresh population.
"""

import argparse
import json
from typing import Any, Dict, Optional

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from components import feature_spec
from serving.proxy import Holdback

INTERCEPT, SLOPE = -1.5, 1.2  # natural purchase log-odds: INTERCEPT + SLOPE * x
OFFER_UPLIFT = 1.5            # the offer adds this to the log-odds: it causes purchases
TARGET_SHARE = 0.3            # the policy offers to the 30 % the model scores highest
MODES = ("naive",) + feature_spec.SERVED_USES  # what a spec chooses: no `served` block, or its `use`
REFERENCE = "answer_propensity"


def natural(x: np.ndarray) -> np.ndarray:
    return expit(INTERCEPT + SLOPE * x)


def spec_for(mode: str) -> feature_spec.FeatureSpec:
    """The shop's rows as a dataset spec: one feature, the purchase as label, `served.use: mode`."""
    return feature_spec.parse({
        "name": "shop", "data": {"path": "simulated"}, "task": "binary",
        "label": {"name": "buyer", "column": "bought"}, "label_columns": {"bought": {"type": "int"}},
        "features": {"x": {"type": "float", "transform": "passthrough"}},
        **({"served": {"use": mode}} if mode != "naive" else {})}, source=f"ops/feedback_loop.py ({mode})")


def pipeline_weights(spec: feature_spec.FeatureSpec, policy: np.ndarray, propensity: np.ndarray) -> np.ndarray:
    """Each row's training weight as the pipeline computes it for this spec (1 without `served`)."""
    if spec.served is None:
        return np.ones(len(policy))
    import tensorflow as tf

    from components.preprocessing import sample_weight

    columns = {spec.served.policy_column: tf.constant(policy), spec.served.propensity_column:
               tf.constant(propensity, tf.float32)}
    return sample_weight(spec, columns, tf.constant(len(policy))).numpy().astype(np.float64)


def _fit(x: np.ndarray, y: np.ndarray, weight: Optional[np.ndarray] = None) -> LogisticRegression:
    if weight is not None:  # the feeder drops the rows of weight 0 (holdback_only)
        x, y, weight = x[weight > 0], y[weight > 0], weight[weight > 0]
    return LogisticRegression(C=1e6, max_iter=1000).fit(x.reshape(-1, 1), y, sample_weight=weight)


def _errors(model: LogisticRegression, x: np.ndarray, targeted: np.ndarray) -> Dict[str, float]:
    predicted = model.predict_proba(x.reshape(-1, 1))[:, 1]
    error = predicted - natural(x)
    return {"mae": float(np.mean(np.abs(error))), "bias": float(np.mean(error)),
            "mae_targeted": float(np.mean(np.abs(error[targeted]))), "bias_targeted": float(np.mean(error[targeted]))}


def simulate(users: int = 200_000, share: float = 0.1, seed: int = 7) -> Dict[str, Any]:
    rng = np.random.default_rng(seed)
    # Round 0: a model trained on natural outcomes (no offers yet).
    x0 = rng.normal(size=users)
    model = _fit(x0, rng.random(users) < natural(x0))
    # Round 1: the model decides who gets an offer; the proxy holds back a sticky share.
    x = rng.normal(size=users)
    threshold = np.quantile(model.predict_proba(x.reshape(-1, 1))[:, 1], 1 - TARGET_SHARE)
    wants_offer = model.predict_proba(x.reshape(-1, 1))[:, 1] >= threshold
    holdback = Holdback(share, "fallback", "stable", None)
    held = np.array([holdback.holds(f"user-{i}") for i in range(users)])
    offered = wants_offer & ~held
    bought = rng.random(users) < expit(INTERCEPT + SLOPE * x + OFFER_UPLIFT * offered)
    # What the proxy logs per row (serving/proxy.py, the request handler): the policy and its propensity.
    policy = np.where(held, holdback.name, "model")
    propensity = np.where(held, holdback.propensity(), 1.0 - share)
    weights = {mode: pipeline_weights(spec_for(mode), policy, propensity) for mode in MODES}
    # The reference: the baseline's answer (no offer) reweighted by its probability under the logging policy.
    weights[REFERENCE] = np.where(offered, 0.0, 1.0 / np.where(wants_offer, share, 1.0))
    # Judged on a fresh population against the natural rate.
    fresh = rng.normal(size=users)
    fresh_targeted = model.predict_proba(fresh.reshape(-1, 1))[:, 1] >= threshold
    results = {name: _errors(_fit(x, bought, w), fresh, fresh_targeted) for name, w in weights.items()}
    results["round0"] = _errors(model, fresh, fresh_targeted)
    return {"users": users, "share": share, "seed": seed, "held_back": int(held.sum()), "offered": int(offered.sum()),
            "rows": {name: int((w > 0).sum()) for name, w in weights.items()},
            "total_weight": {name: float(w.sum()) for name, w in weights.items()},
            "results": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    figures = simulate(args.users, args.share, args.seed)
    print(f"{figures['users']} users, {figures['held_back']} held back ({args.share:.0%}), {figures['offered']} offered")
    print("| retrained on | rows | MAE | bias | MAE (targeted users) | bias (targeted users) |\n|---|---|---|---|---|---|")
    for name in ("round0",) + MODES + (REFERENCE,):
        r = figures["results"][name]
        rows = figures["rows"].get(name, figures["users"])
        label = {"round0": "round0 (no offers yet)", REFERENCE: f"{REFERENCE} (reference: not loggable)"}.get(
            name, f"spec: {name}")
        print(f"| {label} | {rows} | {r['mae']:.4f} | {r['bias']:+.4f} | {r['mae_targeted']:.4f} | "
              f"{r['bias_targeted']:+.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
