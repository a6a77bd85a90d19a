"""The third cause of skew, simulated: a model whose answers change the outcomes it later learns from.

    python -m ops.feedback_loop [--users 200000] [--share 0.1] [--seed 7]

A shop shows an offer to the users its model scores as likely buyers; the offer itself makes a
purchase more likely. Retraining on the logged traffic ("naive") then learns the purchase rate
*with* the offer for exactly the users who got it, and scores them higher still: the model feeds
on its own decisions. The guard is the proxy's holdback (serving/proxy.py, PROXY_HOLDBACK_*): a
sticky share of users answered by the fallback (no offer), every record carrying its policy and
propensity. Two ways to train on the log with it, as a spec may choose:

  holdback_only   the held-back rows alone: the natural purchase rate, unbiased, fewer rows;
  ipw             the rows that got no offer, each weighted by 1 / P(no offer | user) under the
                  logging policy (1 below the model's threshold, `share` above it): unbiased and
                  using every no-offer row.

The assignment is the proxy's own (`Holdback.holds` on the user id), so the simulation exercises
the mechanism that serves. Figures: mean absolute error and mean bias of each retrained model's
predicted natural purchase probability against the truth, over all users and over the users the
policy targets (where the loop does its damage), on a fresh population.
"""

import argparse
import json
from typing import Any, Dict

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from serving.proxy import Holdback

INTERCEPT, SLOPE = -1.5, 1.2  # natural purchase log-odds: INTERCEPT + SLOPE * x
OFFER_UPLIFT = 1.5            # the offer adds this to the log-odds: it causes purchases
TARGET_SHARE = 0.3            # the policy offers to the 30 % the model scores highest


def natural(x: np.ndarray) -> np.ndarray:
    return expit(INTERCEPT + SLOPE * x)


def _fit(x: np.ndarray, y: np.ndarray, weight: np.ndarray = None) -> LogisticRegression:
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
    # What the log records per row: the policy and the propensity of the answer given.
    p_no_offer = np.where(wants_offer, share, 1.0)  # below the threshold both policies give no offer
    # Retraining three ways; judged on a fresh population against the natural rate.
    fresh = rng.normal(size=users)
    fresh_targeted = model.predict_proba(fresh.reshape(-1, 1))[:, 1] >= threshold
    no_offer = ~offered
    results = {
        "naive": _errors(_fit(x, bought), fresh, fresh_targeted),
        "holdback_only": _errors(_fit(x[held], bought[held]), fresh, fresh_targeted),
        "ipw": _errors(_fit(x[no_offer], bought[no_offer], 1.0 / p_no_offer[no_offer]), fresh, fresh_targeted),
        "round0": _errors(model, fresh, fresh_targeted),
    }
    return {"users": users, "share": share, "seed": seed, "held_back": int(held.sum()), "offered": int(offered.sum()),
            "rows": {"naive": users, "holdback_only": int(held.sum()), "ipw": int(no_offer.sum())},
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
    for name in ("round0", "naive", "holdback_only", "ipw"):
        r = figures["results"][name]
        rows = figures["rows"].get(name, figures["users"])
        print(f"| {name} | {rows} | {r['mae']:.4f} | {r['bias']:+.4f} | {r['mae_targeted']:.4f} | "
              f"{r['bias_targeted']:+.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
