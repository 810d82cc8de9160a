"""Downstream evaluation with lm-eval of one or more checkpoints our recipes wrote (the paper's Table 3).

    tune run --nproc_per_node 1 recipes/evaluate.py --config configs/llama3_8b_eval.yaml

For each entry of ``checkpoints`` (a name and an HF checkpoint folder), the model is loaded through the configured
``model`` / ``tokenizer`` / ``checkpointer``, wrapped as an lm-eval model (:class:`rao_tune.eval.TorchtuneLM`) and
evaluated on ``tasks`` (default: the paper's six). lm-eval's results go to ``output_dir/<name>/results.json``; a
Markdown table with one row per checkpoint is printed and written to ``output_dir/results.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils

from rao_tune.eval.generation import load_for_inference
from rao_tune.eval.lm_eval_model import TorchtuneLM
from rao_tune.eval.report import results_table
from rao_tune.files import write_atomically

log = utils.get_logger("INFO")


def checkpoint_files(checkpoint_dir: Path) -> list[str]:
    """The weight files of an HF folder: those its index names, else every ``*.safetensors``."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = sorted(path.name for path in checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: no *.safetensors weights (an HF-format checkpoint folder?)")
    return files


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="evaluate", cfg=cfg)
    output_dir = Path(cfg.output_dir)
    # A local task folder loads in ~0 s; indexing lm-eval's ~14,700 built-in tasks takes ~8 s.
    task_manager = TaskManager(
        include_path=cfg.get("include_path"), include_defaults=cfg.get("include_defaults", True)
    )
    all_results: dict[str, dict] = {}
    for entry in cfg.checkpoints:
        checkpoint_dir = Path(entry.checkpoint_dir)
        checkpointer = OmegaConf.merge(
            cfg.checkpointer,
            {"checkpoint_dir": str(checkpoint_dir), "checkpoint_files": checkpoint_files(checkpoint_dir),
             "output_dir": str(output_dir / entry.name / "unused")},
        )
        model, tokenizer, device, dtype = load_for_inference(
            cfg.model, checkpointer, cfg.tokenizer, device=cfg.device, dtype=cfg.dtype
        )
        lm = TorchtuneLM(
            model, tokenizer, device=device, dtype=dtype, batch_size=cfg.batch_size,
            max_seq_len=cfg.get("max_seq_len"), max_new_tokens=cfg.get("max_new_tokens", 256),
            chat_format=cfg.get("chat_format", False),
        )
        log.info(f"evaluating {entry.name} ({checkpoint_dir}) on {list(cfg.tasks)}")
        results = simple_evaluate(
            model=lm,
            tasks=list(cfg.tasks),
            num_fewshot=cfg.get("num_fewshot"),
            limit=cfg.get("limit"),
            task_manager=task_manager,
            log_samples=False,
            random_seed=cfg.get("seed", 0),
            numpy_random_seed=cfg.get("seed", 0),
            torch_random_seed=cfg.get("seed", 0),
            fewshot_random_seed=cfg.get("seed", 0),
        )
        write_atomically(output_dir / entry.name / "results.json", json.dumps(results, indent=2, default=str))
        all_results[entry.name] = results["results"]
        del model, lm

    table = results_table(all_results, list(cfg.tasks))
    write_atomically(output_dir / "results.md", table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(recipe_main())
