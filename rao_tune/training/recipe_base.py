"""What every training recipe of rao_tune does the same way, so the recipe files hold only what is theirs:
checks before anything loads, process group and seed, metric logger, the starting checkpoint, FSDP2 model
set-up, data loader, optimizer and schedule, the guarded optimizer step, per-step system metrics, step
checkpoints with resume, and HF exports at epoch ends."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset
from torchtune import config, training, utils
from torchtune.modules.peft import disable_adapter
from tqdm import tqdm

from rao_tune.data import collate_reward_batch
from rao_tune.training.attention import packed_collator
from rao_tune.training.checkpoint import (
    RUN_SETTINGS,
    STAGING_DIR,
    Progress,
    StepCheckpointer,
    export_hf_checkpoint,
    read_trainer_state,
)
from rao_tune.training.cluster import (DEFAULT_SIGNALS, PreemptionWatch, Preempted, RunLock, clear_preempted,
                                       signal_numbers, write_preempted)
from rao_tune.training.distributed import init_distributed
from rao_tune.training.lora import AdapterExport, lora_settings
from rao_tune.training.loop import build_dataloader, guarded_optimizer_step, setup_optimizer, steps_per_epoch
from rao_tune.training.metrics import METRICS_FILE, MetricsFileLogger, instantiate_metric_logger, memory_stats
from rao_tune.training.model import setup_fsdp_model
from rao_tune.training.optim_in_backward import OptimizerInBackward
from rao_tune.training.preflight import (
    COMMON_KEYS,
    check_checkpoint_matches_model,
    check_config,
    check_output_dir,
    check_token_ids,
    clear_failed_start,
    config_settings,
    finished,
    instantiate_checked,
    is_launch_rank_zero,
    refuse_changed_settings,
    refuse_unallowed_changes,
)

log = logging.getLogger(__name__)


class DistributedRecipe:
    """Base of the training recipes: subclasses write ``setup`` (calling the ``setup_*`` helpers in order) and
    ``train`` (looping over :meth:`epochs` and :meth:`micro_batches`, ending each optimizer step with
    :meth:`finish_step` and each epoch with :meth:`end_epoch`). ``CONFIG_KEYS`` lists the top-level keys the
    recipe reads beyond the common ones; any other key is refused before anything starts."""

    CONFIG_KEYS: ClassVar[frozenset[str]] = frozenset()
    # Optimizer updates per counted step (PPO: several per batch of rollouts); the LR schedule spans them all.
    updates_per_step: int = 1

    def __init__(self, cfg: DictConfig, resume_from: Optional[Path] = None) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self.world_size, self.rank = init_distributed(self._device)
        self._is_rank_zero = self.rank == 0

        seed = cfg.seed
        if seed is None and resume_from is not None:  # the seed drawn at the run's start
            seed = read_trainer_state(resume_from)["seed"]
        self.seed = training.set_seed(seed=seed)
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self._output_dir = Path(cfg.output_dir)
        self._resume_from = resume_from
        self._config_settings = config_settings(cfg)  # recorded in step checkpoints; a resume compares them
        self._allowed_changes = cfg.get("resume_allow_changes", None)
        self._data_fingerprint: Optional[str] = None  # the training data's, once read
        self.progress = Progress()
        self._step_checkpointer = StepCheckpointer(
            self._output_dir, keep_last_n=cfg.get("keep_last_n", None),
            async_save=cfg.get("async_checkpoint", False), rank=self.rank,
        )
        # A scheduler's warning signal (SIGTERM/SIGUSR1) is acted on at the end of the step in progress.
        self._preemption = PreemptionWatch(signal_numbers(cfg.get("save_on_signal", list(DEFAULT_SIGNALS))))
        if self._is_rank_zero:
            clear_preempted(self._output_dir)  # the note of the stop this run resumes from

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    # ------------------------------------------------------------------ set-up helpers, in the order recipes call them
    def setup_logger(self, cfg: DictConfig) -> None:
        """The configured torchtune metric logger, also writing ``output_dir/metrics.jsonl``: our tools
        (compare_runs, benchmarks, the toy study) read that whichever logger the config names."""
        if self._is_rank_zero:
            configured = instantiate_metric_logger(cfg.metric_logger)
            self._metric_logger = MetricsFileLogger(configured, self._output_dir / METRICS_FILE)
            self._metric_logger.log_config(cfg)

    def setup_loss_and_data(self, cfg: DictConfig) -> None:
        """Metric logger, loss, tokenizer and training data, before any model: a misspelt argument, a loss
        parameter out of range or an unreadable data file is found in seconds, not after the weights load."""
        self.setup_logger(cfg)
        self._loss_fn = instantiate_checked(cfg.loss, what="loss")
        self._tokenizer = instantiate_checked(cfg.tokenizer, what="tokenizer")
        self._dataset = instantiate_checked(cfg.dataset, self._tokenizer, what="dataset")
        self.check_resumed_data()

    def check_resumed_data(self) -> None:
        """A resume reads the data it was trained on: its fingerprint (content, tokenization, reward handling)
        must be the step checkpoint's, unless ``resume_allow_changes`` names ``dataset``."""
        saved = read_trainer_state(self._resume_from).get("data_fingerprint") if self._resume_from else None
        current = self._data_fingerprint = getattr(self._dataset, "fingerprint", None)
        if saved is not None and current is not None and saved != current:  # the data, its tokenization or rewards
            refuse_unallowed_changes(self._resume_from, [("dataset", saved, current)], self._allowed_changes)

    def setup_held_out(self, cfg: DictConfig) -> None:
        """Held-out rows (``eval_dataset``, tokenized like the training data, or None) for the recipe's
        ``evaluate``, ``eval_batch_size`` (null: ``batch_size``) per process at a time; see :meth:`evaluate_if_due`."""
        self._eval_dataset = None
        if cfg.get("eval_dataset") is not None:
            self._eval_dataset = instantiate_checked(cfg.eval_dataset, self._tokenizer, what="eval_dataset")
            if getattr(self._eval_dataset, "standardized", False):  # on the training data's scale, not its own
                self._eval_dataset.standardize_like(self._dataset)
        self._eval_every_n_steps = cfg.get("eval_every_n_steps", None)
        self._eval_batch_size = cfg.get("eval_batch_size", None) or cfg.batch_size
        self._evaluated_at: Optional[int] = None  # the step of the last held-out evaluation

    def meta_model(self, cfg: DictConfig) -> nn.Module:
        """The configured model on the meta device: its shapes, for checks, without a byte of weights."""
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            return config.instantiate(cfg.model)

    def check_model_inputs(self, cfg: DictConfig, *datasets: Optional[Dataset]) -> nn.Module:
        """Before the weights load: the checkpoint's ``config.json`` against the configured model and
        ``model_type``, and the data's token ids against the vocabulary. Returns the meta model."""
        model = self.meta_model(cfg)
        check_checkpoint_matches_model(cfg.checkpointer, model)
        for dataset in datasets:
            if dataset is not None and hasattr(dataset, "max_token_id"):
                check_token_ids(dataset.max_token_id, model, dataset.origin)
        return model

    def load_starting_checkpoint(self, cfg: DictConfig) -> dict[str, Any]:
        """The configured starting weights (also when resuming: the step checkpoint is loaded over them, and the
        checkpointer learns the file layout it exports with). Exports are staged in ``output_dir/.staging``."""
        self._checkpointer = config.instantiate(
            cfg.checkpointer, output_dir=str(self._output_dir / STAGING_DIR), should_load_recipe_state=False
        )
        self._checkpointer_cfg = cfg.checkpointer
        return self._checkpointer.load_checkpoint()

    def model_options(self, cfg: DictConfig) -> dict[str, Any]:
        """Keyword arguments of :func:`rao_tune.training.model.setup_fsdp_model` from the config."""
        return dict(
            device=self._device,
            dtype=self._dtype,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            cpu_offload=cfg.get("fsdp_cpu_offload", False),
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
            compile=cfg.get("compile", False),
            adapter_seed=self.seed,
        )

    def reference_is_policy_base(self, cfg: DictConfig, policy: nn.Module) -> bool:
        """Whether the reference is the policy with its adapters off (a LoRA policy and no ``ref_checkpointer``):
        then no second model is built."""
        return lora_settings(policy) is not None and cfg.get("ref_checkpointer") is None

    def build_reference(self, cfg: DictConfig, checkpoint: dict[str, Any]) -> nn.Module:
        """The frozen reference model: ``ref_checkpointer`` if configured, else the policy's starting checkpoint."""
        if cfg.get("ref_checkpointer") is not None:
            checkpoint = config.instantiate(cfg.ref_checkpointer, should_load_recipe_state=False).load_checkpoint()
        return setup_fsdp_model(cfg.model, checkpoint[training.MODEL_KEY], trainable=False, **self.model_options(cfg))

    @staticmethod
    def as_reference(model: nn.Module, adapters_off: bool) -> ContextManager:
        """Where the reference runs: the policy with adapters off (``adapters_off``), else a model of its own."""
        return disable_adapter(model) if adapters_off else nullcontext()

    def batch_collator(
        self, cfg: DictConfig, model: nn.Module, *datasets: Optional[Dataset]
    ) -> Callable[[list], dict[str, torch.Tensor]]:
        """How prompts with their responses become a micro-batch: packed and prefix-shared (``pack_responses``,
        the default: each prompt once, rows of at most ``max_row_tokens``) or one right-padded row per response.
        The row budget is checked against ``datasets`` here, before any step: a batch failing later on one rank
        would leave the others waiting in a collective."""
        if not cfg.get("pack_responses", True):
            return partial(collate_reward_batch, pad_id=self._tokenizer.pad_id)
        return packed_collator(
            pad_id=self._tokenizer.pad_id,
            device=self._device,
            model_max_seq_len=model.max_seq_len,
            longest=max(dataset.longest_sequence for dataset in datasets if dataset is not None),
            max_row_tokens=cfg.get("max_row_tokens", None),
        )

    def setup_data_and_optimizer(
        self, cfg: DictConfig, model: nn.Module, collate_fn: Callable, param_groups: Optional[list[dict]] = None
    ) -> None:
        """Loader over ``self._dataset`` (batches made by ``collate_fn``), steps per epoch, the optimizer and
        schedule of ``model`` (over ``param_groups`` if given), and, when resuming, their state from the step
        checkpoint. ``model`` is everything that trains (e.g. a :class:`rao_tune.training.value.PolicyAndValue`)."""
        self._batch_size = cfg.batch_size
        self._sampler, self._dataloader = build_dataloader(
            self._dataset,
            batch_size=cfg.batch_size,
            world_size=self.world_size,
            rank=self.rank,
            shuffle=cfg.shuffle,
            seed=self.seed,
            collate_fn=collate_fn,
        )
        self._steps_per_epoch = steps_per_epoch(
            len(self._dataloader),
            gradient_accumulation_steps=self._gradient_accumulation_steps,
            max_steps_per_epoch=self.max_steps_per_epoch,
            explain=f"{len(self._dataset)} examples, batch_size={cfg.batch_size}, {self.world_size} processes",
        )
        self._optimizer, self._lr_scheduler = setup_optimizer(
            cfg, model, total_steps=self.total_epochs * self._steps_per_epoch * self.updates_per_step,
            param_groups=param_groups,
        )
        if self._resume_from is not None:
            configured_lrs = list(self._lr_scheduler.base_lrs)
            self.progress, saved = self._step_checkpointer.load(
                self._resume_from, model, self._optimizer, self._lr_scheduler
            )
            refuse_changed_settings(self._resume_from, saved, self.run_settings())
            if list(saved["lr_scheduler"].get("base_lrs", configured_lrs)) != configured_lrs:
                self._apply_learning_rates(configured_lrs)  # a change resume_allow_changes let through
            if saved.get("world_size") != self.world_size and self._is_rank_zero:
                log.warning("Resumed on %d processes a checkpoint written by %s: model and optimizer resharded, the "
                            "same global batch", self.world_size, saved.get("world_size"))
            utils.log_rank_zero(log, f"Resumed from {self._resume_from}: epoch {self.progress.epoch + 1}, "
                                     f"step {self.progress.global_step}")

    def _apply_learning_rates(self, base_lrs: list[float]) -> None:
        """The configured peak learning rates from here on, at the schedule's current point (the step checkpoint
        brought back the old ones)."""
        scheduler = self._lr_scheduler
        scheduler.base_lrs = list(base_lrs)
        factors = [rule(scheduler.last_epoch) for rule in getattr(scheduler, "lr_lambdas", [])]
        if len(factors) != len(base_lrs):
            raise ValueError(f"resume_allow_changes: cannot apply a new learning rate through "
                             f"{type(scheduler).__name__} (a LambdaLR schedule, as torchtune's, is needed)")
        for group, base, factor in zip(self._optimizer.param_groups, base_lrs, factors):
            group["initial_lr"], group["lr"] = base, base * factor
        if self._is_rank_zero:
            log.warning("resume_allow_changes: peak learning rates now %s, %s at this step", base_lrs,
                        [group["lr"] for group in self._optimizer.param_groups])

    def checkpoint_settings(self) -> dict[str, Any]:
        """What a step checkpoint records besides the weights: :meth:`run_settings`, the compared config and the
        data's fingerprint (a resume refuses changes to them)."""
        return {**self.run_settings(), "config_settings": self._config_settings,
                "data_fingerprint": self._data_fingerprint}

    def run_settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        settings = {
            "seed": self.seed, "total_epochs": self.total_epochs, "max_steps_per_epoch": self.max_steps_per_epoch,
            "steps_per_epoch": self._steps_per_epoch, "world_size": self.world_size, "batch_size": self._batch_size,
            "gradient_accumulation_steps": self._gradient_accumulation_steps,
            # its optimizer state is one group per parameter: the other layout cannot be loaded
            "optimizer_in_bwd": isinstance(self._optimizer, OptimizerInBackward),
        }
        assert set(settings) == set(RUN_SETTINGS)
        return {**settings, **self.recipe_settings()}

    def recipe_settings(self) -> dict[str, Any]:
        """A recipe's own settings that a resumed run must keep (e.g. PPO's updates per step, which set the LR
        schedule's length)."""
        return {}

    # ------------------------------------------------------------------ the loop's pieces
    def epochs(self) -> range:
        """The epochs still to run (all of them, or from the resumed one on)."""
        return range(self.progress.epoch, self.total_epochs)

    def micro_batches(self, epoch: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """This epoch's micro-batches on the device, ``(index, batch)``, up to ``steps_per_epoch`` optimizer steps;
        each epoch has its own reproducible shuffle, and a resumed epoch starts after its last saved step."""
        self._sampler.set_epoch(epoch)
        done = self.progress.step_in_epoch * self._gradient_accumulation_steps if epoch == self.progress.epoch else 0
        self._sampler.skip_batches(done)
        for micro_step, batch in enumerate(self._dataloader, start=done):
            if micro_step // self._gradient_accumulation_steps >= self._steps_per_epoch:
                return
            yield micro_step, {key: value.to(self._device) for key, value in batch.items()}

    def closes_step(self, micro_step: int) -> bool:
        """Whether this micro-batch is the last one accumulated into an optimizer step."""
        return (micro_step + 1) % self._gradient_accumulation_steps == 0

    def progress_bar(self, epoch: int) -> tqdm:
        done = self.progress.step_in_epoch if epoch == self.progress.epoch else 0
        return tqdm(total=self._steps_per_epoch, initial=done, disable=not self._is_rank_zero, desc=f"epoch {epoch + 1}")

    def update_weights(self, model: nn.Module, loss: float, epoch: int) -> float | None:
        """Clip, refuse a non-finite update, step optimizer and schedule; returns the gradient norm. ``loss``
        must be reduced over processes. A recipe with several updates per step (PPO) calls it for each."""
        return guarded_optimizer_step(
            model,
            self._optimizer,
            self._lr_scheduler,
            loss=loss,
            clip_grad_norm=self._clip_grad_norm,
            where=f"step {self.global_step + 1} (epoch {epoch + 1})",
        )

    def log_step(self, metrics: dict[str, float], *, tokens: float, elapsed: float, grad_norm: float | None) -> None:
        """Log the recipe's own metrics with lr, throughput, step time, peak memory and gradient norm (rank 0,
        every ``log_every_n_steps``)."""
        if not self._is_rank_zero or self.global_step % self._log_every_n_steps != 0:
            return
        metrics = {
            **metrics,
            **learning_rates(self._optimizer),
            "tokens_per_second": tokens / elapsed,
            "step_time": elapsed,
            **memory_stats(self._device),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        self._metric_logger.log_dict(metrics, step=self.global_step)

    def finish_step(
        self, model: nn.Module, *, loss: float, metrics: dict[str, float], tokens: float, epoch: int, progress: tqdm,
        started: float, updated: bool = False, grad_norm: float | None = None,
    ) -> None:
        """The end of a step: the guarded update (unless the recipe ``updated`` the weights itself, with
        ``grad_norm`` its last gradient norm), metrics (with the step's wall time since ``started``), progress
        bar, and a step checkpoint every ``save_every_n_steps`` (the epoch's last step saves at its end)."""
        if not updated:
            grad_norm = self.update_weights(model, loss, epoch)
        self.progress.global_step += 1
        self.progress.step_in_epoch += 1
        self.log_step(metrics, tokens=tokens, elapsed=time.perf_counter() - started, grad_norm=grad_norm)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4g}")
        every = self._save_every_n_steps
        saved = None
        if every and self.global_step % every == 0 and self.progress.step_in_epoch < self._steps_per_epoch:
            saved = self._step_checkpointer.save(model, self._optimizer, self._lr_scheduler, self.progress,
                                                 self.checkpoint_settings())
        signal_name = self._preemption.requested(self._device)
        if signal_name is not None:
            if saved is None:
                saved = self._step_checkpointer.save(model, self._optimizer, self._lr_scheduler, self.progress,
                                                     self.checkpoint_settings())
            self._step_checkpointer.finish()  # an asynchronous save is committed before the process ends
            if self._is_rank_zero:
                write_preempted(self._output_dir, signal_name, self.global_step, saved)
            raise Preempted(signal_name, self.global_step, saved)

    def evaluate_if_due(self, *, now: bool = False) -> None:
        """The recipe's ``evaluate`` on the held-out rows, if there are any: ``now`` (an epoch's end, before
        training) or every ``eval_every_n_steps`` steps, never twice at one step. Collective."""
        every = self._eval_every_n_steps
        due = now or bool(every and self.global_step % every == 0)
        if self._eval_dataset is None or not due or self._evaluated_at == self.global_step:
            return
        self.evaluate()
        self._evaluated_at = self.global_step

    def end_epoch(self, model: nn.Module, epoch: int, export: Optional[nn.Module] = None) -> None:
        """The HF export ``output_dir/epoch_{epoch}`` of ``export`` (default: ``model``, e.g. the policy of a
        policy and its value model) and a step checkpoint of ``model`` at the epoch's end. Collective."""
        self._step_checkpointer.finish()  # an asynchronous save's collectives end before the export's begin
        self.progress = Progress(epoch=epoch + 1, step_in_epoch=0, global_step=self.global_step)
        export = model if export is None else export
        export_hf_checkpoint(
            self._checkpointer, export, name=f"epoch_{epoch}", staging_epoch=epoch, output_dir=self._output_dir,
            device=self._device, is_rank_zero=self._is_rank_zero,
            adapters=AdapterExport.for_model(export, self._checkpointer_cfg),
        )
        self._step_checkpointer.save(model, self._optimizer, self._lr_scheduler, self.progress, self.checkpoint_settings())

    def cleanup(self, *, failed: bool = False) -> None:
        self._preemption.close()
        self._step_checkpointer.finish(failed=failed)
        if self._is_rank_zero and hasattr(self, "_metric_logger"):
            self._metric_logger.close()
        dist.destroy_process_group()


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr`` of the first parameter group, and ``lr_<name>`` of each further group (e.g. ``lr_value``).
    torchtune's ``get_lr`` refuses groups with different learning rates."""
    groups = optimizer.param_groups
    return {"lr": groups[0]["lr"], **{f"lr_{group.get('name', index)}": group["lr"]
                                      for index, group in enumerate(groups[1:], start=1)}}


def run_recipe(recipe_cls: type, cfg: DictConfig) -> None:
    """Check the config, take the run folder's lock (launch rank 0) and check the folder (before any process
    group, model or data), then construct, set up, train, and always leave the process group. Resuming a finished
    run says so and returns. A fresh start that fails before its first step leaves nothing that makes the folder
    hold a run; a preemption (:class:`Preempted`) saves first, then propagates."""
    check_config(cfg, COMMON_KEYS | recipe_cls.CONFIG_KEYS, recipe_cls.__name__)
    with RunLock(cfg.output_dir) if is_launch_rank_zero() else nullcontext():
        resume_from = check_output_dir(cfg)
        if finished(resume_from, cfg.epochs):
            log.warning("%s already finished its %d epochs (%s): nothing to resume", cfg.output_dir, cfg.epochs,
                        resume_from.name)
            print(f"{cfg.output_dir}: the run already finished its {cfg.epochs} epochs ({resume_from.name}); nothing to do")
            return
        recipe = recipe_cls(cfg=cfg, resume_from=resume_from)
        config.log_config(recipe_name=recipe_cls.__name__, cfg=cfg)
        try:
            recipe.setup(cfg=cfg)
            recipe.train()
        except Preempted:
            recipe.cleanup()
            raise
        except BaseException:
            recipe.cleanup(failed=True)
            if resume_from is None and recipe.global_step == 0 and is_launch_rank_zero():
                clear_failed_start(cfg)
            raise
        recipe.cleanup()
