"""Bradley-Terry reward model training on torchtune's FSDP2 stack (RAO paper, Eq. 2, section 4.3).

    tune run --nproc_per_node 8 recipes/reward_model_distributed.py --config configs/llama3_8b_reward_model.yaml

Reads top to bottom: ``setup`` builds the reward model (a decoder with a one-output score head, from a base or SFT
checkpoint, head drawn from the seed), tokenizer, the training and held-out data, optimizer and LR schedule;
``train`` is the loop. Each step scores every response of the batch's prompts at its last token (each prompt
once, followed by its responses, in packed prefix-shared rows unless ``pack_responses=False``), builds
preference pairs from the rewards (``loss.pairs``), and minimises -log sigmoid(r_w - r_l). Every epoch ends with
the held-out loss and accuracy (Table 1's two figures) and an HF ``*ForSequenceClassification`` checkpoint.
Runs on CPU (gloo) and CUDA (nccl) from the same code.
"""

from __future__ import annotations

import sys
import time

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

from rao_tune.losses import PairwiseOutput
from rao_tune.models import last_token_scores
from rao_tune.training.attention import model_inputs
from rao_tune.training.distributed import all_reduce_sum
from rao_tune.training.errors import run_main
from rao_tune.training.loop import held_out_sums
from rao_tune.training.model import setup_fsdp_model
from rao_tune.training.preflight import instantiate_checked
from rao_tune.training.recipe_base import DistributedRecipe, run_recipe

log = utils.get_logger("INFO")


def pair_sums(output: PairwiseOutput) -> dict[str, float]:
    """Per-pair sums of one micro-batch, so means over micro-batches and ranks weigh every pair equally."""
    return {
        "pairs": float(output.num_pairs),
        "loss_sum": output.loss.item() * output.num_pairs,
        "correct": output.accuracy * output.num_pairs,
        "margin_sum": output.margin * output.num_pairs,
    }


def pair_means(totals: dict[str, float], prefix: str = "") -> dict[str, float]:
    pairs = max(totals["pairs"], 1.0)
    return {
        f"{prefix}loss": totals["loss_sum"] / pairs,
        f"{prefix}accuracy": totals["correct"] / pairs,
        f"{prefix}margin": totals["margin_sum"] / pairs,
        f"{prefix}pairs": totals["pairs"],
    }


class RewardModelRecipeDistributed(DistributedRecipe):
    CONFIG_KEYS = frozenset({"eval_dataset", "eval_batch_size", "pack_responses", "max_row_tokens"})

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        # Loss, data, tokenizer and checkpoint are checked before any weight loads.
        self.setup_loss_and_data(cfg)
        self._eval_dataset = None
        if cfg.get("eval_dataset") is not None:
            self._eval_dataset = instantiate_checked(cfg.eval_dataset, self._tokenizer, what="eval_dataset")
        self._loss_fn.check_data(self._dataset.rewards_per_prompt())
        self._eval_batch_size = cfg.get("eval_batch_size", cfg.batch_size)
        meta_model = self.check_model_inputs(cfg, self._dataset, self._eval_dataset)
        self._collate = self.batch_collator(cfg, meta_model, self._dataset, self._eval_dataset)

        checkpoint = self.load_starting_checkpoint(cfg)
        self._model = setup_fsdp_model(
            cfg.model,
            checkpoint.pop(training.MODEL_KEY),
            activation_checkpointing=cfg.enable_activation_checkpointing,
            **self.model_options(cfg),
        )
        self.setup_data_and_optimizer(cfg, self._model, self._collate)
        utils.log_rank_zero(
            log,
            f"{len(self._dataset)} training prompts, {len(self._eval_dataset) if self._eval_dataset else 0} held-out, "
            f"{self._steps_per_epoch} steps per epoch, {self.world_size} processes, pairs: {self._loss_fn.pairs}",
        )

    # ------------------------------------------------------------------ one micro-batch
    def _pairwise_step(self, batch: dict[str, torch.Tensor]) -> PairwiseOutput:
        scores = last_token_scores(self._model(batch["tokens"], **model_inputs(batch, self._model)), batch["last_positions"])
        return self._loss_fn(scores, batch["rewards"], batch["prompt_ids"])

    # ------------------------------------------------------------------ held-out loss and accuracy
    def evaluate(self) -> dict[str, float]:
        totals = held_out_sums(
            self._model, self._eval_dataset, lambda batch, _: pair_sums(self._pairwise_step(batch)),
            collate_fn=self._collate, batch_size=self._eval_batch_size, device=self._device,
            world_size=self.world_size, rank=self.rank,
        )
        return pair_means(totals, prefix="eval_")

    # ------------------------------------------------------------------ train loop
    def train(self) -> None:
        self._optimizer.zero_grad()
        for epoch in self.epochs():
            progress = self.progress_bar(epoch)
            step_sums: dict[str, float] = {}
            step_start = time.perf_counter()
            for micro_step, batch in self.micro_batches(epoch):
                output = self._pairwise_step(batch)
                (output.loss / self._gradient_accumulation_steps).backward()
                sums = {**pair_sums(output), "tokens": float(batch["useful_tokens"])}
                step_sums = {key: step_sums.get(key, 0.0) + value for key, value in sums.items()}
                if not self.closes_step(micro_step):
                    continue

                totals = all_reduce_sum(step_sums, self._device)
                means = pair_means(totals)
                self.finish_step(self._model, loss=means["loss"], metrics=means, tokens=totals["tokens"], epoch=epoch,
                                 progress=progress, started=step_start)
                step_sums, step_start = {}, time.perf_counter()
            progress.close()

            if self._eval_dataset is not None:
                eval_metrics = self.evaluate()
                utils.log_rank_zero(log, f"epoch {epoch + 1} held-out: " + ", ".join(
                    f"{key}={value:.4f}" for key, value in eval_metrics.items()
                ))
                if self._is_rank_zero:
                    self._metric_logger.log_dict(eval_metrics, step=self.global_step)
            self.end_epoch(self._model, epoch)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_recipe(RewardModelRecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
