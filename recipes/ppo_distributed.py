"""Online RLHF with PPO against the reward model (the RAO paper's Eq. 3 baseline) on torchtune's FSDP2 stack.

    tune run --nproc_per_node 8 recipes/ppo_distributed.py --config configs/llama3_8b_ppo.yaml

Reads top to bottom: ``setup`` builds the policy (from the SFT checkpoint), its frozen reference (the same
checkpoint, or the policy with its adapters off under LoRA), the frozen reward model of
``recipes/reward_model_distributed.py`` and a value model initialised from it, trained with the policy; the
prompts are those of the preference data the other methods train on (its responses and rewards are not used).
``train`` is the loop; each step:

1. samples ``samples_per_prompt`` responses to each of ``batch_size`` prompts per process with the policy
   (torchtune's generation with a KV cache),
2. scores them in the packed layout of every recipe: the policy's and reference's per-token log-probs, the value
   model's V(s_t) and the reward model's score at each response's last token,
3. turns them into per-token rewards (``-kl_coeff * log(pi/pi_ref)`` per token, the score at the last one), GAE
   advantages (``gamma``, ``lmbda``) and returns,
4. runs ``ppo_epochs`` passes over ``ppo_minibatches`` minibatches, each an optimizer update of the clipped
   policy and value losses (``loss``: torchtune's ``PPOLoss``).

Logged per step: reward, kl, reward_with_kl (Eq. 3's objective), entropy, response_length, ended (fraction
ending with a stop token), policy_loss, value_loss, clip_fraction, ratio, approx_kl, generation throughput;
``eval_*`` on held-out prompts (greedy answers, scored by the reward model). Step checkpoints hold policy, value
model, optimizer and the RNG that sampling draws from, so a resumed run samples what the uninterrupted one would.
Runs on CPU (gloo) and CUDA (nccl) from the same code.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from typing import Optional

import torch
from omegaconf import DictConfig
from torchtune import config, rlhf, training, utils

from rao_tune.eval.generation import stop_token_ids
from rao_tune.training.attention import packed_collator
from rao_tune.training.distributed import all_reduce_sum
from rao_tune.training.errors import run_main
from rao_tune.training.logprobs import DEFAULT_CHUNK_TOKENS, refuse_output_adapter
from rao_tune.training.loop import held_out_sums
from rao_tune.training.model import setup_fsdp_model
from rao_tune.training.ppo import (
    ResponseLayout,
    Rollout,
    Samples,
    add_advantages,
    collate_prompts,
    prompt_lists,
    response_token_logps,
    response_token_values,
    rollout_examples,
    sample_responses,
)
from rao_tune.training.recipe_base import DistributedRecipe, run_recipe
from rao_tune.training.value import PolicyAndValue, build_scalar_head_model, head_outputs

log = utils.get_logger("INFO")


class PPORecipeDistributed(DistributedRecipe):
    CONFIG_KEYS = frozenset({
        "ref_checkpointer", "reward_model", "reward_checkpointer", "value_model", "value_checkpointer", "value_lr",
        "samples_per_prompt", "max_generated_tokens", "missing_eos_score",
        "kl_coeff", "gamma", "lmbda", "ppo_epochs", "ppo_minibatches", "max_row_tokens", "logprob_chunk_tokens",
        "eval_dataset", "eval_every_n_steps", "eval_batch_size", "eval_before_training",
    })

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        # Loss, data, tokenizer and checkpoints are checked before any weight loads.
        self.setup_loss_and_data(cfg)
        self.setup_held_out(cfg)
        self._eval_before_training = cfg.get("eval_before_training", True)
        if cfg.gradient_accumulation_steps != 1:
            raise ValueError("ppo_distributed: gradient_accumulation_steps must be 1; a rollout batch is split into "
                             "ppo_minibatches updates instead")
        self._samples_per_prompt = cfg.get("samples_per_prompt", 1)
        self._max_new_tokens = cfg.max_generated_tokens
        self._missing_eos_score = cfg.get("missing_eos_score", None)
        self._kl_coeff, self._gamma, self._lmbda = cfg.kl_coeff, cfg.get("gamma", 1.0), cfg.get("lmbda", 0.95)
        self._ppo_epochs, self._ppo_minibatches = cfg.get("ppo_epochs", 4), cfg.get("ppo_minibatches", 1)
        if self._ppo_epochs < 1 or self._ppo_minibatches < 1:
            raise ValueError(f"ppo_epochs ({self._ppo_epochs}) and ppo_minibatches ({self._ppo_minibatches}) must be >= 1")
        if cfg.batch_size % self._ppo_minibatches:
            raise ValueError(f"batch_size={cfg.batch_size} prompts do not split into ppo_minibatches={self._ppo_minibatches}")
        self.updates_per_step = self._ppo_epochs * self._ppo_minibatches  # the LR schedule counts every update
        self._stop_tokens = stop_token_ids(self._tokenizer)
        self._chunk_tokens = cfg.get("logprob_chunk_tokens", None) or DEFAULT_CHUNK_TOKENS  # null: the default

        meta_model = self.check_model_inputs(cfg, self._dataset, self._eval_dataset)
        refuse_output_adapter(meta_model)
        # Rollouts are packed like every other batch (each prompt once, then its samples); only responses are scored.
        longest = max(d.longest_sequence for d in (self._dataset, self._eval_dataset) if d is not None)
        self._collate = partial(
            packed_collator(pad_id=self._tokenizer.pad_id, device=self._device, model_max_seq_len=meta_model.max_seq_len,
                            longest=longest + self._max_new_tokens, max_row_tokens=cfg.get("max_row_tokens", None)),
            score_prompts=False,
        )

        checkpoint = self.load_starting_checkpoint(cfg)
        options = self.model_options(cfg)
        self._model = setup_fsdp_model(cfg.model, checkpoint[training.MODEL_KEY],
                                       activation_checkpointing=cfg.enable_activation_checkpointing, **options)
        self._reference_is_base = self.reference_is_policy_base(cfg, self._model)
        self._ref_model = self._model if self._reference_is_base else self.build_reference(cfg, checkpoint)
        del checkpoint[training.MODEL_KEY]
        self._reward_model = build_scalar_head_model(cfg.get("reward_model"), cfg.get("reward_checkpointer"), what="reward",
                                               activation_checkpointing=False, trainable=False, **options)
        self._value_model = build_scalar_head_model(cfg.get("value_model"), cfg.get("value_checkpointer"), what="value",
                                              activation_checkpointing=cfg.enable_activation_checkpointing, **options)
        self._trained = PolicyAndValue(self._model, self._value_model)
        self.setup_data_and_optimizer(cfg, self._trained, partial(collate_prompts, pad_id=self._tokenizer.pad_id),
                                      self._trained.param_groups(cfg.get("value_lr", None)))
        utils.log_rank_zero(
            log,
            f"{len(self._dataset)} prompts, {self._steps_per_epoch} steps per epoch of {cfg.batch_size} prompts x "
            f"{self._samples_per_prompt} samples per process, {self.updates_per_step} updates per step, "
            f"{self.world_size} processes, reference: {'the policy with its adapters off' if self._reference_is_base else 'frozen copy'}",
        )

    def recipe_settings(self) -> dict[str, int]:
        return {"ppo_epochs": self._ppo_epochs, "ppo_minibatches": self._ppo_minibatches,
                "samples_per_prompt": self._samples_per_prompt}

    # ------------------------------------------------------------------ rollout
    def _rollout(self, prompts: list[list[int]], *, samples_per_prompt: int, greedy: bool, minibatches: int,
                 rng: Optional[torch.Generator] = None) -> tuple[list[Rollout], Samples]:
        """Sample responses with the policy (or decode greedily), then score them (no gradients) in
        ``minibatches`` packed batches. Training samples at temperature 1 from the whole distribution: the
        log-probs that the KL penalty and the PPO ratio read are those of the distribution sampled."""
        samples = sample_responses(
            self._model, prompts, samples_per_prompt=samples_per_prompt, max_new_tokens=self._max_new_tokens,
            pad_id=self._tokenizer.pad_id, stop_tokens=self._stop_tokens, device=self._device, dtype=self._dtype,
            temperature=0.0 if greedy else 1.0, stop_early=self.world_size == 1, rng=rng,
        )
        examples = rollout_examples(prompts, samples, samples_per_prompt)
        per_minibatch = len(examples) // minibatches
        rollouts = []
        with torch.no_grad():
            for start in range(0, len(examples), per_minibatch):
                batch = {key: value.to(self._device) for key, value in self._collate(examples[start:start + per_minibatch]).items()}
                layout = ResponseLayout.of(batch)
                with self.as_reference(self._ref_model, adapters_off=self._reference_is_base):
                    ref_logps = response_token_logps(self._ref_model, batch, layout, self._chunk_tokens)
                rollouts.append(Rollout(
                    batch=batch, layout=layout,
                    old_logps=response_token_logps(self._model, batch, layout, self._chunk_tokens),
                    ref_logps=ref_logps,
                    values=response_token_values(self._value_model, batch, layout),
                    scores=head_outputs(self._reward_model, batch, batch["last_positions"]),
                ))
        return rollouts, samples

    @staticmethod
    def _rollout_sums(rollouts: list[Rollout], samples: Samples) -> dict[str, float]:
        """Sums over this process's responses, for metrics that do not depend on how they were split."""
        mask = torch.cat([r.layout.mask.flatten() for r in rollouts]).float()
        kl = torch.cat([((r.old_logps - r.ref_logps) * r.layout.mask).flatten() for r in rollouts])
        return {"responses": float(len(samples.responses)), "score_sum": float(sum(r.scores.sum() for r in rollouts)),
                "kl_sum": float(kl.sum()), "response_tokens": float(mask.sum()), "ended": float(sum(samples.ended)),
                "entropy_sum": float(sum(samples.entropies))}

    @staticmethod
    def _rollout_means(totals: dict[str, float], kl_coeff: float, prefix: str = "") -> dict[str, float]:
        responses = totals["responses"]
        reward, kl = totals["score_sum"] / responses, totals["kl_sum"] / responses
        return {f"{prefix}reward": reward, f"{prefix}kl": kl, f"{prefix}reward_with_kl": reward - kl_coeff * kl,
                f"{prefix}response_length": totals["response_tokens"] / responses,
                f"{prefix}ended": totals["ended"] / responses,
                f"{prefix}entropy": totals["entropy_sum"] / totals["response_tokens"]}

    # ------------------------------------------------------------------ one PPO update
    def _update(self, rollout: Rollout, epoch: int) -> tuple[dict[str, float], Optional[float]]:
        logps = response_token_logps(self._model, rollout.batch, rollout.layout, self._chunk_tokens)
        values = response_token_values(self._value_model, rollout.batch, rollout.layout)
        mask = rollout.layout.mask
        loss, policy_loss, value_loss, _, clip_fraction = self._loss_fn(
            rollout.old_logps, logps, rollout.advantages, rollout.values, values, rollout.returns, mask, mask
        )
        loss.backward()
        log_ratio = logps.detach() - rollout.old_logps
        ratio = rlhf.masked_mean(log_ratio.exp(), mask)  # PPOLoss's own ratio averages over padding too
        approx_kl = rlhf.masked_mean(0.5 * log_ratio**2, mask)
        parts = {"loss": loss.item(), "policy_loss": float(policy_loss), "value_loss": float(value_loss),
                 "ratio": float(ratio), "clip_fraction": float(clip_fraction), "approx_kl": float(approx_kl)}
        reduced = all_reduce_sum(parts, self._device)
        grad_norm = self.update_weights(self._trained, reduced["loss"] / self.world_size, epoch)
        return reduced, grad_norm

    # ------------------------------------------------------------------ held-out evaluation
    def evaluate(self) -> None:
        """Greedy answers to the held-out prompts, each prompt answered by one process once: the reward model's
        mean score (``eval_reward``), the summed log(pi/pi_ref) of the answers (``eval_kl``), their length."""
        rng = torch.Generator(device=self._device).manual_seed(self.seed)  # greedy draws nothing from the global RNG

        def score(batch: dict[str, torch.Tensor], _: int) -> dict[str, float]:
            rollouts, samples = self._rollout(prompt_lists(batch), samples_per_prompt=1, greedy=True, minibatches=1,
                                              rng=rng)
            return self._rollout_sums(rollouts, samples)

        totals = held_out_sums(self._trained, self._eval_dataset, score,
                               collate_fn=partial(collate_prompts, pad_id=self._tokenizer.pad_id),
                               batch_size=self._eval_batch_size, device=self._device, world_size=self.world_size,
                               rank=self.rank)
        metrics = {**self._rollout_means(totals, self._kl_coeff, prefix="eval_"), "eval_prompts": totals["responses"]}
        utils.log_rank_zero(log, f"step {self.global_step} held-out: eval_reward={metrics['eval_reward']:.4g}, "
                                 f"eval_kl={metrics['eval_kl']:.4g}")
        if self._is_rank_zero:
            self._metric_logger.log_dict(metrics, step=self.global_step)

    # ------------------------------------------------------------------ train loop
    def train(self) -> None:
        if self.global_step == 0 and self._eval_before_training:
            self.evaluate_if_due(now=True)  # the SFT policy's held-out reward: the baseline PPO should raise
        self._optimizer.zero_grad()
        for epoch in self.epochs():
            progress = self.progress_bar(epoch)
            for _, batch in self.micro_batches(epoch):
                step_start = time.perf_counter()
                rollouts, samples = self._rollout(prompt_lists(batch), samples_per_prompt=self._samples_per_prompt,
                                                  greedy=False, minibatches=self._ppo_minibatches)
                generation_seconds = time.perf_counter() - step_start
                if self._missing_eos_score is not None:  # a response cut at max_generated_tokens gets a fixed score
                    ended = torch.tensor(samples.ended, device=self._device)
                    for rollout, chunk in zip(rollouts, ended.chunk(len(rollouts))):
                        rollout.scores = torch.where(chunk, rollout.scores, torch.full_like(rollout.scores, self._missing_eos_score))
                add_advantages(rollouts, kl_coeff=self._kl_coeff, gamma=self._gamma, lmbda=self._lmbda)
                totals = all_reduce_sum({**self._rollout_sums(rollouts, samples), "generation_seconds": generation_seconds,
                                         "tokens": float(sum(r.batch["useful_tokens"] for r in rollouts))}, self._device)

                update_sums: dict[str, float] = {}
                for _ in range(self._ppo_epochs):
                    for rollout in rollouts:
                        parts, grad_norm = self._update(rollout, epoch)
                        update_sums = {key: update_sums.get(key, 0.0) + value for key, value in parts.items()}
                updates = self.updates_per_step * self.world_size
                metrics = {**self._rollout_means(totals, self._kl_coeff),
                           **{key: value / updates for key, value in update_sums.items()},
                           "generated_tokens_per_second": totals["response_tokens"] / totals["generation_seconds"],
                           "generation_time": totals["generation_seconds"] / self.world_size}
                self.finish_step(self._trained, loss=metrics["loss"], metrics=metrics, tokens=totals["tokens"],
                                 epoch=epoch, progress=progress, started=step_start, updated=True, grad_norm=grad_norm)
                self.evaluate_if_due()
            progress.close()
            self.evaluate_if_due(now=True)
            self.end_epoch(self._trained, epoch, export=self._model)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_recipe(PPORecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
