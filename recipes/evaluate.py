"""Downstream evaluation with lm-eval of one or more checkpoints our recipes wrote (the paper's Table 3).

    tune run --nproc_per_node 1 recipes/evaluate.py --config configs/llama3_8b_eval.yaml

For each entry of ``checkpoints`` (a name and an HF checkpoint folder, optionally its ``checkpoint_files``, else
those found in the folder), the model is loaded through the configured ``model`` / ``tokenizer`` / ``checkpointer``,
wrapped as an lm-eval model (:class:`rao_tune.eval.TorchtuneLM`) and evaluated on ``tasks`` (default: the paper's
six). lm-eval's own tracker writes the results as ``lm_eval --output_path output_dir`` does for a model named
``<name>``: ``output_dir/<name>/results_<date>.json`` and, with ``log_samples: True``, every document's prompt,
responses and metrics in ``output_dir/<name>/samples_<task>_<date>.jsonl``. A Markdown table with one row per
checkpoint is printed and written to ``output_dir/results.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.loggers import EvaluationTracker
from lm_eval.tasks import TaskManager
from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils

from rao_tune.eval.generation import load_for_inference
from rao_tune.eval.lm_eval_model import TorchtuneLM
from rao_tune.eval.report import results_table
from rao_tune.files import write_atomically
from rao_tune.training.errors import run_main

log = utils.get_logger("INFO")


def save_results(tracker: EvaluationTracker, results: dict) -> Path:
    """Write ``simple_evaluate``'s results, and its per-sample outputs when it logged them, as ``lm_eval`` does;
    return the results file. The tracker only logs a warning when it cannot write: that stops the run here."""
    samples = results.pop("samples", None)  # present with log_samples=True
    tracker.save_results_aggregated(results=results, samples=samples)
    folder = Path(tracker.output_path) / tracker.general_config_tracker.model_name_sanitized
    path = folder / f"results_{getattr(tracker, 'date_id', None)}.json"  # date_id: set as the tracker writes
    if not path.is_file():
        raise RuntimeError(f"lm-eval could not write its results to {folder} (its warning above says why)")
    if samples is not None:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return path


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="evaluate", cfg=cfg)
    output_dir = Path(cfg.output_dir)
    # A local task folder loads in ~0 s; indexing lm-eval's ~14,700 built-in tasks takes ~8 s.
    task_manager = TaskManager(
        include_path=cfg.get("include_path"), include_defaults=cfg.get("include_defaults", True)
    )
    log_samples = bool(cfg.get("log_samples", False))
    all_results: dict[str, dict] = {}
    for entry in cfg.checkpoints:
        checkpoint_dir = Path(entry.checkpoint_dir)
        checkpointer = OmegaConf.merge(
            cfg.checkpointer,
            {"checkpoint_dir": str(checkpoint_dir), "checkpoint_files": entry.get("checkpoint_files"),
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
        tracker = EvaluationTracker(output_path=str(output_dir))
        results = simple_evaluate(
            model=lm,
            tasks=list(cfg.tasks),
            num_fewshot=cfg.get("num_fewshot"),
            limit=cfg.get("limit"),
            task_manager=task_manager,
            # lm-eval names the model (and its results folder) after model_args' "model"; it only records them.
            model_args={"model": entry.name, "checkpoint_dir": str(checkpoint_dir)},
            log_samples=log_samples,
            evaluation_tracker=tracker,
            random_seed=cfg.get("seed", 0),
            numpy_random_seed=cfg.get("seed", 0),
            torch_random_seed=cfg.get("seed", 0),
            fewshot_random_seed=cfg.get("seed", 0),
        )
        all_results[entry.name] = results["results"]
        log.info(f"wrote {save_results(tracker, results)}")
        del model, lm

    table = results_table(all_results, list(cfg.tasks))
    write_atomically(output_dir / "results.md", table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
