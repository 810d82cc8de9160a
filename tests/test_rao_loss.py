"""The RAO loss against values worked out independently of its implementation."""

import pytest
import torch

from rao_tune.losses import RAOLoss, ResponseLogProbs
from rao_tune.losses.functional import per_prompt_mean, rao_loss


def reference_rao_loss(rows, beta, z0):
    """Algorithm 1 written as loops over prompts; each row is (prompt_logratio, [(logratio, reward), ...])."""
    per_prompt = []
    for prompt_logratio, responses in rows:
        log_z = z0 + prompt_logratio
        errors = [(reward - (beta * logratio + beta * log_z)) ** 2 for logratio, reward in responses]
        per_prompt.append(sum(errors) / len(errors))
    return sum(per_prompt) / len(per_prompt)


def flatten(rows):
    """Split each log-ratio into made-up policy and reference log-probs, flattened with prompt ids."""
    policy, reference, policy_prompt, reference_prompt, rewards, prompt_ids = [], [], [], [], [], []
    for prompt_id, (prompt_logratio, responses) in enumerate(rows):
        for logratio, reward in responses:
            reference.append(-20.0 - prompt_id)
            policy.append(reference[-1] + logratio)
            reference_prompt.append(-7.5)
            policy_prompt.append(-7.5 + prompt_logratio)
            rewards.append(reward)
            prompt_ids.append(10 * prompt_id + 3)  # ids need not be 0..B-1
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return (
        as_tensor(policy),
        as_tensor(reference),
        as_tensor(policy_prompt),
        as_tensor(reference_prompt),
        as_tensor(rewards),
        torch.tensor(prompt_ids),
    )


UNEVEN_ROWS = [
    (0.3, [(1.2, 0.9), (-0.4, 0.1), (0.0, 0.5), (2.0, 0.7)]),  # four responses
    (-1.1, [(0.5, 1.0)]),  # one response
    (0.0, [(-2.0, -0.3), (0.7, 0.8)]),  # two responses
]


@pytest.mark.parametrize("beta, z0", [(0.1, 50.0), (0.5, -3.0), (1.0, 0.0), (0.05, 5.0)])
def test_rao_loss_matches_algorithm_1(beta, z0):
    got = rao_loss(*flatten(UNEVEN_ROWS), beta=beta, z0=z0)
    assert got.item() == pytest.approx(reference_rao_loss(UNEVEN_ROWS, beta, z0), rel=1e-12)


def test_hand_worked_value():
    # One prompt, two responses, beta=0.5, z0=2, prompt log-ratio 0.4:
    # log Z = 2.4; implicit rewards 0.5*(1 + 2.4) = 1.7 and 0.5*(-1 + 2.4) = 0.7;
    # targets 2.0 and 0.0 -> errors 0.09 and 0.49 -> mean 0.29.
    rows = [(0.4, [(1.0, 2.0), (-1.0, 0.0)])]
    assert rao_loss(*flatten(rows), beta=0.5, z0=2.0).item() == pytest.approx(0.29, rel=1e-12)


def test_prompts_weigh_equally_whatever_their_response_count():
    # Prompt A: 1 response with error 1; prompt B: 3 responses with error 0. Mean over prompts = 0.5,
    # whereas a flat mean over the 4 responses would give 0.25.
    rows = [(0.0, [(0.0, 1.0)]), (0.0, [(0.0, 0.0), (0.0, 0.0), (0.0, 0.0)])]
    assert rao_loss(*flatten(rows), beta=1.0, z0=0.0).item() == pytest.approx(0.5)


def test_zero_loss_when_policy_sits_on_the_targets():
    beta, z0 = 0.1, 50.0
    rows = []
    for prompt_logratio, rewards in [(0.2, [3.0, 5.5, 7.0]), (-0.6, [6.0])]:
        # target log-ratio: r / beta - z0 - prompt_logratio
        rows.append((prompt_logratio, [(r / beta - z0 - prompt_logratio, r) for r in rewards]))
    assert rao_loss(*flatten(rows), beta=beta, z0=z0).item() == pytest.approx(0.0, abs=1e-20)


def test_z0_shifts_the_targets_and_beta_scales_them():
    rows = [(0.0, [(0.0, 1.0), (0.0, -1.0)])]
    # At h = 0 the implicit reward is beta * z0 for every response: loss = mean((r - beta z0)^2).
    for beta, z0 in [(0.1, 10.0), (0.1, 0.0), (0.5, 2.0)]:
        expected = ((1.0 - beta * z0) ** 2 + (-1.0 - beta * z0) ** 2) / 2
        assert rao_loss(*flatten(rows), beta=beta, z0=z0).item() == pytest.approx(expected)


def test_prompt_term_is_detached():
    policy, reference, policy_prompt, reference_prompt, rewards, prompt_ids = flatten(UNEVEN_ROWS)
    policy = policy.clone().requires_grad_(True)
    policy_prompt = policy_prompt.clone().requires_grad_(True)
    loss = rao_loss(policy, reference, policy_prompt, reference_prompt, rewards, prompt_ids, beta=0.3, z0=1.0)
    loss.backward()
    assert policy_prompt.grad is None or torch.all(policy_prompt.grad == 0)
    # d L / d policy_logps for response j of prompt i: -2 beta (r - r_theta) / (k_i * B)
    beta, z0, expected = 0.3, 1.0, []
    for prompt_logratio, responses in UNEVEN_ROWS:
        for logratio, reward in responses:
            implicit = beta * (logratio + z0 + prompt_logratio)
            expected.append(-2 * beta * (reward - implicit) / (len(responses) * len(UNEVEN_ROWS)))
    torch.testing.assert_close(policy.grad, torch.tensor(expected, dtype=torch.float64))


def test_per_prompt_mean():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    ids = torch.tensor([7, 7, 7, 2])
    # unique ids sorted: 2 -> 10, 7 -> 2
    torch.testing.assert_close(per_prompt_mean(values, ids), torch.tensor([10.0, 2.0]))


def _batch(rows):
    policy, reference, policy_prompt, reference_prompt, rewards, prompt_ids = flatten(rows)
    return ResponseLogProbs(
        policy_logps=policy,
        policy_prompt_logps=policy_prompt,
        reference_logps=reference,
        reference_prompt_logps=reference_prompt,
        rewards=rewards,
        prompt_ids=prompt_ids,
        response_lengths=torch.ones_like(prompt_ids),
    )


def test_module_matches_functional_and_reports_implicit_rewards():
    loss_fn = RAOLoss(beta=0.2, z0=3.0)
    output = loss_fn(_batch(UNEVEN_ROWS))
    assert output.loss.item() == pytest.approx(reference_rao_loss(UNEVEN_ROWS, 0.2, 3.0))
    expected = [0.2 * (h + 3.0 + p) for p, responses in UNEVEN_ROWS for h, _ in responses]
    torch.testing.assert_close(output.implicit_rewards, torch.tensor(expected, dtype=torch.float64))
    assert not output.implicit_rewards.requires_grad


def test_z0_auto_is_mean_reward_over_beta():
    loss_fn = RAOLoss(beta=0.25, z0="auto")
    with pytest.raises(RuntimeError, match="calibrated"):
        loss_fn(_batch(UNEVEN_ROWS))
    rewards = torch.tensor([1.0, 2.0, 6.0])
    assert loss_fn.calibrate(rewards) == {"z0": pytest.approx(3.0 / 0.25)}
    assert loss_fn.z0 == pytest.approx(12.0)
    # At the start (policy == reference) an average-reward response is exactly on its target.
    at_start = [(0.0, [(0.0, 3.0)])]
    assert loss_fn(_batch(at_start)).loss.item() == pytest.approx(0.0, abs=1e-12)
    # A fixed z0 is left alone.
    assert RAOLoss(beta=0.1, z0=50).calibrate(rewards) == {}


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"beta": -1.0}, {"z0": "fifty"}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        RAOLoss(**kwargs)

