"""Full-parameter preference alignment with RAO (or any rao_tune loss) on torchtune's FSDP2 stack.

    tune run --nproc_per_node 8 recipes/rao_distributed.py --config configs/llama3_8b_rao.yaml loss.beta=0.1 loss.z0=50

Reads top to bottom: ``setup`` builds the policy, tokenizer, reward-annotated data, the reference (only if the
loss needs one: by default its log-probs are computed once, before training, and the reference model is then
freed), optimizer and LR schedule from the config; ``train`` is the loop. Each step runs one forward pass of the
policy over the batch's prompts, each followed once by all of its responses (packed, prefix-shared rows), reduces
it to per-sequence log-probs of each response and of its prompt after t0 without materialising logits, and hands
them to the loss module, whatever loss it is. Runs on CPU (gloo) and CUDA (nccl) from the same code.
"""

from __future__ import annotations

import sys
import time
from typing import Any, ContextManager, Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config, training, utils

from rao_tune.losses import LossOutput, ResponseLogProbs
from rao_tune.training.distributed import all_reduce_sum
from rao_tune.training.errors import run_main
from rao_tune.training.loop import free_memory, held_out_sums
from rao_tune.training.logprobs import DEFAULT_CHUNK_TOKENS, refuse_output_adapter, sequence_logps
from rao_tune.training.metrics import add_statistics, finalize_preference_metrics, preference_statistics
from rao_tune.training.model import setup_fsdp_model
from rao_tune.training.preflight import check_checkpoint_matches_model
from rao_tune.training.recipe_base import DistributedRecipe, run_recipe
from rao_tune.training.reference import (
    ReferenceLogProbs,
    WithReferenceLogProbs,
    compute_reference_logps,
    load_or_compute_reference_logps,
    reference_fingerprint,
)
from rao_tune.training.value import PolicyAndValue, build_scalar_head_model, prompt_values

log = utils.get_logger("INFO")


class RAORecipeDistributed(DistributedRecipe):
    CONFIG_KEYS = frozenset({
        "ref_checkpointer", "monitor_with_reference", "reference_logps", "reference_logps_dir",
        "reference_batch_size", "pack_responses", "max_row_tokens", "logprob_chunk_tokens",
        "eval_dataset", "eval_every_n_steps", "eval_batch_size", "value_model", "value_checkpointer", "value_lr",
    })

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        # Everything that can be wrong with the loss, data, tokenizer or checkpoint is found before weights load.
        self.setup_loss_and_data(cfg)
        self.setup_held_out(cfg)  # scored every eval_every_n_steps and at each epoch end
        self._loss_fn.check_data(self._dataset.rewards_per_prompt())
        for name, value in self._loss_fn.calibrate(self._dataset.all_rewards()).items():
            utils.log_rank_zero(log, f"loss calibrated on the training rewards: {name} = {value:.6g}")
            if self._is_rank_zero:
                self._metric_logger.log(f"calibrated/{name}", value, step=0)
        needs_reference = self._loss_fn.needs_reference or cfg.get("monitor_with_reference", False)
        reference_mode = cfg.get("reference_logps", "precomputed")
        if needs_reference and reference_mode not in ("precomputed", "online"):
            raise ValueError(f"reference_logps must be 'precomputed' or 'online', got {reference_mode!r}")
        meta_model = self.check_model_inputs(cfg, self._dataset, self._eval_dataset)
        if needs_reference and cfg.get("ref_checkpointer") is not None:
            check_checkpoint_matches_model(cfg.ref_checkpointer, meta_model)
        self._collate = self.batch_collator(cfg, meta_model, self._dataset, self._eval_dataset)
        self._chunk_tokens = cfg.get("logprob_chunk_tokens", None) or DEFAULT_CHUNK_TOKENS  # null: the default

        refuse_output_adapter(meta_model)  # before any weight loads
        checkpoint = self.load_starting_checkpoint(cfg)
        self._model_options = self.model_options(cfg)
        self._model = setup_fsdp_model(
            cfg.model,
            checkpoint[training.MODEL_KEY],
            activation_checkpointing=cfg.enable_activation_checkpointing,
            **self._model_options,
        )
        # The reference: none for a reference-free loss (unless asked to log true log-ratios), else its
        # log-probs computed once before training (default) or a second model run at every step. With LoRA
        # (and no ref_checkpointer) the reference is the policy with its adapters off: no second model.
        self._ref_model = None
        self._reference_is_base = self.reference_is_policy_base(cfg, self._model)
        reference = "none (reference-free loss: logratio_* metrics are log pi, not log pi/pi_ref)"
        if needs_reference:
            if reference_mode == "precomputed":
                reference_model = self._model if self._reference_is_base else None  # built on first need
                for name in ("_dataset", "_eval_dataset"):
                    dataset = getattr(self, name)
                    if dataset is not None:
                        table, reference_model = self._precomputed_reference(cfg, checkpoint, dataset, reference_model)
                        setattr(self, name, WithReferenceLogProbs(dataset, table))
                del reference_model  # a reference model of its own goes before training starts
                free_memory()
            else:
                self._ref_model = self._model if self._reference_is_base else self.build_reference(cfg, checkpoint)
            reference = f"{reference_mode}{'' if self._loss_fn.needs_reference else ', for metrics only'}"
            reference += ", the policy with its adapters off" if self._reference_is_base else ""
        del checkpoint[training.MODEL_KEY]

        # A loss with a learned normaliser (DRO's V(x)) trains a value model with the policy: one optimizer (the
        # value model at value_lr), one gradient clip, one step checkpoint; only the policy is exported.
        self._value_model, self._trained, param_groups = None, self._model, None
        if self._loss_fn.needs_value_model:
            self._value_model = build_scalar_head_model(
                cfg.get("value_model"), cfg.get("value_checkpointer"), what="value",
                activation_checkpointing=cfg.enable_activation_checkpointing, **self._model_options)
            self._trained = PolicyAndValue(self._model, self._value_model)
            param_groups = self._trained.param_groups(cfg.get("value_lr", None))
        elif cfg.get("value_model") is not None:
            raise ValueError(f"value_model is set but {type(self._loss_fn).__name__} learns no value network: "
                             "remove value_model (or use a loss such as rao_tune.losses.DROLoss)")
        self.setup_data_and_optimizer(cfg, self._trained, self._collate, param_groups)
        utils.log_rank_zero(
            log,
            f"{len(self._dataset)} prompts, {self._steps_per_epoch} steps per epoch, {self.world_size} processes, "
            f"{'packed' if cfg.get('pack_responses', True) else 'padded'} batches, reference: {reference}",
        )

    def _as_reference(self, model: nn.Module) -> ContextManager:
        return self.as_reference(model, adapters_off=self._reference_is_base)

    def _precomputed_reference(
        self, cfg: DictConfig, checkpoint: dict[str, Any], dataset: Any, model: Optional[nn.Module]
    ) -> tuple[ReferenceLogProbs, Optional[nn.Module]]:
        """Every example's reference log-probs, read from ``reference_logps_dir`` when this reference, model,
        dtype and tokenized data were seen before, else computed now with ``model`` (built if None). Returns the
        table and the reference model, if one was needed, for the next dataset (training, then held-out rows)."""
        reference_checkpointer = cfg.get("ref_checkpointer") or cfg.checkpointer
        built = [model]

        def compute() -> ReferenceLogProbs:
            if built[0] is None:
                built[0] = self.build_reference(cfg, checkpoint)
            with self._as_reference(built[0]):
                return compute_reference_logps(
                    built[0],
                    dataset,
                    collate_fn=self._collate,
                    batch_size=cfg.get("reference_batch_size", cfg.batch_size),
                    device=self._device,
                    world_size=self.world_size,
                    rank=self.rank,
                    chunk_tokens=self._chunk_tokens,
                )

        table = load_or_compute_reference_logps(
            cfg.get("reference_logps_dir", None) or f"{cfg.output_dir}/reference_logps",
            lambda: reference_fingerprint(reference_checkpointer, cfg.model, self._dtype, dataset.fingerprint),
            compute,
            rank=self.rank,
        )
        return table, built[0]

    # ------------------------------------------------------------------ one micro-batch
    def _loss_step(self, batch: dict[str, torch.Tensor]) -> tuple[LossOutput, ResponseLogProbs]:
        policy_logps, policy_prompt_logps = sequence_logps(self._model, batch, chunk_tokens=self._chunk_tokens)
        reference_logps = batch.get("reference_logps")
        reference_prompt_logps = batch.get("reference_prompt_logps")
        if self._ref_model is not None:
            with torch.no_grad(), self._as_reference(self._ref_model):
                reference_logps, reference_prompt_logps = sequence_logps(
                    self._ref_model, batch, chunk_tokens=self._chunk_tokens
                )
        logps = ResponseLogProbs(
            policy_logps=policy_logps,
            policy_prompt_logps=policy_prompt_logps,
            reference_logps=reference_logps,
            reference_prompt_logps=reference_prompt_logps,
            rewards=batch["rewards"],
            prompt_ids=batch["prompt_ids"],
            response_lengths=batch["response_lengths"],
            values=None if self._value_model is None else prompt_values(self._value_model, batch),
        )
        return self._loss_fn(logps), logps

    def _statistics(self, output: LossOutput, logps: ResponseLogProbs) -> dict[str, float]:
        """One micro-batch's sums for the preference metrics (log-ratios against the reference when there is one)."""
        log_ratios, prompt_log_ratios = logps.policy_logps.detach(), None
        if logps.reference_logps is not None:
            log_ratios = log_ratios - logps.reference_logps
            prompt_log_ratios = logps.policy_prompt_logps.detach() - logps.reference_prompt_logps
        return preference_statistics(
            output.implicit_rewards, log_ratios, logps.rewards, logps.prompt_ids,
            response_lengths=logps.response_lengths, prompt_log_ratios=prompt_log_ratios,
        )

    # ------------------------------------------------------------------ held-out evaluation
    def evaluate(self) -> None:
        """The training metrics on the held-out rows, each prompt scored by one process once; logged as ``eval_*``.
        ``eval_loss`` is the mean of the micro-batches' losses weighted by their prompts; the other metrics come
        from sums over all held-out responses, so they do not depend on how the rows were split."""

        def score(batch: dict[str, torch.Tensor], num_prompts: int) -> dict[str, float]:
            output, logps = self._loss_step(batch)
            return {"loss_sum": output.loss.item() * num_prompts, "prompts": float(num_prompts),
                    **self._statistics(output, logps)}

        totals = held_out_sums(self._trained, self._eval_dataset, score, collate_fn=self._collate,
                               batch_size=self._eval_batch_size, device=self._device, world_size=self.world_size,
                               rank=self.rank)
        metrics = {"loss": totals["loss_sum"] / totals["prompts"], "prompts": totals["prompts"],
                   **finalize_preference_metrics(totals)}
        metrics = {f"eval_{name}": value for name, value in metrics.items()}
        utils.log_rank_zero(log, f"step {self.global_step} held-out: " + ", ".join(
            f"{name}={metrics[name]:.4g}" for name in ("eval_loss", "eval_implicit_accuracy", "eval_reward_correlation")
            if name in metrics))
        if self._is_rank_zero:
            self._metric_logger.log_dict(metrics, step=self.global_step)

    # ------------------------------------------------------------------ train loop
    def train(self) -> None:
        self._optimizer.zero_grad()
        for epoch in self.epochs():
            progress = self.progress_bar(epoch)
            step_sums: dict[str, float] = {}
            step_start = time.perf_counter()
            for micro_step, batch in self.micro_batches(epoch):
                output, logps = self._loss_step(batch)
                (output.loss / self._gradient_accumulation_steps).backward()
                step_sums = add_statistics(
                    step_sums,
                    {"loss": output.loss.item(), "tokens": float(batch["useful_tokens"]),
                     **self._statistics(output, logps)},
                )
                if not self.closes_step(micro_step):
                    continue

                totals = all_reduce_sum(step_sums, self._device)
                loss = totals["loss"] / (self._gradient_accumulation_steps * self.world_size)
                metrics = {"loss": loss, **finalize_preference_metrics(totals)}
                self.finish_step(self._trained, loss=loss, metrics=metrics, tokens=totals["tokens"], epoch=epoch,
                                 progress=progress, started=step_start)
                self.evaluate_if_due()
                step_sums, step_start = {}, time.perf_counter()
            progress.close()
            self.evaluate_if_due(now=True)
            self.end_epoch(self._trained, epoch, export=self._model)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_recipe(RAORecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
