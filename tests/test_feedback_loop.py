"""The feedback-loop guard, simulated (ops/feedback_loop.py): retraining on logged traffic where the
model's answer (an offer) causes the outcome it predicts is biased; the proxy's holdback removes it."""

from ops import feedback_loop


def test_naive_retraining_learns_its_own_offers_and_the_holdback_removes_the_bias():
    figures = feedback_loop.simulate(users=100_000, share=0.1, seed=11)
    r = figures["results"]
    assert abs(figures["held_back"] / figures["users"] - 0.1) < 0.005  # the proxy's sticky assignment
    # The loop: the users the model targets look far likelier buyers than they are without the offer.
    assert r["naive"]["bias_targeted"] > 0.15 and r["naive"]["mae"] > 0.05
    # The guard: held-back rows (or inverse-propensity weights) estimate the natural rate.
    for guarded in ("holdback_only", "ipw"):
        assert abs(r[guarded]["bias_targeted"]) < 0.03 and r[guarded]["mae"] < 0.015
        assert r[guarded]["mae_targeted"] < r["naive"]["mae_targeted"] / 8
    assert figures["rows"]["ipw"] > 5 * figures["rows"]["holdback_only"]  # ipw keeps every no-offer row
