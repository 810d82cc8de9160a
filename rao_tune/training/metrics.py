"""Comparable training metrics for any preference loss, kept as sums so they add up over
micro-batches and ranks before being turned into means."""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchtune import config
from torchtune.training.metric_logging import MetricLoggerInterface

log = logging.getLogger(__name__)

# Every training run's metrics, one JSON object per logged step, whatever metric logger its config names.
METRICS_FILE = "metrics.jsonl"


def preference_statistics(
    implicit_rewards: Tensor,
    log_ratios: Tensor,
    rewards: Tensor,
    prompt_ids: Tensor,
    *,
    response_lengths: Tensor,
    prompt_log_ratios: Optional[Tensor] = None,
) -> dict[str, float]:
    """Sums over one micro-batch; see :func:`finalize_preference_metrics` for what they become.

    ``log_ratios`` are each response's ``log pi/pi_ref (y|x)`` (``log pi`` for a reference-free run without a
    reference); ``prompt_log_ratios`` each response's prompt ``log pi/pi_ref (x - t0 | t0)``, the normaliser
    RAO takes from prefix consistency (None without a reference). Best / worst are each prompt's highest- and
    lowest-reward responses, over prompts whose rewards differ.
    """
    implicit, target, ratio = implicit_rewards.double(), rewards.double(), log_ratios.double()
    lengths = response_lengths.double()
    stats = {
        "n_responses": float(target.numel()),
        "sum_implicit": implicit.sum().item(),
        "sum_target": target.sum().item(),
        "sum_implicit_sq": (implicit**2).sum().item(),
        "sum_target_sq": (target**2).sum().item(),
        "sum_implicit_target": (implicit * target).sum().item(),
        "sum_length": lengths.sum().item(),
        "n_ranked_prompts": 0.0,
        "sum_logratio_best": 0.0,
        "sum_logratio_worst": 0.0,
        "sum_implicit_best": 0.0,
        "sum_implicit_worst": 0.0,
        "sum_length_best": 0.0,
        "sum_length_worst": 0.0,
        "n_ordered_correctly": 0.0,
    }
    if prompt_log_ratios is not None:
        prompt_ratio = prompt_log_ratios.double()
        # -log pi/pi_ref summed over the training responses: an unbiased estimate of KL(pi_ref || pi) when they were
        # sampled from the reference (the toy; the paper's on-policy data), a drift monitor otherwise.
        stats["sum_kl_estimate"] = (-ratio).sum().item()
        stats["sum_kl_estimate_per_token"] = (-ratio / lengths.clamp(min=1)).sum().item()
        stats["n_prompts"] = 0.0
        stats["sum_prompt_logratio"] = 0.0
        stats["sum_prompt_logratio_ranked"] = 0.0
    for prompt_id in torch.unique(prompt_ids):
        members = (prompt_ids == prompt_id).nonzero().squeeze(-1)
        if prompt_log_ratios is not None:
            stats["n_prompts"] += 1
            stats["sum_prompt_logratio"] += prompt_ratio[members[0]].item()
        prompt_rewards = target[members]
        if prompt_rewards.max() == prompt_rewards.min():
            continue
        best, worst = members[prompt_rewards.argmax()], members[prompt_rewards.argmin()]
        stats["n_ranked_prompts"] += 1
        stats["sum_logratio_best"] += ratio[best].item()
        stats["sum_logratio_worst"] += ratio[worst].item()
        stats["sum_implicit_best"] += implicit[best].item()
        stats["sum_implicit_worst"] += implicit[worst].item()
        stats["sum_length_best"] += lengths[best].item()
        stats["sum_length_worst"] += lengths[worst].item()
        stats["n_ordered_correctly"] += float(implicit[best] > implicit[worst])
        if prompt_log_ratios is not None:
            stats["sum_prompt_logratio_ranked"] += prompt_ratio[best].item()
    return stats


def add_statistics(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    return {key: total.get(key, 0.0) + value for key, value in part.items()}


def finalize_preference_metrics(stats: dict[str, float]) -> dict[str, float]:
    """Means, the Pearson correlation of implicit and target rewards, response lengths (tokens), the best /
    worst monitors and, with a reference, the normaliser: ``prompt_logratio`` (mean over prompts of
    ``log pi/pi_ref (x - t0 | t0)``), ``joint_logratio_best/worst`` (prompt + response log-ratio of each prompt's
    best / worst response) and ``kl_estimate`` (mean ``-log pi/pi_ref (y|x)`` over responses; per token too)."""
    n = stats["n_responses"]
    metrics = {
        "implicit_reward": stats["sum_implicit"] / n,
        "target_reward": stats["sum_target"] / n,
    }
    cov = stats["sum_implicit_target"] / n - metrics["implicit_reward"] * metrics["target_reward"]
    var_implicit = stats["sum_implicit_sq"] / n - metrics["implicit_reward"] ** 2
    var_target = stats["sum_target_sq"] / n - metrics["target_reward"] ** 2
    if var_implicit > 1e-12 and var_target > 1e-12:
        metrics["reward_correlation"] = cov / math.sqrt(var_implicit * var_target)
    metrics["response_length"] = stats["sum_length"] / n
    if "sum_kl_estimate" in stats:
        metrics["kl_estimate"] = stats["sum_kl_estimate"] / n
        metrics["kl_estimate_per_token"] = stats["sum_kl_estimate_per_token"] / n
        metrics["prompt_logratio"] = stats["sum_prompt_logratio"] / stats["n_prompts"]
    ranked = stats["n_ranked_prompts"]
    if ranked:
        metrics["logratio_best"] = stats["sum_logratio_best"] / ranked
        metrics["logratio_worst"] = stats["sum_logratio_worst"] / ranked
        metrics["implicit_reward_best"] = stats["sum_implicit_best"] / ranked
        metrics["implicit_reward_worst"] = stats["sum_implicit_worst"] / ranked
        metrics["implicit_accuracy"] = stats["n_ordered_correctly"] / ranked
        metrics["response_length_best"] = stats["sum_length_best"] / ranked
        metrics["response_length_worst"] = stats["sum_length_worst"] / ranked
        if "sum_kl_estimate" in stats:
            # The whole sequence after t0, prompt + response: the log-ratio RAO's normalised target constrains.
            prompt_ranked = stats["sum_prompt_logratio_ranked"] / ranked
            metrics["joint_logratio_best"] = prompt_ranked + metrics["logratio_best"]
            metrics["joint_logratio_worst"] = prompt_ranked + metrics["logratio_worst"]
    return metrics


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: the accelerator's allocator on CUDA, the process's peak RSS on CPU
    (torchtune's get_memory_stats raises on CPU)."""
    if device.type == "cuda":
        return {
            "peak_memory_active": torch.cuda.memory_stats(device).get("active_bytes.all.peak", 0) / 2**30,
            "peak_memory_alloc": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_memory_reserved": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    return {"peak_rss": peak_rss / (2**30 if sys.platform == "darwin" else 2**20)}


class MetricsFile:
    """Appends ``{"step": N, "<metric>": value, ...}`` lines to ``path``, each flushed as written: a killed run
    keeps every step it logged, and a resumed run continues the same file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as previous:
                previous.seek(-1, 2)
                torn = previous.read(1) != b"\n"
        self._file = self.path.open("a", encoding="utf-8")
        if torn:  # a killed run's half-written last line: the next line starts on its own
            self._file.write("\n")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        line = {"step": int(step), **{name: _plain_float(value) for name, value in metrics.items()}}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _plain_float(value: Any) -> float:
    """A logged scalar (tensor, NumPy scalar, int, float) as a float JSON can hold."""
    return float(value.item() if hasattr(value, "item") else value)


DISK_LOGGER = "torchtune.training.metric_logging.DiskLogger"


def disk_log_name(log_dir: str | Path) -> str:
    """``log_<unix time>.txt`` as torchtune's ``DiskLogger`` names it, with ``_1``, ``_2``... added when a
    start in the same second already wrote that file: torchtune's name has one-second resolution and appends,
    so two starts within a second (an overwrite, a requeued job, two runs sharing a log folder) would otherwise
    share one file."""
    stem = f"log_{int(time.time())}"
    name, copies = f"{stem}.txt", 0
    while (Path(log_dir) / name).exists():
        copies += 1
        name = f"{stem}_{copies}.txt"
    return name


def instantiate_metric_logger(logger_cfg: DictConfig) -> MetricLoggerInterface:
    """The configured metric logger; a ``DiskLogger`` without a ``filename`` gets :func:`disk_log_name`, so
    every start of a run writes its own file."""
    if logger_cfg.get("_component_") == DISK_LOGGER and not logger_cfg.get("filename"):
        logger_cfg = OmegaConf.merge(logger_cfg, {"filename": disk_log_name(logger_cfg.log_dir)})
    return config.instantiate(logger_cfg)


class MetricsFileLogger(MetricLoggerInterface):
    """The configured torchtune metric logger (disk, TensorBoard, W&B, ...), plus :class:`MetricsFile`: every
    call reaches the configured logger unchanged, so our tools read any run's metrics the same way."""

    def __init__(self, logger: MetricLoggerInterface, path: str | Path) -> None:
        self.logger = logger
        self._file = MetricsFile(path)

    def log(self, name: str, data: Any, step: int) -> None:
        self.logger.log(name, data, step)
        self._file.write(step, {name: data})

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        self.logger.log_dict(payload, step)
        self._file.write(step, payload)

    def log_config(self, config: DictConfig) -> None:
        self.logger.log_config(config)

    def close(self) -> None:
        try:
            self.logger.close()
        finally:
            self._file.close()


def read_metrics(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` of the run in ``run_dir``: from its ``metrics.jsonl``, or, for a run without
    one (a torchtune recipe's, or one from before the file), from the DiskLogger files in ``run_dir/logs``.

    Lines of the same step merge, and a metric logged twice for a step (a resumed run logs again the steps after
    its last checkpoint) keeps its latest value, as in :func:`read_disk_log`.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.exists():
        try:
            return read_disk_log(run_dir / "logs")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no metrics in run folder {run_dir}: neither {METRICS_FILE} (written by rao_tune's training "
                "recipes) nor torchtune DiskLogger files (logs/log_*.txt)"
            ) from None
    steps: dict[int, dict[str, float]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            metrics = json.loads(line)
        except json.JSONDecodeError:  # only a killed run's torn last write: that step is logged again on resume
            log.warning("%s:%d: skipped a line that is not JSON (a torn write)", path, number)
            continue
        steps.setdefault(int(metrics.pop("step")), {}).update(metrics)
    return steps


def read_disk_log(log_dir: str | Path) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` from the files torchtune's ``DiskLogger`` wrote into ``log_dir``.

    Lines of the same step (e.g. training metrics, then held-out ones) merge. A resumed run writes a new
    ``log_<unix time>[_<n>].txt`` (:func:`disk_log_name`); files are read oldest first, so a metric logged
    twice keeps its latest value.
    """
    def start_order(path: Path) -> tuple[int, int]:
        _, started, *copy = path.stem.split("_")
        return int(started), int(copy[0]) if copy else 0

    log_files = sorted(Path(log_dir).glob("log_*.txt"), key=start_order)
    if not log_files:
        raise FileNotFoundError(f"no DiskLogger file (log_*.txt) in {log_dir}")
    steps: dict[int, dict[str, float]] = {}
    for log_file in log_files:
        for line in log_file.read_text().splitlines():
            step, _, rest = line.partition(" | ")
            metrics = {key: float(value) for key, value in re.findall(r"(\S+):(\S+)", rest)}
            steps.setdefault(int(step.split()[1]), {}).update(metrics)
    return steps
