"""The paper's pipeline at toy scale, stage by stage through our recipes (the study and README's first command).

Per seed, once (:func:`prepare_seed`): tiny assets -> SFT on imperfect demonstrations -> k samples per training
prompt -> the task's true reward -> a Bradley-Terry reward model on pairs ordered by it (held-out accuracy on
validation prompts' samples) -> annotation of the training samples by the reward model. Then per alignment run
(:func:`align_and_evaluate`): one loss config of ``configs/`` on those annotations (or on the true rewards), or
online PPO against the reward model on the same training prompts, and greedy answers to the validation and test
prompts scored by the true reward. Every stage runs one of our recipe
files in this process (:mod:`rao_tune.inprocess`), so nothing here re-implements a stage.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from rao_tune.annotate import annotation_agreement
from rao_tune.files import write_atomically, write_jsonl
from rao_tune.inprocess import run_recipe
from rao_tune.toy.assets import build_tiny_assets
from rao_tune.toy.task import demonstration_rows, disjoint_task_prompts, sft_rows, true_reward
from rao_tune.training.metrics import read_metrics

# The checkpointer's name for the one-file HF export of the tiny models.
EXPORTED_WEIGHTS = "checkpointer.checkpoint_files=[model-00001-of-00001.safetensors]"
# Training metrics averaged over the last steps of a run (the paper's Fig. 2 reads them at the end of training).
FINAL_METRICS = ("loss", "implicit_reward", "target_reward", "implicit_reward_best", "implicit_reward_worst",
                 "logratio_best", "logratio_worst", "prompt_logratio", "joint_logratio_best", "joint_logratio_worst",
                 "kl_estimate", "response_length", "implicit_accuracy", "reward_correlation",
                 "reward", "kl", "reward_with_kl", "entropy", "clip_fraction", "value_loss")  # fmt: skip


def score_answers(answers: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Mean true reward and exact-match accuracy of AlpacaEval-format answers ``{"instruction", "output"}``."""
    rewards = [true_reward(item["instruction"], item["output"]) for item in answers]
    return {"true_reward": statistics.fmean(rewards), "accuracy": sum(r == 1.0 for r in rewards) / len(rewards)}


# How prompts are split; a seed prepared another way is prepared again.
SPLITS = "disjoint: train, validation and test prompts drawn without replacement; SFT demonstrates no held-out prompt"


def prepare_seed(out: Path, seed: int, scale: Mapping[str, Any]) -> dict[str, Any]:
    """Everything alignment runs of ``seed`` share, built once into ``out`` (skipped when ``prepared.json`` says
    it was built with the same ``scale``). ``scale``: sft_demonstrations, train_prompts, validation_prompts,
    test_prompts, samples_per_prompt, sft_epochs, reward_model_epochs, and optionally sample_temperature."""
    out = Path(out)
    record_path = out / "prepared.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record["scale"] == dict(scale) and record.get("splits") == SPLITS:
            return record
    common = [f"seed={seed}", "overwrite=True"]
    assets = build_tiny_assets(out / "assets", seed=seed)
    common.append(f"assets_dir={assets['out_dir']}")
    data = out / "data"
    # Disjoint splits: no prompt is in two of them, and SFT never demonstrates a held-out one.
    prompts = disjoint_task_prompts({split: scale[f"{split}_prompts"] for split in ("train", "validation", "test")},
                                    seed + 11)
    held_out = prompts["validation"] + prompts["test"]
    write_jsonl(data / "sft.jsonl", sft_rows(demonstration_rows(scale["sft_demonstrations"], seed=seed + 10,
                                                                exclude=held_out)))
    for split, split_prompts in prompts.items():
        write_jsonl(data / f"{split}_prompts.jsonl", [{"prompt": prompt} for prompt in split_prompts])
    # One file of greedy-answer prompts per run: validation first, then test (split again by position).
    (data / "evaluation_alpaca.json").write_text(
        json.dumps([{"instruction": p} for p in prompts["validation"] + prompts["test"]])
    )

    sft_epochs = scale["sft_epochs"]
    run_recipe("sft_distributed", "tiny_sft", *common, f"output_dir={out / 'sft'}",
               f"dataset.data_files={data / 'sft.jsonl'}", f"epochs={sft_epochs}", "batch_size=16")
    sft_dir = out / "sft" / f"epoch_{sft_epochs - 1}"

    # scale.sample_temperature (optional; tiny_sample's 1.0 when absent, so existing seeds keep their record)
    temperature = [f"temperature={scale['sample_temperature']}"] if "sample_temperature" in scale else []
    for split in ("train", "validation"):  # validation samples only measure the reward model
        run_recipe("sample_responses", "tiny_sample", *common, *temperature, f"checkpoint_dir={sft_dir}",
                   f"output_dir={out / 'samples'}", f"prompts={data / f'{split}_prompts.jsonl'}",
                   f"num_samples={scale['samples_per_prompt']}", f"output_path={out / 'samples' / f'{split}.jsonl'}")
        run_recipe("annotate_rewards", "tiny_true_reward", *common, f"output_dir={out / 'true_rewards'}",
                   f"dataset.data_files={out / 'samples' / f'{split}.jsonl'}",
                   f"output_path={out / 'true_rewards' / f'{split}.jsonl'}")

    reward_model_epochs = scale["reward_model_epochs"]
    run_recipe("reward_model_distributed", "tiny_reward_model", *common, f"output_dir={out / 'reward_model'}",
               f"checkpointer.checkpoint_dir={sft_dir}", EXPORTED_WEIGHTS,
               f"dataset.data_files={out / 'true_rewards' / 'train.jsonl'}", "dataset.on_bad_row=drop",
               f"eval_dataset.data_files={out / 'true_rewards' / 'validation.jsonl'}", "eval_dataset.on_bad_row=drop",
               "loss.pairs=all_ordered", f"epochs={reward_model_epochs}")
    reward_model_log = read_metrics(out / "reward_model")
    heldout = reward_model_log[max(reward_model_log)]

    run_recipe("annotate_rewards", "tiny_annotate", *common, f"output_dir={out / 'annotated'}",
               f"reward_model_dir={out / 'reward_model' / f'epoch_{reward_model_epochs - 1}'}",
               "scorer.checkpointer.require_score_head=True",
               f"dataset.data_files={out / 'true_rewards' / 'train.jsonl'}", "dataset.on_bad_row=drop",
               f"output_path={out / 'annotated' / 'train.jsonl'}")

    record = {
        "seed": seed,
        "scale": dict(scale),
        "splits": SPLITS,
        "assets_dir": str(assets["out_dir"]),
        "sft_dir": str(sft_dir),
        "annotations": {"reward_model": str(out / "annotated" / "train.jsonl"),
                        "true_reward": str(out / "true_rewards" / "train.jsonl")},
        "evaluation_prompts": str(data / "evaluation_alpaca.json"),
        "num_validation": len(prompts["validation"]),
        "reward_model": {"heldout_accuracy": heldout["eval_accuracy"], "heldout_pairs": heldout["eval_pairs"],
                         "annotation_agreement": annotation_agreement(out / "annotated" / "train.jsonl",
                                                                      out / "true_rewards" / "train.jsonl")},
    }
    record["sft"] = evaluate(out / "sft_answers", sft_dir, record, generator="SFT")
    write_atomically(record_path, json.dumps(record, indent=2) + "\n")
    return record


def evaluate(out: Path, checkpoint_dir: Path, prepared: Mapping[str, Any], *, generator: str) -> dict[str, Any]:
    """Greedy answers of ``checkpoint_dir`` to the validation and test prompts, scored by the true reward."""
    answers_path = Path(out) / "answers.json"
    run_recipe("generate_answers", "tiny_generate", f"assets_dir={prepared['assets_dir']}",
               f"checkpoint_dir={checkpoint_dir}", EXPORTED_WEIGHTS, f"output_dir={out}", f"generator={generator}",
               "mt_bench=null", f"alpaca_eval.prompts={prepared['evaluation_prompts']}",
               f"alpaca_eval.output={answers_path}", "batch_size=48")
    answers = json.loads(answers_path.read_text())
    split = prepared["num_validation"]
    return {"validation": score_answers(answers[:split]), "test": score_answers(answers[split:])}


def _data_overrides(recipe: str, prepared: Mapping[str, Any], responses_per_prompt: int, annotations: str) -> list[str]:
    """What an alignment recipe reads from the seed's shared stages."""
    data = [f"dataset.data_files={prepared['annotations'][annotations]}", "dataset.on_bad_row=drop"]
    if recipe == "ppo_distributed":
        # Online: the same training prompts (their samples unused), k fresh samples per prompt and step, scored by
        # the seed's reward model; the held-out reward is logged on the validation prompts' samples file.
        if annotations != "reward_model":
            raise ValueError("PPO scores its own samples online with the reward model: no true_reward condition")
        seed_dir = Path(prepared["sft_dir"]).parents[1]
        reward_model_dir = sorted((seed_dir / "reward_model").glob("epoch_*"), key=lambda p: int(p.name[6:]))[-1]
        return [*data, f"samples_per_prompt={responses_per_prompt}", f"reward_model_dir={reward_model_dir}",
                f"eval_dataset.data_files={seed_dir / 'true_rewards' / 'validation.jsonl'}",
                "eval_dataset.on_bad_row=drop", "max_steps_per_epoch=null"]
    return [*data, f"dataset.responses_per_prompt={responses_per_prompt}", "dataset.standardize_rewards=True",
            # Every loss logs the normaliser and the KL estimate: reference-free ones load the reference for metrics.
            "monitor_with_reference=True"]


def align_and_evaluate(
    out: Path, prepared: Mapping[str, Any], *, config: str, overrides: Mapping[str, Any], responses_per_prompt: int,
    annotations: str, epochs: int, seed: int, recipe: str = "rao_distributed",
) -> dict[str, Any]:
    """One alignment run (``recipes/<recipe>.py`` with ``configs/<config>.yaml``: an offline loss of
    ``rao_distributed``, or ``ppo_distributed``) from the seed's SFT model on its annotated samples' prompts, then
    :func:`evaluate`. Returns the validation and test scores and the training metrics at the start and end of
    the run; keeps the logs and the final HF export, drops the rest."""
    out = Path(out)
    run_recipe(
        recipe, config, f"assets_dir={prepared['assets_dir']}", f"seed={seed}", "overwrite=True",
        f"output_dir={out}", f"checkpointer.checkpoint_dir={prepared['sft_dir']}", EXPORTED_WEIGHTS,
        *_data_overrides(recipe, prepared, responses_per_prompt, annotations),
        f"epochs={epochs}", *[f"{key}={value}" for key, value in overrides.items()],
    )
    final_dir = out / f"epoch_{epochs - 1}"
    scores = evaluate(out / "answers", final_dir, prepared, generator=out.name)
    steps = read_metrics(out)
    trained = [steps[step] for step in sorted(steps) if "loss" in steps[step]]
    tail = trained[-max(1, len(trained) // 8):]
    training = {
        "steps": len(trained),
        "first": {key: trained[0][key] for key in FINAL_METRICS if key in trained[0]},
        # A step whose prompts all tie has no best / worst metrics: average over the steps that have them.
        "final": {key: statistics.fmean(step[key] for step in tail if key in step)
                  for key in FINAL_METRICS if any(key in step for step in tail)},
        "curves": {key: [step.get(key) for step in trained]
                   for key in ("implicit_reward", "implicit_reward_best", "implicit_reward_worst", "prompt_logratio",
                               "logratio_best", "logratio_worst", "kl_estimate", "loss")},
    }
    # Disk: the study keeps each run's logs, answers and last export, not its resumable state.
    for path in [out / "checkpoints", out / "reference_logps", *out.glob("epoch_*")]:
        if path.is_dir() and path != final_dir:
            shutil.rmtree(path)
    return {**scores, "training": training}

