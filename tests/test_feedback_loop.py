"""The feedback-loop guard, simulated (ops/feedback_loop.py): retraining on logged traffic where the
model's answer (an offer) causes the outcome it predicts is biased; the proxy's holdback removes it,
with the weights the pipeline computes for each `served.use` a spec can choose."""

import pytest

from ops import feedback_loop


@pytest.fixture(scope="module")
def figures():
    return feedback_loop.simulate(users=100_000, share=0.1, seed=11)


def test_the_spec_modes_order_as_their_weights_predict(figures):
    """Measured (100,000 users, seed 11, 10 % held back), bias on the targeted users: naive +0.227,
    inverse_propensity +0.129, holdback_only +0.005; 200,000 users, seed 7: +0.224, +0.127, +0.009."""
    r = figures["results"]
    assert abs(figures["held_back"] / figures["users"] - 0.1) < 0.005  # the proxy's sticky assignment
    # The loop: the users the model targets look far likelier buyers than they are without the offer.
    assert r["naive"]["bias_targeted"] > 0.15 and r["naive"]["mae"] > 0.05
    # holdback_only: the held-back rows alone estimate the natural rate.
    assert abs(r["holdback_only"]["bias_targeted"]) < 0.03 and r["holdback_only"]["mae"] < 0.015
    assert r["holdback_only"]["mae_targeted"] < r["naive"]["mae_targeted"] / 8
    # inverse_propensity weighs each policy's rows as the whole population once: the fit learns the mean
    # of the outcome with and without the offer on the targeted users, so about half of naive's bias.
    ratio = r["inverse_propensity"]["bias_targeted"] / r["naive"]["bias_targeted"]
    assert 0.35 < ratio < 0.75, ratio
    assert r["inverse_propensity"]["bias_targeted"] > r["holdback_only"]["bias_targeted"] + 0.05


def test_the_weights_are_the_pipelines_for_each_served_use(figures):
    users, held, share = figures["users"], figures["held_back"], figures["share"]
    # holdback_only keeps the held-back rows only (components/preprocessing.py sample_weight: 0 for a model's).
    assert figures["rows"]["holdback_only"] == held and figures["total_weight"]["holdback_only"] == held
    # inverse_propensity: 1 / (1 - share) per model row and 1 / share per held-back row, as the proxy logs them;
    # in all, each policy's rows weigh as much as every user: about twice the rows.
    expected = (users - held) / (1 - share) + held / share
    assert figures["rows"]["inverse_propensity"] == users
    assert figures["total_weight"]["inverse_propensity"] == pytest.approx(expected, rel=1e-5)
    assert figures["total_weight"]["inverse_propensity"] == pytest.approx(2 * users, rel=0.05)
    assert figures["total_weight"]["naive"] == users


def test_the_spec_modes_are_those_a_spec_can_choose():
    from components import feature_spec

    assert feedback_loop.MODES == ("naive", "inverse_propensity", "holdback_only")
    assert feedback_loop.spec_for("naive").served is None
    for use in feature_spec.SERVED_USES:
        assert feedback_loop.spec_for(use).served.use == use


def test_the_unbiased_off_policy_estimate_needs_what_the_proxy_does_not_log(figures):
    """The reference: no-offer rows weighted by 1 / P(no offer | user), a probability of the answer
    that the proxy cannot log (it never asks the model about held-back users). It would be unbiased and
    use every no-offer row."""
    r = figures["results"][feedback_loop.REFERENCE]
    assert abs(r["bias_targeted"]) < 0.03 and r["mae"] < 0.015
    assert figures["rows"][feedback_loop.REFERENCE] > 5 * figures["rows"]["holdback_only"]
