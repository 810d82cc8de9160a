"""PPO: rollout scoring against plain forward passes, GAE against a loop, generation's stop handling, and
recipes/ppo_distributed.py raising the reward model's held-out score, bounded KL, exact resume."""

import math
import subprocess
import sys

import pytest
import torch
from torchtune.models.llama3 import llama3

from rao_tune.data import collate_packed_batch
from rao_tune.models import reward_model
from rao_tune.training.metrics import read_disk_log
from rao_tune.training.ppo import (
    ResponseLayout,
    Rollout,
    Samples,
    add_advantages,
    response_token_logps,
    response_token_values,
    rollout_examples,
    sample_responses,
)

from conftest import REPO_ROOT
from recipe_runner import (
    StopAfterFirstEpoch,
    crash_after_first_checkpoint,
    load_recipe,
    record_model_builds,
    run_recipe_in_process,
    threads_of_torchrun_per_process,
)

CONFIG = REPO_ROOT / "configs" / "tiny_ppo.yaml"
EOT = 519  # the tiny tokenizer's <|eot_id|>, its stop token


@pytest.fixture(scope="module")
def models(tiny_assets):
    torch.manual_seed(0)
    policy = llama3(**tiny_assets["model_kwargs"]).eval()
    value = reward_model("torchtune.models.llama3.llama3", **tiny_assets["model_kwargs"]).eval()
    return policy, value


def test_rollout_log_probs_and_values_match_plain_forward_passes(models):
    """Packed rollouts (each prompt once, its samples after it, prompts not scored) give, per response token,
    the log-prob and V(s_t) that one unpacked forward pass over prompt + response gives."""
    policy, value = models
    prompts = [[1, 5, 9, 11], [1, 7]]
    samples = Samples(responses=[[20, 21, EOT], [22], [30, 31, 32, 33], [34, EOT]], ended=[True, False, False, True],
                      entropies=[0.0] * 4)
    batch = collate_packed_batch(rollout_examples(prompts, samples, 2), pad_id=0, score_prompts=False)
    layout = ResponseLayout.of(batch)
    with torch.no_grad():
        logps = response_token_logps(policy, batch, layout, chunk_tokens=3)
        values = response_token_values(value, batch, layout)
    assert layout.mask.tolist() == [[True] * 3 + [False], [True] + [False] * 3, [True] * 4, [True] * 2 + [False] * 2]
    for index, response in enumerate(samples.responses):
        sequence = torch.tensor([prompts[index // 2] + response])
        start = len(prompts[index // 2]) - 1  # the position that predicts the response's first token
        with torch.no_grad():
            expected_logps = torch.log_softmax(policy(sequence)[0], -1)[start:-1].gather(-1, torch.tensor(response)[:, None])
            expected_values = value(sequence)[0, start:-1, 0]
        torch.testing.assert_close(logps[index, : len(response)], expected_logps[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[index, : len(response)], expected_values, atol=1e-5, rtol=1e-5)
        assert (logps[index, len(response):] == 0).all() and (values[index, len(response):] == 0).all()


def test_advantages_are_gae_of_kl_penalised_rewards_whitened_over_all_minibatches():
    torch.manual_seed(1)
    kl_coeff, gamma, lmbda = 0.1, 0.9, 0.8
    rollouts = []
    for lengths in ([3, 1], [2, 4, 2]):  # two minibatches of different widths
        mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        layout = ResponseLayout(scored=None, rows=None, columns=None, mask=mask)
        rollouts.append(Rollout(batch={}, layout=layout, old_logps=torch.randn(mask.shape) * mask,
                                ref_logps=torch.randn(mask.shape) * mask, values=torch.randn(mask.shape) * mask,
                                scores=torch.randn(len(lengths))))
    add_advantages(rollouts, kl_coeff=kl_coeff, gamma=gamma, lmbda=lmbda)

    raw = []  # independently: one response at a time
    for rollout in rollouts:
        for n, length in enumerate(rollout.layout.mask.sum(-1).tolist()):
            rewards = [-kl_coeff * float(rollout.old_logps[n, t] - rollout.ref_logps[n, t]) for t in range(length)]
            rewards[-1] += float(rollout.scores[n])
            values = [float(v) for v in rollout.values[n, :length]] + [0.0]  # the episode ends with the response
            advantage, advantages = 0.0, []
            for t in reversed(range(length)):
                advantage = rewards[t] + gamma * values[t + 1] - values[t] + gamma * lmbda * advantage
                advantages.insert(0, advantage)
            raw.append((rollout, n, rewards, advantages, [a + v for a, v in zip(advantages, values)]))
    flat = [a for *_, advantages, _ in raw for a in advantages]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / (len(flat) - 1))  # torchtune's masked_var is unbiased
    for rollout, n, rewards, advantages, returns in raw:
        length = len(rewards)
        torch.testing.assert_close(rollout.rewards[n, :length], torch.tensor(rewards))
        torch.testing.assert_close(rollout.returns[n, :length], torch.tensor(returns), atol=1e-5, rtol=1e-5)
        # whitened, mean restored (torchtune's whiten(shift_mean=True))
        torch.testing.assert_close(rollout.advantages[n, :length],
                                   torch.tensor([(a - mean) / std + mean for a in advantages]), atol=1e-4, rtol=1e-4)
        assert (rollout.advantages[n, length:] == 0).all()


def test_sampling_cuts_after_the_first_stop_token_and_does_not_depend_on_stopping_early(models):
    """Stopping when every sequence has ended (one process) and always decoding to the limit (several processes,
    FSDP) give the same responses from the same generator; each ends with its stop token or has the full length."""
    policy, _ = models
    prompts = [[1, 5, 9, 11], [1, 7]]
    common = dict(samples_per_prompt=3, max_new_tokens=12, pad_id=0, stop_tokens=[EOT, *range(40, 80)],
                  device=torch.device("cpu"), dtype=torch.float32)
    early = sample_responses(policy, prompts, stop_early=True, rng=torch.Generator().manual_seed(5), **common)
    full = sample_responses(policy, prompts, stop_early=False, rng=torch.Generator().manual_seed(5), **common)
    assert early.responses == full.responses and early.ended == full.ended
    assert len(early.responses) == 6 and any(early.ended) and not all(early.ended)
    for response, ended in zip(early.responses, early.ended):
        stops = [i for i, token in enumerate(response) if token in common["stop_tokens"]]
        assert stops == ([len(response) - 1] if ended else []) and (ended or len(response) == 12)
    # entropies: the policy's next-token distributions, summed over each response (at most log V per token)
    assert all(0 < entropy <= len(r) * math.log(528) + 1e-4 for entropy, r in zip(early.entropies, early.responses))
    greedy = sample_responses(policy, prompts, temperature=0.0, rng=torch.Generator().manual_seed(7), **common)
    again = sample_responses(policy, prompts, temperature=0.0, rng=torch.Generator().manual_seed(8), **common)
    assert greedy.responses == again.responses  # greedy does not depend on the generator


@pytest.fixture(scope="module")
def reward_model_dir(tiny_assets, tmp_path_factory):
    """The tiny marker-word reward model, trained once through its recipe."""
    output_dir = tmp_path_factory.mktemp("reward_model")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_recipe_in_process(monkeypatch, load_recipe("reward_model_distributed"),
                              REPO_ROOT / "configs" / "tiny_reward_model.yaml", f"assets_dir={tiny_assets['out_dir']}",
                              f"output_dir={output_dir}", "epochs=1")
    return output_dir / "epoch_0"


def run(monkeypatch, tiny_assets, reward_model_dir, output_dir, *overrides, recipe=None):
    run_recipe_in_process(monkeypatch, recipe or load_recipe("ppo_distributed"), CONFIG,
                          f"assets_dir={tiny_assets['out_dir']}", f"reward_model_dir={reward_model_dir}",
                          f"output_dir={output_dir}", *overrides)


SETTINGS = ["epochs=2", "max_steps_per_epoch=16", "optimizer.lr=1e-3", "eval_every_n_steps=8", "save_every_n_steps=4"]
METRICS = {"reward", "kl", "reward_with_kl", "entropy", "response_length", "ended", "policy_loss", "value_loss",
           "clip_fraction", "ratio", "approx_kl", "loss", "lr", "lr_value", "generated_tokens_per_second"}


@pytest.mark.slow
def test_ppo_raises_the_held_out_reward_with_bounded_kl_and_resumes_exactly(
        monkeypatch, tmp_path, tiny_assets, reward_model_dir):
    run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "full", *SETTINGS)
    full = read_disk_log(tmp_path / "full" / "logs")
    assert METRICS <= set(full[1]) and {"eval_reward", "eval_kl", "eval_response_length"} <= set(full[32])
    assert full[0]["eval_kl"] == 0  # before training the policy is its reference
    assert full[32]["eval_reward"] > full[0]["eval_reward"] + 1.0  # the reward model's held-out mean score rises
    assert max(full[step]["kl"] for step in range(1, 33)) < 10.0  # sampled log(pi/pi_ref), summed per response
    assert full[1]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout comes from the reference itself
    assert full[1]["clip_fraction"] == 0.0  # warm-up: the first updates are too small to leave the clip range
    assert any(full[step]["clip_fraction"] > 0 for step in range(2, 9))  # later updates of a batch get clipped

    # Killed in the middle of the first epoch, two steps after its step checkpoint at step 4.
    recipe = load_recipe("ppo_distributed")
    finish_step = recipe.PPORecipeDistributed.finish_step

    def finish_step_then_crash(self, *args, **kwargs):
        finish_step(self, *args, **kwargs)
        if self.global_step == 6:
            raise StopAfterFirstEpoch

    monkeypatch.setattr(recipe.PPORecipeDistributed, "finish_step", finish_step_then_crash)
    with pytest.raises(StopAfterFirstEpoch):
        run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "resumed", *SETTINGS, recipe=recipe)
    for log_file in (tmp_path / "resumed" / "logs").glob("*.txt"):
        log_file.rename(log_file.with_suffix(".first"))
    run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "resumed", *SETTINGS, "resume_from_checkpoint=True")
    resumed = read_disk_log(tmp_path / "resumed" / "logs")
    assert sorted(step for step in resumed if step > 0) == list(range(5, 33))
    # Sampling draws from the global RNG, which the step checkpoint restores: on CPU every figure is bit-exact.
    for step in range(5, 33):
        for name in ("reward", "kl", "response_length", "entropy", "loss", "value_loss", "clip_fraction", "lr"):
            assert resumed[step][name] == full[step][name], (step, name)
    assert resumed[32]["eval_reward"] == full[32]["eval_reward"]
    assert (tmp_path / "resumed" / "epoch_1" / "model-00001-of-00001.safetensors").read_bytes() == \
        (tmp_path / "full" / "epoch_1" / "model-00001-of-00001.safetensors").read_bytes()


@pytest.mark.slow
def test_a_resume_with_other_ppo_settings_is_refused(monkeypatch, tmp_path, tiny_assets, reward_model_dir):
    recipe = load_recipe("ppo_distributed")
    crash_after_first_checkpoint(monkeypatch, recipe.PPORecipeDistributed)
    with pytest.raises(StopAfterFirstEpoch):
        run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "run", "max_steps_per_epoch=2", "epochs=2",
            recipe=recipe)
    with pytest.raises(ValueError, match="ppo_epochs=4 \\(now 2\\)"):  # the LR schedule's length would change
        run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "run", "max_steps_per_epoch=2", "epochs=2",
            "ppo_epochs=2", "resume_from_checkpoint=True")


@pytest.mark.slow
def test_gradient_accumulation_and_uneven_minibatches_are_refused(monkeypatch, tmp_path, tiny_assets, reward_model_dir):
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "a", "gradient_accumulation_steps=2")
    with pytest.raises(ValueError, match="ppo_minibatches"):
        run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "b", "ppo_minibatches=3")


@pytest.mark.slow
def test_lora_ppo_uses_the_policy_with_adapters_off_as_its_reference(monkeypatch, tmp_path, tiny_assets, reward_model_dir):
    recipe = load_recipe("ppo_distributed")
    built = record_model_builds(monkeypatch, recipe)
    run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "run", "max_steps_per_epoch=3", "optimizer.lr=3e-3",
        "model._component_=torchtune.models.llama3.lora_llama3", "model.lora_attn_modules=[q_proj,v_proj]",
        "model.lora_rank=4", "model.lora_alpha=8", recipe=recipe)
    assert len(built) == 3  # policy, reward model, value model: no second copy of the policy
    logged = read_disk_log(tmp_path / "run" / "logs")
    assert logged[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start at B = 0: policy = reference
    assert logged[3]["kl"] != 0.0  # and the reference stays the base once the adapters move
    assert (tmp_path / "run" / "epoch_0" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_decode_in_step_and_answer_the_held_out_prompts_like_one(
        monkeypatch, tmp_path, tiny_assets, reward_model_dir):
    """Under FSDP each process decodes every step (no early stop, else the collective gathers would hang), and
    the held-out prompts are answered once each over the processes: the greedy answers' reward before training
    is the one-process figure.

    Not the same computation: the held-out batches differ (ranks take every other prompt), so padding and
    summation order differ. Greedy answers agree only while no step's top-2 logits are within rounding of each
    other; the tiny model's are far apart (this held on every machine so far), and one thread per process on both
    sides removes the thread count as a second source of difference."""
    with threads_of_torchrun_per_process():
        run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "one", "max_steps_per_epoch=2", "batch_size=2")
    command = [sys.executable, "-m", "torchtune._cli.tune", "run", "--nproc_per_node", "2", "recipes/ppo_distributed.py",
               "--config", "configs/tiny_ppo.yaml", f"assets_dir={tiny_assets['out_dir']}",
               f"reward_model_dir={reward_model_dir}", f"output_dir={tmp_path / 'two'}", "max_steps_per_epoch=2",
               "batch_size=2"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    one, two = read_disk_log(tmp_path / "one" / "logs"), read_disk_log(tmp_path / "two" / "logs")
    assert two[0]["eval_prompts"] == one[0]["eval_prompts"] == 64
    for name in ("eval_reward", "eval_response_length", "eval_ended"):
        assert two[0][name] == pytest.approx(one[0][name], rel=1e-5, abs=1e-6), name
    assert sorted(step for step in two if step > 0) == [1, 2] and all(math.isfinite(two[s]["loss"]) for s in (1, 2))
    assert two[1]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_ppo_with_the_step_in_backward_trains_like_plain_adamw(monkeypatch, tmp_path, tiny_assets, reward_model_dir):
    """Two parameter groups (policy, value at its own lr) and several updates per step, each stepping inside its
    backward: the same losses and KL as plain AdamW, up to float rounding (per-parameter vs foreach AdamW)."""
    short = ["max_steps_per_epoch=3", "optimizer.lr=3e-3", "clip_grad_norm=null"]
    run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "plain", *short)
    run(monkeypatch, tiny_assets, reward_model_dir, tmp_path / "in_backward", *short, "optimizer_in_bwd=True")
    plain, in_backward = read_disk_log(tmp_path / "plain" / "logs"), read_disk_log(tmp_path / "in_backward" / "logs")
    assert plain[3]["kl"] != 0.0  # the policy moved
    for step in (1, 2, 3):
        for metric in ("loss", "kl", "value_loss", "lr", "lr_value"):
            assert in_backward[step][metric] == pytest.approx(plain[step][metric], rel=1e-3, abs=1e-6), (step, metric)
