"""Supervised fine-tuning (the pipeline's first stage: base model -> SFT model on UltraChat-200k) on the same
FSDP2 stack as the RAO and reward-model recipes, and on CPU as well as CUDA.

    tune run --nproc_per_node 8 recipes/sft_distributed.py --config configs/llama3_8b_sft.yaml

torchtune's own ``full_finetune_distributed`` serves too on GPU; this recipe exists so the whole pipeline runs
from one stack (and in CPU tests): ``setup`` builds the model, tokenizer, a torchtune SFT dataset (e.g.
``torchtune.datasets.chat_dataset`` in the model's chat format) and the chunked cross-entropy; ``train`` is the
loop. Each micro-batch's loss is the mean over its trained (unmasked) tokens.
"""

from __future__ import annotations

import sys
import time
from functools import partial

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft

from rao_tune.training.distributed import all_reduce_sum
from rao_tune.training.errors import run_main
from rao_tune.training.model import setup_fsdp_model
from rao_tune.training.recipe_base import DistributedRecipe, run_recipe

log = utils.get_logger("INFO")


class SFTRecipeDistributed(DistributedRecipe):
    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        # Loss, tokenizer, data and the checkpoint's config are checked before any weight loads.
        self.setup_loss_and_data(cfg)  # the loss: e.g. torchtune's CEWithChunkedOutputLoss
        self.check_model_inputs(cfg)

        checkpoint = self.load_starting_checkpoint(cfg)
        self._model = setup_fsdp_model(
            cfg.model,
            checkpoint.pop(training.MODEL_KEY),
            activation_checkpointing=cfg.enable_activation_checkpointing,
            **self.model_options(cfg),
        )
        # The loss takes the logits in chunks, so no full-vocabulary fp32 logits of the batch exist at once.
        self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
        collate = partial(padded_collate_sft, padding_idx=self._tokenizer.pad_id, ignore_idx=CROSS_ENTROPY_IGNORE_IDX)
        self.setup_data_and_optimizer(cfg, self._model, collate)
        utils.log_rank_zero(
            log, f"{len(self._dataset)} conversations, {self._steps_per_epoch} steps per epoch, {self.world_size} processes"
        )

    # ------------------------------------------------------------------ train loop
    def train(self) -> None:
        self._optimizer.zero_grad()
        for epoch in self.epochs():
            progress = self.progress_bar(epoch)
            step_sums: dict[str, float] = {}
            step_start = time.perf_counter()
            for micro_step, batch in self.micro_batches(epoch):
                # Position i predicts token i + 1: shift the labels left, nothing to predict after the end.
                labels = torch.cat(
                    [batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], CROSS_ENTROPY_IGNORE_IDX)], dim=1
                )
                loss = self._loss_fn(self._model(batch["tokens"]), labels)
                (loss / self._gradient_accumulation_steps).backward()
                trained_tokens = float((labels != CROSS_ENTROPY_IGNORE_IDX).sum())
                sums = {"loss": loss.item(), "trained_tokens": trained_tokens, "tokens": float(batch["tokens"].numel())}
                step_sums = {key: step_sums.get(key, 0.0) + value for key, value in sums.items()}
                if not self.closes_step(micro_step):
                    continue

                totals = all_reduce_sum(step_sums, self._device)
                mean_loss = totals["loss"] / (self._gradient_accumulation_steps * self.world_size)
                metrics = {"loss": mean_loss, "trained_tokens": totals["trained_tokens"]}
                self.finish_step(self._model, loss=mean_loss, metrics=metrics, tokens=totals["tokens"], epoch=epoch,
                                 progress=progress, started=step_start)
                step_sums, step_start = {}, time.perf_counter()
            progress.close()
            self.end_epoch(self._model, epoch)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_recipe(SFTRecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
