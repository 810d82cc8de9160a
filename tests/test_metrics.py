"""The logged preference metrics, the normaliser's and the KL estimate included, against hand computations."""

import pytest
import torch

from rao_tune.training.metrics import add_statistics, finalize_preference_metrics, preference_statistics


def test_normaliser_lengths_and_kl_estimate_match_a_hand_computation():
    # Two micro-batches: prompts 0 (three responses) and 1 (two responses, tied rewards: not ranked), then prompt 0
    # of the next micro-batch (two responses).
    first = dict(
        implicit_rewards=torch.tensor([0.5, -0.2, 0.1, 0.3, 0.4]),
        log_ratios=torch.tensor([1.0, -2.0, 0.5, 0.25, -0.75]),
        rewards=torch.tensor([0.9, 0.1, 0.5, 0.6, 0.6]),
        prompt_ids=torch.tensor([0, 0, 0, 1, 1]),
        response_lengths=torch.tensor([10, 4, 8, 5, 5]),
        prompt_log_ratios=torch.tensor([-0.3, -0.3, -0.3, 0.7, 0.7]),
    )
    second = dict(
        implicit_rewards=torch.tensor([-1.0, 2.0]),
        log_ratios=torch.tensor([-1.5, 3.0]),
        rewards=torch.tensor([0.2, 0.8]),
        prompt_ids=torch.tensor([0, 0]),
        response_lengths=torch.tensor([6, 12]),
        prompt_log_ratios=torch.tensor([1.1, 1.1]),
    )
    totals = {}
    for part in (first, second):
        args = [part.pop(key) for key in ("implicit_rewards", "log_ratios", "rewards", "prompt_ids")]
        totals = add_statistics(totals, preference_statistics(*args, **part))
    metrics = finalize_preference_metrics(totals)

    log_ratios = [1.0, -2.0, 0.5, 0.25, -0.75, -1.5, 3.0]
    lengths = [10, 4, 8, 5, 5, 6, 12]
    assert metrics["response_length"] == pytest.approx(sum(lengths) / 7)
    assert metrics["kl_estimate"] == pytest.approx(-sum(log_ratios) / 7)
    assert metrics["kl_estimate_per_token"] == pytest.approx(-sum(r / n for r, n in zip(log_ratios, lengths)) / 7)
    assert metrics["prompt_logratio"] == pytest.approx((-0.3 + 0.7 + 1.1) / 3)  # each prompt once
    # Ranked prompts: the first micro-batch's prompt 0 (best 0.9 -> index 0, worst 0.1 -> index 1) and the second's.
    assert metrics["logratio_best"] == pytest.approx((1.0 + 3.0) / 2)
    assert metrics["logratio_worst"] == pytest.approx((-2.0 - 1.5) / 2)
    assert metrics["response_length_best"] == pytest.approx((10 + 12) / 2)
    assert metrics["response_length_worst"] == pytest.approx((4 + 6) / 2)
    assert metrics["joint_logratio_best"] == pytest.approx(((-0.3 + 1.0) + (1.1 + 3.0)) / 2)
    assert metrics["joint_logratio_worst"] == pytest.approx(((-0.3 - 2.0) + (1.1 - 1.5)) / 2)
    assert metrics["implicit_accuracy"] == 1.0


def test_without_a_reference_no_normaliser_or_kl_is_claimed():
    stats = preference_statistics(
        torch.tensor([0.1, 0.2]), torch.tensor([-5.0, -6.0]), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]),
        response_lengths=torch.tensor([3, 4]),
    )
    metrics = finalize_preference_metrics(stats)
    assert metrics["response_length"] == 3.5
    assert not {"kl_estimate", "prompt_logratio", "joint_logratio_best"} & set(metrics)
