"""Score every response of a dataset with a reward model or a rule-based reward, and write the reward-annotated
rows (``{"prompt", "responses", "rewards"}``, JSON lines or parquet) that ``recipes/rao_distributed.py`` reads.

    tune run --nproc_per_node 8 recipes/annotate_rewards.py --config configs/llama3_8b_annotate.yaml

Data-parallel: every process holds the whole scorer and scores its own shards of rows; they exchange only
control messages, so the process group is gloo even on GPUs. Resumable: after a crash, run the same command
again (any number of processes); finished shards are kept, and the output keeps the input's row order.
See ``rao_tune.annotate`` for the design and ``rao_tune.rewards`` for the scorers.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils

from rao_tune.annotate import annotate
from rao_tune.training.distributed import init_distributed
from rao_tune.training.errors import run_main

log = utils.get_logger("INFO")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    world_size, rank = init_distributed(torch.device("cpu"))
    config.log_config(recipe_name="annotate_rewards", cfg=cfg)
    try:
        rows = config.instantiate(cfg.dataset)
        scorer = config.instantiate(cfg.scorer)
        utils.log_rank_zero(
            log, f"{len(rows.dataset)} rows ({rows.layout} layout) from {rows.origin}, {world_size} processes"
        )
        summary = annotate(
            rows,
            scorer,
            cfg.output_path,
            rows_per_shard=cfg.get("rows_per_shard", 256),
            batch_size=cfg.get("batch_size", 16),
            keep_columns=list(cfg.get("keep_columns") or []),
            keep_shards=cfg.get("keep_shards", False),
            scorer_identity=OmegaConf.to_container(cfg.scorer, resolve=True),
            world_size=world_size,
            rank=rank,
        )
        truncated = getattr(scorer, "num_truncated", 0)
        if truncated:
            log.warning(f"rank {rank}: {truncated} prompt + response sequences were cut to max_seq_len before scoring")
        utils.log_rank_zero(log, f"annotation done: {summary}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
