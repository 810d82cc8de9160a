"""Preference losses as plain functions over per-sequence log-probabilities.

Shapes: a batch holds N responses to B prompts, flattened. Every tensor argument is ``[N]``:

- ``policy_logps`` / ``reference_logps``: log pi(y|x) summed over the response tokens.
- ``policy_prompt_logps`` / ``reference_prompt_logps``: log pi(x - t0 | t0), summed over the prompt
  tokens after the shared first token t0. Every response of one prompt carries the same value.
- ``rewards``: the explicit reward r(x, y) of each response.
- ``prompt_ids``: which prompt each response belongs to (any integer ids; equal id = same prompt).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def per_prompt_mean(values: Tensor, prompt_ids: Tensor) -> Tensor:
    """Mean of ``values`` over the responses of each prompt; returns one value per distinct prompt id."""
    _, prompt_index = torch.unique(prompt_ids, return_inverse=True)
    num_prompts = int(prompt_index.max()) + 1
    sums = values.new_zeros(num_prompts).index_add(0, prompt_index, values)
    counts = torch.bincount(prompt_index, minlength=num_prompts).to(values.dtype)
    return sums / counts


def rao_implicit_rewards(
    policy_logps: Tensor,
    reference_logps: Tensor,
    policy_prompt_logps: Tensor,
    reference_prompt_logps: Tensor,
    *,
    beta: float,
    z0: float,
) -> Tensor:
    """RAO's implicit reward ``beta * log(pi/pi_ref)(y|x) + beta * log Z_i`` (Algorithm 1, lines 6-10).

    ``log Z_i = z0 + stopgrad(log pi(x - t0|t0) - log pi_ref(x - t0|t0))`` is the prefix-consistency
    normaliser (Eq. 6): the prompt's log-ratio after t0 plus the constant log Z_0. It is detached: the
    normaliser is a target-side constant, not something the policy may move to lower the loss.
    """
    response_logratio = policy_logps - reference_logps
    prompt_logratio = (policy_prompt_logps - reference_prompt_logps).detach()
    return beta * (response_logratio + z0 + prompt_logratio)


def rao_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    policy_prompt_logps: Tensor,
    reference_prompt_logps: Tensor,
    rewards: Tensor,
    prompt_ids: Tensor,
    *,
    beta: float,
    z0: float,
) -> Tensor:
    """Reward Alignment Optimization loss (Algorithm 1 of the RAO paper).

        r_theta(x, y) = beta * [log pi(y|x) - log pi_ref(y|x)] + beta * [z0 + sg(log pi(x-t0|t0) - log pi_ref(x-t0|t0))]
        L = mean over prompts x of ( mean over responses y of x of (r(x, y) - r_theta(x, y))^2 )

    ``z0`` is log Z_0 (the paper's "Z_0 = 50" is this log value). Returns the scalar loss.
    """
    implicit_rewards = rao_implicit_rewards(
        policy_logps, reference_logps, policy_prompt_logps, reference_prompt_logps, beta=beta, z0=z0
    )
    squared_error = (rewards - implicit_rewards) ** 2
    return per_prompt_mean(squared_error, prompt_ids).mean()


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Bradley-Terry reward-model loss (RAO paper Eq. 2; Ouyang et al. 2022): ``mean(-log sigmoid(r_w - r_l))``
    over pairs, where ``r_w`` / ``r_l`` are the scalar scores of the preferred / dispreferred response.
    ``logsigmoid`` keeps large negative margins finite."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def pairwise_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Fraction of pairs the scores order correctly; a tie counts as wrong."""
    return (chosen_scores > rejected_scores).float().mean()


# --- Pairwise losses --------------------------------------------------------------------------------------------
# Arguments are ``[P]`` tensors over P (chosen, rejected) pairs: ``*_chosen_logps`` / ``*_rejected_logps`` are
# log pi(y|x) summed over the response tokens, ``*_lengths`` the responses' token counts, ``*_rewards`` the
# explicit rewards. Each function returns the mean over pairs.


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DPO (Rafailov et al. 2023), with conservative label smoothing eps (Mitchell 2023, "cDPO")::

        d = beta * [(log pi_w - log ref_w) - (log pi_l - log ref_l)]
        L = -(1 - eps) * log sigmoid(d) - eps * log sigmoid(-d)
    """
    margin = beta * ((policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps))
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean()


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> Tensor:
    """IPO (Azar et al. 2023), with beta as the paper's tau::

        L = ((log pi_w - log ref_w) - (log pi_l - log ref_l) - 1 / (2 * beta))^2

    Pass summed log-probs for the paper's form, or token-averaged ones for trl's (``IPOLoss`` averages by
    default, as trl does, so long responses do not dominate the fixed 1/(2 beta) target).
    """
    logratio_gap = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return ((logratio_gap - 1 / (2 * beta)) ** 2).mean()


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    gamma: float,
) -> Tensor:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin gamma::

        L = -log sigmoid(beta * log pi_w / |y_w| - beta * log pi_l / |y_l| - gamma)
    """
    margin = beta * policy_chosen_logps / chosen_lengths - beta * policy_rejected_logps / rejected_lengths - gamma
    return -F.logsigmoid(margin).mean()


def slic_hf_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    *,
    delta: float = 1.0,
    nll_weight: float = 0.0,
) -> Tensor:
    """SLiC-HF (Zhao et al. 2023): a rank-calibration hinge on the sequence log-likelihoods, plus an optional
    regularising NLL of the chosen response (per token)::

        L = max(0, delta - log pi_w + log pi_l) + lambda * (-log pi_w / |y_w|)
    """
    hinge = torch.relu(delta - policy_chosen_logps + policy_rejected_logps)
    return (hinge - nll_weight * policy_chosen_logps / chosen_lengths).mean()


def log_odds(average_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) of p = exp(a), a = mean token log-prob: ``a - log(-expm1(a))``, exact as a -> 0 (where
    ``log1p(-exp(a))`` loses digits). Values above a = -1e-6 are held there (p = 1 has infinite odds) while the
    gradient still flows, as if unclamped at the boundary."""
    bounded = average_logps + (average_logps.clamp(max=-1e-6) - average_logps).detach()
    return bounded - torch.log(-torch.expm1(bounded))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    odds_ratio_weight: float,
) -> Tensor:
    """ORPO (Hong et al. 2024): reference-free; NLL of the chosen response plus an odds-ratio term, both on
    token-averaged log-probs ``a = log pi / |y|``::

        odds(y) = exp(a) / (1 - exp(a))
        L = -a_w - lambda * log sigmoid(log odds(y_w) - log odds(y_l))
    """
    chosen_average, rejected_average = policy_chosen_logps / chosen_lengths, policy_rejected_logps / rejected_lengths
    odds_ratio_term = -F.logsigmoid(log_odds(chosen_average) - log_odds(rejected_average))
    return (-chosen_average + odds_ratio_weight * odds_ratio_term).mean()


def cal_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> Tensor:
    """Cal-DPO (Xiao et al. 2024): a DPO term on the log-ratios plus calibration of each log-ratio to the
    scale of the rewards, +-1/(2 beta), so that the chosen response's likelihood cannot fall::

        h_w = log pi_w - log ref_w,  h_l = log pi_l - log ref_l
        L = -log sigmoid(h_w - h_l) + (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2

    As in the authors' implementation, the Bradley-Terry term uses unscaled log-ratios; beta sets the targets.
    """
    chosen_logratio = policy_chosen_logps - reference_chosen_logps
    rejected_logratio = policy_rejected_logps - reference_rejected_logps
    losses = (
        -F.logsigmoid(chosen_logratio - rejected_logratio)
        + (chosen_logratio - 1 / (2 * beta)) ** 2
        + (rejected_logratio + 1 / (2 * beta)) ** 2
    )
    return losses.mean()


def distillation_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    beta: float,
) -> Tensor:
    """Reward-model distillation (Fisch et al. 2024, the RAO paper's "RPO" baseline): the implicit reward gap
    regressed on the explicit one, i.e. :func:`reward_aware_rpo_loss` with the squared distance and eta = 1::

        L = (beta * [(log pi_w - log ref_w) - (log pi_l - log ref_l)] - (r_w - r_l))^2
    """
    return reward_aware_rpo_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        chosen_rewards, rejected_rewards, beta=beta, eta=1.0, distance="squared",
    )


RPO_DISTANCES = ("squared", "backward_kl", "forward_kl")


def reward_aware_rpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    beta: float,
    eta: float,
    distance: str = "squared",
) -> Tensor:
    """NVIDIA's reward-aware preference optimization (Nemotron-4 340B report; NeMo-Aligner's ``rpo_sq``,
    ``rpo_bwd_kl``, ``rpo_fwd_kl``): a distance between the implicit reward gap and the scaled explicit one::

        a = beta * [(log pi_w - log ref_w) - (log pi_l - log ref_l)],   b = eta * (r_w - r_l)
        squared:     (a - b)^2
        backward_kl: KL(Bern(sigmoid(b)) || Bern(sigmoid(a)))   (target first, as NeMo-Aligner's rpo_bwd_kl)
        forward_kl:  KL(Bern(sigmoid(a)) || Bern(sigmoid(b)))
    """
    if distance not in RPO_DISTANCES:
        raise ValueError(f"distance must be one of {RPO_DISTANCES}, got {distance!r}")
    implicit_gap = beta * ((policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps))
    target_gap = eta * (chosen_rewards - rejected_rewards)
    if distance == "squared":
        return ((implicit_gap - target_gap) ** 2).mean()
    # log sigmoid(x) and log(1 - sigmoid(x)) = log sigmoid(-x), both stable
    log_model, log_model_not = F.logsigmoid(implicit_gap), F.logsigmoid(-implicit_gap)
    log_target, log_target_not = F.logsigmoid(target_gap), F.logsigmoid(-target_gap)
    if distance == "backward_kl":
        kl = log_target.exp() * (log_target - log_model) + log_target_not.exp() * (log_target_not - log_model_not)
    else:
        kl = log_model.exp() * (log_model - log_target) + log_model_not.exp() * (log_model_not - log_target_not)
    return kl.mean()


# --- Point-wise losses over all of a prompt's responses (arguments as for rao_loss) ----------------------------


def leave_one_out_advantages(rewards: Tensor, prompt_ids: Tensor) -> Tensor:
    """``r_i - mean_{j != i} r_j`` over the responses of each prompt; 0 for a prompt's only response."""
    _, prompt_index = torch.unique(prompt_ids, return_inverse=True)
    num_prompts = int(prompt_index.max()) + 1
    sums = rewards.new_zeros(num_prompts).index_add(0, prompt_index, rewards)
    counts = torch.bincount(prompt_index, minlength=num_prompts).to(rewards.dtype)
    others = (counts[prompt_index] - 1).clamp(min=1)
    advantages = rewards - (sums[prompt_index] - rewards) / others
    return torch.where(counts[prompt_index] > 1, advantages, torch.zeros_like(advantages))


def rloo_loss(policy_logps: Tensor, rewards: Tensor, prompt_ids: Tensor) -> Tensor:
    """Offline REINFORCE leave-one-out (Ahmadian et al. 2024) on the dataset's rewards and responses::

        A_i = r_i - mean_{j != i, same prompt} r_j
        L = -mean over prompts of mean over responses of A_i * log pi(y_i|x)

    Needs two or more responses per prompt; a lone response has no baseline and no gradient.
    """
    advantages = leave_one_out_advantages(rewards, prompt_ids).detach()
    return per_prompt_mean(-advantages * policy_logps, prompt_ids).mean()


def partition_log_normaliser(
    reference_logps: Tensor, rewards: Tensor, prompt_ids: Tensor, *, tau: float
) -> Tensor:
    """``V(x) / tau = log sum_{i of x} pi_ref(y_i|x) exp(r_i / tau)`` per response (Faye et al. 2025): the
    partition function of the prompt estimated from its own responses, weighted by the reference model."""
    _, prompt_index = torch.unique(prompt_ids, return_inverse=True)
    num_prompts = int(prompt_index.max()) + 1
    terms = reference_logps + rewards / tau
    maxima = terms.new_full((num_prompts,), -torch.inf).scatter_reduce(0, prompt_index, terms, reduce="amax")
    shifted = (terms - maxima[prompt_index]).exp()
    sums = terms.new_zeros(num_prompts).index_add(0, prompt_index, shifted)
    return (sums.log() + maxima)[prompt_index]


def reward_partition_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    rewards: Tensor,
    prompt_ids: Tensor,
    *,
    tau: float,
) -> Tensor:
    """Reward Partitioning Optimization (Faye et al. 2025, arXiv 2506.13702), RAO's closest point-wise sibling:
    the normaliser comes from the prompt's own responses instead of prefix consistency::

        V(x) = tau * log sum_{i of x} pi_ref(y_i|x) exp(r_i / tau)
        L = 1/2 * mean over prompts of mean over responses of (log pi(y|x) - log pi_ref(y|x) - (r - V(x)) / tau)^2

    Pass token-averaged log-probs for the authors' implementation (``RewardPartitionLoss`` does by default).
    They compute V once over the whole dataset; here it is computed from the batch, which holds every response
    of its prompts, so the value is the same.
    """
    log_normaliser = partition_log_normaliser(reference_logps, rewards, prompt_ids, tau=tau).detach()
    residual = (policy_logps - reference_logps) - (rewards / tau - log_normaliser)
    return 0.5 * per_prompt_mean(residual**2, prompt_ids).mean()


def dro_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    values: Tensor,
    rewards: Tensor,
    prompt_ids: Tensor,
    *,
    tau: float,
) -> Tensor:
    """Direct Reward Optimisation (Richemond et al. 2024, arXiv 2405.19107, Eq. 9), over single trajectories
    ``(x, y, r)``, with a learned value ``V(x)`` in place of the normaliser::

        L(theta, V) = 1/2 * mean over prompts of mean over responses of (r - V(x) - tau * log(pi/pi_ref)(y|x))^2

    Both the policy and ``values`` (a value network's output, one per response, equal within a prompt) descend
    it; at the optimum ``V(x) = tau * log Z(x)`` and ``pi = pi*``, the KL-regularised optimum, from any number
    of responses per prompt, including one.
    """
    residual = rewards - values - tau * (policy_logps - reference_logps)
    return 0.5 * per_prompt_mean(residual**2, prompt_ids).mean()


def quantile_rewards(rewards: Tensor, prompt_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Each response's reward as a quantile among its prompt's k responses, ``q_i = mean_{j of x} 1[r_j <= r_i]``
    (itself included: in {1/k, ..., 1}; tied responses share the higher quantile), and each response's k.
    QRPO computes the quantile against rewards of reference samples; a prompt's own responses are such samples
    when they were drawn from the reference."""
    same_prompt = prompt_ids[:, None] == prompt_ids[None, :]
    at_most = (rewards[None, :] <= rewards[:, None]) & same_prompt  # [i, j]: r_j <= r_i, same prompt
    counts = same_prompt.sum(-1)
    return at_most.sum(-1).to(rewards.dtype) / counts.to(rewards.dtype), counts


def qrpo_log_partition(beta: float, num_responses: int | None = None) -> float:
    """``log Z_q = log E_ref[exp(q / beta)]`` for the quantile reward ``q``. Among ``num_responses`` = k reference
    samples with distinct rewards, :func:`quantile_rewards` is uniform on {1/k, ..., 1}, so exactly
    ``log mean_{j=1..k} exp(j / (k beta))`` (a lone response, q = 1, gets the target log-ratio 0: it stays as
    likely as under the reference). ``None``: the continuous quantile, uniform on (0, 1), QRPO's
    ``log(beta (exp(1/beta) - 1))``, written to stay finite at small beta (the authors' code drops the ``- 1``)."""
    if num_responses is None:
        return math.log(beta) + 1.0 / beta + math.log1p(-math.exp(-1.0 / beta))
    exponents = [j / (num_responses * beta) for j in range(1, num_responses + 1)]
    top = max(exponents)
    return top + math.log(sum(math.exp(e - top) for e in exponents) / num_responses)


def qrpo_normalisers(beta: float, counts: Tensor, like: Tensor) -> Tensor:
    """``beta * log Z_q`` of each response, from its prompt's number of responses."""
    values = {int(k): beta * qrpo_log_partition(beta, int(k)) for k in torch.unique(counts)}
    return torch.tensor([values[int(k)] for k in counts], dtype=like.dtype, device=like.device)


def qrpo_loss(
    policy_logps: Tensor, reference_logps: Tensor, rewards: Tensor, prompt_ids: Tensor, *, beta: float
) -> Tensor:
    """Quantile Reward Policy Optimization (Matrenok et al. 2025, arXiv 2507.08068; identity transform, squared
    error, every response)::

        q(x, y) = quantile of r(x, y) among the prompt's k responses (:func:`quantile_rewards`)
        L = mean over prompts of mean over responses of (q(x, y) - beta * log Z_q(k) - beta * log(pi/pi_ref)(y|x))^2

    The optimum of the KL-regularised objective on quantile rewards, ``beta * log(pi*/pi_ref) = q - beta log Z_q``,
    has an exact normaliser (:func:`qrpo_log_partition`, for the k-sample quantile), so each response gets its
    own target, as in RAO.
    """
    quantiles, counts = quantile_rewards(rewards, prompt_ids)
    targets = quantiles - qrpo_normalisers(beta, counts, rewards)
    residual = targets - beta * (policy_logps - reference_logps)
    return per_prompt_mean(residual**2, prompt_ids).mean()


def rebel_loss(
    policy_logps: Tensor, reference_logps: Tensor, rewards: Tensor, prompt_ids: Tensor, *, beta: float
) -> Tensor:
    """REBEL (Gao et al. 2024, arXiv 2404.16767, Eq. 3 with pi_t = pi_ref: one offline iteration) over every
    pair of a prompt's responses, ties included (their target difference is 0)::

        h = log pi(y|x) - log pi_ref(y|x)
        L = mean over prompts of mean over pairs i < j of ((r_i - r_j) / beta - (h_i - h_j))^2

    As REBEL's code scales it (rewards times eta = 1 / beta rather than log-ratios times beta: the paper's
    loss times 1 / beta^2). A prompt with one response gives no pair and is left out of the mean.
    """
    log_ratios = policy_logps - reference_logps
    index = torch.arange(len(rewards), device=rewards.device)
    first, second = torch.where((prompt_ids[:, None] == prompt_ids[None, :]) & (index[:, None] < index[None, :]))
    if len(first) == 0:
        return log_ratios.sum() * 0.0  # no pair: zero, still connected to the graph
    residual = (rewards[first] - rewards[second]) / beta - (log_ratios[first] - log_ratios[second])
    return per_prompt_mean(residual**2, prompt_ids[first]).mean()
