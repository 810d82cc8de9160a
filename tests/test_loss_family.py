"""Every baseline loss against its formula, computed here independently with plain Python floats, including the
edge cases: one response per prompt, tied rewards, very long and very short responses."""

import math

import pytest
import torch

from rao_tune.losses import (
    BradleyTerryLoss,
    CalDPOLoss,
    DistillationLoss,
    DPOLoss,
    IPOLoss,
    ORPOLoss,
    QRPOLoss,
    RAOLoss,
    REBELLoss,
    ResponseLogProbs,
    RewardAwareRPOLoss,
    RewardPartitionLoss,
    RLOOLoss,
    SimPOLoss,
    SLiCHFLoss,
)
from rao_tune.losses import functional as LF


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# Two pairs: (chosen, rejected) policy and reference log-probs, lengths and rewards.
PW, PL, RW, RL = t(-10.0, -30.0), t(-14.0, -20.0), t(-12.0, -28.0), t(-13.0, -21.0)
LEN_W, LEN_L = t(5.0, 40.0), t(8.0, 2.0)
REW_W, REW_L = t(0.9, 0.6), t(0.1, 0.5)
H_W = [PW[i].item() - RW[i].item() for i in range(2)]  # chosen log-ratios: 2, -2
H_L = [PL[i].item() - RL[i].item() for i in range(2)]  # rejected log-ratios: -1, 1


def mean(values):
    return sum(values) / len(values)


def test_dpo_with_and_without_label_smoothing():
    beta, eps = 0.5, 0.1
    margins = [beta * (H_W[i] - H_L[i]) for i in range(2)]  # 1.5, -1.5
    assert LF.dpo_loss(PW, PL, RW, RL, beta=beta).item() == pytest.approx(mean([-log_sigmoid(m) for m in margins]))
    smoothed = mean([-(1 - eps) * log_sigmoid(m) - eps * log_sigmoid(-m) for m in margins])
    assert LF.dpo_loss(PW, PL, RW, RL, beta=beta, label_smoothing=eps).item() == pytest.approx(smoothed)


def test_ipo_on_summed_log_probs():
    beta = 0.25
    expected = mean([(H_W[i] - H_L[i] - 1 / (2 * beta)) ** 2 for i in range(2)])  # (3-2)^2, (-3-2)^2
    assert LF.ipo_loss(PW, PL, RW, RL, beta=beta).item() == pytest.approx(expected)
    assert expected == pytest.approx(13.0)


def test_simpo_normalises_by_length():
    beta, gamma = 2.0, 0.5
    margins = [beta * PW[i].item() / LEN_W[i].item() - beta * PL[i].item() / LEN_L[i].item() - gamma for i in range(2)]
    # pair 1: a 40-token chosen at -30 (-0.75/token) beats a 2-token rejected at -20 (-10/token)
    assert margins[1] > 0 > PW[1] - PL[1]
    assert LF.simpo_loss(PW, PL, LEN_W, LEN_L, beta=beta, gamma=gamma).item() == pytest.approx(
        mean([-log_sigmoid(m) for m in margins])
    )


def test_slic_hf_hinge_and_nll():
    delta, weight = 1.0, 0.5
    hinge = [max(0.0, delta - PW[i].item() + PL[i].item()) for i in range(2)]  # max(0, 1-4)=0, max(0, 1+10)=11
    assert hinge == [0.0, 11.0]
    nll = [-PW[i].item() / LEN_W[i].item() for i in range(2)]
    assert LF.slic_hf_loss(PW, PL, LEN_W, delta=delta).item() == pytest.approx(5.5)
    assert LF.slic_hf_loss(PW, PL, LEN_W, delta=delta, nll_weight=weight).item() == pytest.approx(
        mean([hinge[i] + weight * nll[i] for i in range(2)])
    )


def test_orpo_odds_ratio():
    weight = 0.2

    def log_odds(avg):
        return avg - math.log(1 - math.exp(avg))

    expected = []
    for i in range(2):
        avg_w, avg_l = PW[i].item() / LEN_W[i].item(), PL[i].item() / LEN_L[i].item()
        expected.append(-avg_w - weight * log_sigmoid(log_odds(avg_w) - log_odds(avg_l)))
    assert LF.orpo_loss(PW, PL, LEN_W, LEN_L, odds_ratio_weight=weight).item() == pytest.approx(mean(expected))


def test_cal_dpo_calibrates_each_log_ratio():
    beta = 0.5  # targets +-1
    expected = mean([-log_sigmoid(H_W[i] - H_L[i]) + (H_W[i] - 1) ** 2 + (H_L[i] + 1) ** 2 for i in range(2)])
    assert LF.cal_dpo_loss(PW, PL, RW, RL, beta=beta).item() == pytest.approx(expected)


def test_distillation_regresses_the_reward_gap():
    beta = 0.1
    expected = mean([(beta * (H_W[i] - H_L[i]) - (REW_W[i].item() - REW_L[i].item())) ** 2 for i in range(2)])
    assert LF.distillation_loss(PW, PL, RW, RL, REW_W, REW_L, beta=beta).item() == pytest.approx(expected)


@pytest.mark.parametrize("distance", ["squared", "backward_kl", "forward_kl"])
def test_reward_aware_rpo_distances(distance):
    beta, eta = 0.5, 2.0
    values = []
    for i in range(2):
        a = beta * (H_W[i] - H_L[i])
        b = eta * (REW_W[i].item() - REW_L[i].item())
        p, q = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-b))  # model and target Bernoulli
        if distance == "squared":
            values.append((a - b) ** 2)
        elif distance == "backward_kl":  # KL(target || model)
            values.append(q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)))
        else:
            values.append(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    got = LF.reward_aware_rpo_loss(PW, PL, RW, RL, REW_W, REW_L, beta=beta, eta=eta, distance=distance)
    assert got.item() == pytest.approx(mean(values))
    with pytest.raises(ValueError, match="distance"):
        LF.reward_aware_rpo_loss(PW, PL, RW, RL, REW_W, REW_L, beta=beta, eta=eta, distance="l1")


# A batch of 3 prompts: prompt 0 has 3 responses, prompt 1 a single one, prompt 2 two tied ones.
POLICY = t(-4.0, -9.0, -6.0, -5.0, -7.0, -3.0)
REFERENCE = t(-5.0, -8.0, -6.5, -5.5, -6.0, -3.5)
REWARDS = t(0.8, 0.2, 0.5, 0.7, 0.4, 0.4)
PROMPT_IDS = torch.tensor([0, 0, 0, 1, 2, 2])
LENGTHS = torch.tensor([4, 9, 3, 5, 7, 30])


def batch(reference=True):
    return ResponseLogProbs(
        policy_logps=POLICY.clone().requires_grad_(),
        policy_prompt_logps=t(*[0.0] * 6),
        reference_logps=REFERENCE if reference else None,
        reference_prompt_logps=t(*[0.0] * 6) if reference else None,
        rewards=REWARDS,
        prompt_ids=PROMPT_IDS,
        response_lengths=LENGTHS,
    )


@pytest.mark.parametrize(
    "loss_fn",
    [DPOLoss(beta=0.5, pairs="best_vs_worst"), IPOLoss(beta=0.5, pairs="best_vs_worst", average_log_probs=False),
     CalDPOLoss(beta=0.5, pairs="best_vs_worst"), DistillationLoss(beta=0.5, pairs="best_vs_worst"),
     RewardAwareRPOLoss(beta=0.5, eta=1.0, pairs="best_vs_worst")],
    ids=lambda loss: type(loss).__name__,
)
def test_pairwise_modules_use_only_pairs_with_distinct_rewards(loss_fn):
    """Only prompt 0 gives a pair (index 0 over index 1): the lone and the tied prompts add nothing."""
    data = batch()
    output = loss_fn(data)
    pair = (POLICY[[0]], POLICY[[1]], REFERENCE[[0]], REFERENCE[[1]])
    name = type(loss_fn).__name__
    if name == "DPOLoss":
        expected = LF.dpo_loss(*pair, beta=0.5)
    elif name == "IPOLoss":
        expected = LF.ipo_loss(*pair, beta=0.5)
    elif name == "CalDPOLoss":
        expected = LF.cal_dpo_loss(*pair, beta=0.5)
    else:
        gap = 0.5 * ((-4.0 + 5.0) - (-9.0 + 8.0)) - (0.8 - 0.2)
        expected = torch.tensor(gap**2)
    assert output.loss.item() == pytest.approx(expected.item())
    output.loss.backward()
    assert data.policy_logps.grad[2:].abs().sum() == 0
    torch.testing.assert_close(output.implicit_rewards, 0.5 * (POLICY - REFERENCE))


def test_a_batch_without_pairs_gives_zero_loss_that_still_backpropagates():
    lone = ResponseLogProbs(POLICY[3:].clone().requires_grad_(), t(0, 0, 0), REFERENCE[3:], t(0, 0, 0),
                            REWARDS[3:], torch.tensor([1, 2, 2]), LENGTHS[3:])
    output = DPOLoss(beta=0.1)(lone)
    assert output.loss.item() == 0.0
    output.loss.backward()
    assert torch.equal(lone.policy_logps.grad, torch.zeros(3, dtype=torch.float64))


def test_reference_free_modules_need_no_reference():
    for loss_fn in (SimPOLoss(pairs="best_vs_worst"), SLiCHFLoss(pairs="best_vs_worst"),
                    ORPOLoss(pairs="best_vs_worst"), RLOOLoss()):
        assert loss_fn.needs_reference is False
        assert torch.isfinite(loss_fn(batch(reference=False)).loss)
    for loss_fn in (DPOLoss(), IPOLoss(), CalDPOLoss(), DistillationLoss(), RewardAwareRPOLoss(),
                    RewardPartitionLoss(), RAOLoss()):
        assert loss_fn.needs_reference is True


def test_ipo_averages_log_probs_by_default_so_long_responses_do_not_dominate():
    data = batch()
    averaged = IPOLoss(beta=0.5, pairs="best_vs_worst")(data).loss.item()
    h_w, h_l = (-4.0 + 5.0) / 4, (-9.0 + 8.0) / 9
    assert averaged == pytest.approx((h_w - h_l - 1.0) ** 2)


def test_rloo_leave_one_out_advantages_by_hand():
    advantages = LF.leave_one_out_advantages(REWARDS, PROMPT_IDS)
    expected = [0.8 - 0.35, 0.2 - 0.65, 0.5 - 0.5, 0.0, 0.0, 0.0]  # lone and tied prompts: no signal
    torch.testing.assert_close(advantages, t(*expected))
    loss = RLOOLoss()(batch(reference=False)).loss
    prompt0 = -(expected[0] * -4.0 + expected[1] * -9.0 + expected[2] * -6.0) / 3
    assert loss.item() == pytest.approx(prompt0 / 3)  # prompts 1 and 2 contribute zeros to the mean


def test_reward_partition_normaliser_and_loss_by_hand():
    tau = 0.5
    policy, reference = POLICY.tolist(), REFERENCE.tolist()
    rewards, groups = REWARDS.tolist(), [[0, 1, 2], [3], [4, 5]]
    per_prompt = []
    for members in groups:
        log_v = math.log(sum(math.exp(reference[i] + rewards[i] / tau) for i in members))
        residuals = [(policy[i] - reference[i]) - (rewards[i] / tau - log_v) for i in members]
        per_prompt.append(mean([r**2 for r in residuals]))
    expected = 0.5 * mean(per_prompt)
    got = LF.reward_partition_loss(POLICY, REFERENCE, REWARDS, PROMPT_IDS, tau=tau)
    assert got.item() == pytest.approx(expected)
    # a lone response: V = tau*(log ref + r/tau), so its target is log pi = 0 (probability one)
    assert per_prompt[1] == pytest.approx(policy[3] ** 2)
    module = RewardPartitionLoss(tau=tau, average_log_probs=False)(batch())
    assert module.loss.item() == pytest.approx(expected)


def qrpo_by_hand(beta):
    """Value and d loss / d policy_logps of QRPO over the module batch, plain floats: the quantile by counting,
    the normaliser as the mean of exp(q / beta) over the k values the quantile of k reference samples takes."""
    policy, reference, rewards = POLICY.tolist(), REFERENCE.tolist(), REWARDS.tolist()
    groups = [[0, 1, 2], [3], [4, 5]]
    value, grads = 0.0, [0.0] * 6
    for members in groups:
        k = len(members)
        beta_log_z = beta * math.log(sum(math.exp(j / k / beta) for j in range(1, k + 1)) / k)
        for i in members:
            quantile = sum(rewards[j] <= rewards[i] for j in members) / k
            residual = quantile - beta_log_z - beta * (policy[i] - reference[i])
            value += residual**2 / k / len(groups)
            grads[i] = -2 * beta * residual / k / len(groups)
    return value, grads


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_qrpo_quantiles_normaliser_loss_and_gradient_by_hand(beta):
    # quantiles: prompt 0 ranks 0.8 > 0.5 > 0.2; the lone response is its own top; the tie shares the top
    quantiles, counts = LF.quantile_rewards(REWARDS, PROMPT_IDS)
    torch.testing.assert_close(quantiles, t(1.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0))
    assert counts.tolist() == [3, 3, 3, 1, 2, 2]
    expected_value, expected_grads = qrpo_by_hand(beta)
    inputs = batch()
    out = QRPOLoss(beta=beta)(inputs)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(expected_value, rel=1e-9)
    torch.testing.assert_close(inputs.policy_logps.grad, t(*expected_grads))
    # A lone response's target log-ratio is 0 (q = 1 = beta log Z): it stays as likely as under the reference.
    assert LF.qrpo_log_partition(beta, 1) * beta == pytest.approx(1.0)


def test_qrpo_normaliser_tends_to_the_papers_continuous_one():
    # The continuous quantile's Z = integral_0^1 exp(u / beta) du, here by the midpoint rule.
    steps = 200_000
    for beta in (0.05, 0.5, 2.0):
        integral = sum(math.exp((i + 0.5) / steps / beta) for i in range(steps)) / steps
        assert LF.qrpo_log_partition(beta) == pytest.approx(math.log(integral), rel=1e-7)
        assert LF.qrpo_log_partition(beta, 20_000) == pytest.approx(math.log(integral), rel=1e-3)
    assert LF.qrpo_log_partition(1e-4) == pytest.approx(math.log(1e-4) + 1e4)  # finite where exp(1/beta) is not
    assert math.isfinite(LF.qrpo_log_partition(1e-4, 4))


def test_rebel_regresses_every_pair_difference_by_hand():
    beta = 0.25
    policy, reference, rewards = POLICY.tolist(), REFERENCE.tolist(), REWARDS.tolist()
    h = [policy[i] - reference[i] for i in range(6)]
    pairs_of = {0: [(0, 1), (0, 2), (1, 2)], 2: [(4, 5)]}  # prompt 1 has one response: no pair
    value, grads = 0.0, [0.0] * 6
    for pairs in pairs_of.values():
        for i, j in pairs:
            residual = (rewards[i] - rewards[j]) / beta - (h[i] - h[j])
            value += residual**2 / len(pairs) / len(pairs_of)
            grads[i] += -2 * residual / len(pairs) / len(pairs_of)
            grads[j] += 2 * residual / len(pairs) / len(pairs_of)
    inputs = batch()
    out = REBELLoss(beta=beta)(inputs)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(value, rel=1e-9)
    torch.testing.assert_close(inputs.policy_logps.grad, t(*grads))
    assert grads[3] == 0.0 and grads[4] != 0.0  # the lone response is out; the tie (4, 5) pulls h_4 towards h_5
    REBELLoss().check_data([[1.0, 1.0], [0.5]])  # a tie is a pair (target difference 0)
    with pytest.raises(ValueError, match="REBELLoss: none of the 2 training prompts has two responses"):
        REBELLoss().check_data([[1.0], [0.5]])
    lone = LF.rebel_loss(POLICY[:1].clone().requires_grad_(), REFERENCE[:1], REWARDS[:1], PROMPT_IDS[:1], beta=beta)
    assert lone.item() == 0.0 and lone.requires_grad


# --- Hyperparameters and data refused before any model loads ------------------------------------------------------

OUT_OF_RANGE = [
    (RAOLoss, {"beta": 0.0}, "beta must be > 0"),
    (DPOLoss, {"beta": -0.1}, "beta must be > 0"),
    (DPOLoss, {"label_smoothing": 0.5}, "label_smoothing must be in"),
    (IPOLoss, {"beta": 0.0}, "beta must be > 0"),
    (CalDPOLoss, {"beta": 0.0}, "beta must be > 0"),
    (SimPOLoss, {"beta": 0.0}, "beta must be > 0"),
    (SimPOLoss, {"gamma": -1.0}, "gamma"),
    (SLiCHFLoss, {"delta": 0.0}, "delta"),
    (SLiCHFLoss, {"nll_weight": -1.0}, "nll_weight"),
    (ORPOLoss, {"odds_ratio_weight": 0.0}, "odds_ratio_weight"),
    (DistillationLoss, {"beta": 0.0}, "beta must be > 0"),
    (RewardAwareRPOLoss, {"beta": 0.0}, "beta must be > 0"),
    (RewardAwareRPOLoss, {"eta": 0.0}, "eta must be > 0"),
    (RewardPartitionLoss, {"tau": 0.0}, "tau must be > 0"),
    (QRPOLoss, {"beta": 0.0}, "beta must be > 0"),
    (REBELLoss, {"beta": -1.0}, "beta must be > 0"),
]


@pytest.mark.parametrize("loss_class, kwargs, message", OUT_OF_RANGE,
                         ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in OUT_OF_RANGE])
def test_every_loss_refuses_hyperparameters_out_of_range(loss_class, kwargs, message):
    with pytest.raises(ValueError, match=f"{loss_class.__name__}: {message}"):
        loss_class(**kwargs)


@pytest.mark.parametrize("loss", [DPOLoss(), SimPOLoss(), RLOOLoss(), BradleyTerryLoss()], ids=lambda l: type(l).__name__)
def test_losses_that_need_pairs_refuse_data_without_any(loss, caplog):
    with pytest.raises(ValueError, match="none of the 3 training prompts has two responses with different rewards"):
        loss.check_data([[1.0], [0.5], [2.0]])  # one response per prompt
    with pytest.raises(ValueError, match="would find no pair"):
        loss.check_data([[1.0, 1.0], [0.5, 0.5], [2.0]])  # all tied
    loss.check_data([[1.0, 0.0], [0.5, 0.5]])  # one prompt teaches: allowed, with a warning
    assert "1 of 2 training prompts give no pair" in caplog.text


def test_point_wise_rao_learns_from_single_responses():
    RAOLoss().check_data([[1.0], [0.5]])  # exact targets need no pairs


def test_log_odds_keeps_its_digits_near_zero():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    for a in (-1e-5, -1e-3, -0.5, -8.0):
        average = torch.tensor([a], dtype=torch.float32, requires_grad=True)
        value = LF.log_odds(average)
        value.backward()
        exact_value = float(mpmath.mpf(a) - mpmath.log(-mpmath.expm1(a)))
        exact_grad = float(1 / (1 - mpmath.exp(a)))
        assert value.item() == pytest.approx(exact_value, rel=2e-6), a
        assert average.grad.item() == pytest.approx(exact_grad, rel=2e-6), a
    # p -> 1 has infinite odds: the value is held at a = -1e-6, the gradient still flows
    at_one = torch.tensor([0.0], requires_grad=True)
    LF.log_odds(at_one).backward()
    assert torch.isfinite(LF.log_odds(at_one)).all() and at_one.grad.item() > 1e5
