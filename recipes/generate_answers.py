"""Answers of a checkpoint (HF format) for the LLM-judge benchmarks: AlpacaEval's ``model_outputs.json`` and
MT-Bench's answer file (two turns per question), ready for ``alpaca_eval`` and FastChat's ``gen_judgment.py``.

    python recipes/generate_answers.py --config configs/llama3_8b_generate.yaml
    tune run --nproc_per_node 1 recipes/generate_answers.py --config configs/tiny_generate.yaml

One process: vllm (``backend: vllm``, GPUs, its own tensor parallelism) or torchtune's KV-cache generation
(``backend: torchtune``, CPU or one GPU); ``auto`` takes vllm where it is installed and the device is cuda.
Prompts are rendered by the config's torchtune tokenizer in the chat format the model was trained with, for
either backend. Greedy decoding unless ``sampling.temperature > 0``. See ``rao_tune.eval.judges``.

The torchtune backend reads ``checkpointer.checkpoint_files`` or, when that is null (or absent), the files found in
``checkpoint_dir`` (its index json, else its ``model.safetensors``): any ``epoch_N`` folder of our recipes works as is.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig
from torchtune import config, utils

from rao_tune.eval.generation import GenerationStats, SamplingSettings, TorchtuneBackend, VLLMBackend, resolve_backend
from rao_tune.eval.judges import (
    answer_alpaca_eval,
    answer_mt_bench,
    default_generator_name,
    read_alpaca_eval_prompts,
    read_mt_bench_questions,
    write_alpaca_eval_outputs,
    write_mt_bench_answers,
)
from rao_tune.training.errors import run_main

log = utils.get_logger("INFO")


def _max_new_tokens(section: DictConfig, sampling: DictConfig, name: str) -> int:
    value = section.get("max_new_tokens") or sampling.get("max_new_tokens")
    if not value or int(value) < 1:
        raise ValueError(f"set {name}.max_new_tokens or sampling.max_new_tokens (>= 1)")
    return int(value)


def _output_path(section: DictConfig, default: Path) -> Path:
    return Path(section.output) if section.get("output") else default


def build_backend(cfg: DictConfig, sampling: SamplingSettings) -> tuple[Any, Any]:
    """The configured backend and the tokenizer that renders prompts and decodes answers."""
    device = cfg.get("device", "cuda")
    dtype = cfg.get("dtype", "bf16")
    backend = resolve_backend(cfg.get("backend", "auto"), device)
    if backend == "vllm":
        tokenizer = config.instantiate(cfg.tokenizer)
        vllm_kwargs = dict(cfg.get("vllm") or {})
        return VLLMBackend(cfg.checkpointer.checkpoint_dir, tokenizer, sampling=sampling, dtype=dtype,
                           **vllm_kwargs), tokenizer
    from rao_tune.eval.generation import load_for_inference

    model, tokenizer, torch_device, torch_dtype = load_for_inference(
        cfg.model, cfg.checkpointer, cfg.tokenizer, device=device, dtype=dtype
    )
    return TorchtuneBackend(model, tokenizer, device=torch_device, dtype=torch_dtype, sampling=sampling,
                            batch_size=cfg.get("batch_size", 8)), tokenizer


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="generate_answers", cfg=cfg)
    alpaca_cfg: Optional[DictConfig] = cfg.get("alpaca_eval")
    mt_bench_cfg: Optional[DictConfig] = cfg.get("mt_bench")
    if alpaca_cfg is None and mt_bench_cfg is None:
        raise ValueError("nothing to do: both alpaca_eval and mt_bench are null")
    generator = cfg.get("generator") or default_generator_name(cfg.checkpointer.checkpoint_dir)
    output_dir = Path(cfg.output_dir)
    system_prompt = cfg.get("system_prompt")
    sampling_cfg = cfg.get("sampling") or DictConfig({})
    sampling = SamplingSettings(
        temperature=float(sampling_cfg.get("temperature", 0.0)), top_p=float(sampling_cfg.get("top_p", 1.0)),
        top_k=sampling_cfg.get("top_k"), seed=int(sampling_cfg.get("seed", 0)),
    )

    # Read (and so check) every prompt file before the model loads.
    prompts = read_alpaca_eval_prompts(alpaca_cfg.prompts) if alpaca_cfg is not None else None
    questions = read_mt_bench_questions(mt_bench_cfg.questions) if mt_bench_cfg is not None else None

    backend, tokenizer = build_backend(cfg, sampling)
    log.info(f"generator {generator!r}, backend {backend.name}, "
             f"{'greedy' if sampling.greedy else f'temperature {sampling.temperature}'}")

    if prompts is not None:
        stats = GenerationStats()
        outputs = answer_alpaca_eval(backend, tokenizer, prompts, system_prompt=system_prompt, stats=stats,
                                     max_new_tokens=_max_new_tokens(alpaca_cfg, sampling_cfg, "alpaca_eval"))
        path = write_alpaca_eval_outputs(
            _output_path(alpaca_cfg, output_dir / "alpaca_eval" / generator / "model_outputs.json"),
            prompts, outputs, generator,
        )
        log.info(f"AlpacaEval: {stats}; wrote {path}")
    if questions is not None:
        stats = GenerationStats()
        answers = answer_mt_bench(backend, tokenizer, questions, system_prompt=system_prompt, stats=stats,
                                  max_new_tokens=_max_new_tokens(mt_bench_cfg, sampling_cfg, "mt_bench"))
        path = write_mt_bench_answers(
            _output_path(mt_bench_cfg, output_dir / "mt_bench" / "model_answer" / f"{generator}.jsonl"),
            questions, answers, generator,
        )
        log.info(f"MT-Bench: {stats}; wrote {path}")


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
