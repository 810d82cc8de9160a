"""The paper's whole pipeline at toy scale, stage by stage through our recipes (see ``scripts/toy_pipeline.py``).

SFT on imperfect demonstrations -> sample k responses per prompt -> score them with the task's true reward ->
Bradley-Terry reward model on those pairs (held-out accuracy) -> annotate the samples with the reward model ->
RAO and baselines at the same budget -> greedy answers on held-out prompts, scored by the true reward -> summary
and the paper's Fig. 2 analogues. Each stage runs a recipe file with a config of ``configs/`` in this process
(one process group per stage), so the demo re-implements none of them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from rao_tune.files import write_atomically
from rao_tune.tiny import build_tiny_assets, reward_rows, sft_rows, task_prompts, true_reward
from rao_tune.training.distributed import one_process_env
from rao_tune.training.metrics import read_disk_log

REPO_ROOT = Path(__file__).resolve().parents[1]
ALIGNMENT_CONFIGS = {"RAO": "tiny_rao", "DPO": "tiny_dpo", "IPO": "tiny_ipo", "SimPO": "tiny_simpo",
                     "distillation": "tiny_distillation"}  # fmt: skip


def load_recipe(name: str) -> ModuleType:
    """A fresh module object for ``recipes/<name>.py`` (torchtune installs its own top-level ``recipes``
    package, so ours is loaded by path)."""
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", REPO_ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_recipe_main(recipe: ModuleType, config_path: Path, *overrides: str) -> None:
    """``recipe.recipe_main()`` with ``--config config_path overrides`` as its command line; a non-zero exit
    raises. The caller provides the process-group environment (:func:`one_process_env`)."""
    argv = sys.argv
    sys.argv = [recipe.__name__, "--config", str(config_path), *overrides]
    try:
        recipe.recipe_main()
    except SystemExit as done:  # torchtune's config.parse ends with sys.exit(recipe_main(...))
        if done.code not in (None, 0):
            raise RuntimeError(f"{recipe.__name__} with {config_path} exited with {done.code}") from None
    finally:
        sys.argv = argv


def run_recipe(name: str, config_name: str, *overrides: str) -> None:
    """``tune run --nproc_per_node 1 recipes/<name>.py --config configs/<config_name>.yaml <overrides>``, in this
    process (saves ~10 s of start-up per stage)."""
    os.environ.update(one_process_env())
    call_recipe_main(load_recipe(name), REPO_ROOT / "configs" / f"{config_name}.yaml", *overrides)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def score_answers(outputs_path: Path) -> dict[str, float]:
    """Mean true reward and exact-match accuracy of AlpacaEval-format greedy answers."""
    outputs = json.loads(Path(outputs_path).read_text())
    rewards = [true_reward(item["instruction"], item["output"]) for item in outputs]
    return {"true_reward": statistics.fmean(rewards), "accuracy": sum(r == 1.0 for r in rewards) / len(rewards)}


def run_pipeline(out: Path, *, seed: int = 0, scale: float = 1.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage into ``out``; return the summary (also written to ``out/summary.md``). ``scale`` shrinks
    the data and the training budgets (the CI test uses a small one)."""
    out = Path(out)
    timings: dict[str, float] = {}

    def stage(name: str):
        log(f"\n=== {name} ===")
        timings[name] = time.perf_counter()

    def done(name: str):
        timings[name] = time.perf_counter() - timings[name]
        log(f"=== {name}: {timings[name]:.1f} s ===")

    n_train, n_heldout = max(8, int(256 * scale)), max(4, int(48 * scale))
    epochs = max(1, int(round(3 * scale)))
    stage("assets")
    assets = build_tiny_assets(out / "assets", seed=seed)
    data = out / "data"
    # Imperfect demonstrations: a response with one or two mistakes where the prompt allows.
    demos = [{"prompt": row["prompt"], "responses": [sorted(zip(row["rewards"], row["responses"]))[-2][1]],
              "rewards": [0.0]} for row in reward_rows(n_train, responses_per_prompt=(3, 3), seed=seed + 10)]
    write_jsonl(data / "sft.jsonl", sft_rows(demos))
    train_prompts, heldout_prompts = task_prompts(n_train, seed + 11), task_prompts(n_heldout, seed + 12)
    write_jsonl(data / "train_prompts.jsonl", [{"prompt": p} for p in train_prompts])
    write_jsonl(data / "heldout_prompts.jsonl", [{"prompt": p} for p in heldout_prompts])
    (data / "heldout_alpaca.json").write_text(json.dumps([{"instruction": p} for p in heldout_prompts]))
    done("assets")
    common = [f"assets_dir={assets['out_dir']}", f"seed={seed}"]
    fresh = ["overwrite=True"]  # the pipeline runs every stage anew: a second run into the same --out replaces them

    stage("SFT")
    run_recipe("sft_distributed", "tiny_sft", *common, *fresh, f"output_dir={out / 'sft'}", f"dataset.data_files={data / 'sft.jsonl'}",
               f"epochs={2 * epochs}")
    sft_dir = out / "sft" / f"epoch_{2 * epochs - 1}"
    done("SFT")

    stage("sampling")
    for split in ("train", "heldout"):
        run_recipe("sample_responses", "tiny_sample", *common, f"checkpoint_dir={sft_dir}", f"output_dir={out / 'samples'}",
                   f"prompts={data / f'{split}_prompts.jsonl'}", f"output_path={out / 'samples' / f'{split}.jsonl'}")
    done("sampling")

    stage("true rewards")
    for split in ("train", "heldout"):
        run_recipe("annotate_rewards", "tiny_true_reward", *common, f"output_dir={out / 'true_rewards'}",
                   f"dataset.data_files={out / 'samples' / f'{split}.jsonl'}",
                   f"output_path={out / 'true_rewards' / f'{split}.jsonl'}")
    done("true rewards")

    stage("reward model")
    run_recipe("reward_model_distributed", "tiny_reward_model", *common, *fresh, f"output_dir={out / 'reward_model'}",
               f"checkpointer.checkpoint_dir={sft_dir}", "checkpointer.checkpoint_files=[model-00001-of-00001.safetensors]",
               f"dataset.data_files={out / 'true_rewards' / 'train.jsonl'}", "dataset.on_bad_row=drop",
               f"eval_dataset.data_files={out / 'true_rewards' / 'heldout.jsonl'}", "eval_dataset.on_bad_row=drop",
               "loss.pairs=all_ordered", f"epochs={2 * epochs}")
    reward_model_dir = out / "reward_model" / f"epoch_{2 * epochs - 1}"
    reward_model_log = read_disk_log(out / "reward_model" / "logs")
    heldout = reward_model_log[max(reward_model_log)]
    done("reward model")

    stage("annotation")
    run_recipe("annotate_rewards", "tiny_annotate", *common, f"output_dir={out / 'annotated'}",
               f"reward_model_dir={reward_model_dir}", "scorer.checkpointer.require_score_head=True",
               f"dataset.data_files={out / 'true_rewards' / 'train.jsonl'}", "dataset.on_bad_row=drop",
               f"output_path={out / 'annotated' / 'train.jsonl'}")
    done("annotation")

    start = [f"checkpointer.checkpoint_dir={sft_dir}", "checkpointer.checkpoint_files=[model-00001-of-00001.safetensors]",
             f"dataset.data_files={out / 'annotated' / 'train.jsonl'}", "dataset.on_bad_row=drop", f"epochs={epochs}"]
    for method, config_name in ALIGNMENT_CONFIGS.items():
        stage(f"align: {method}")
        run_recipe("rao_distributed", config_name, *common, *fresh, *start, f"output_dir={out / 'align' / method}")
        done(f"align: {method}")

    stage("z0 sweep")
    # Fig. 2's analysis: the final best-response log-ratio and reward gap against log Z_0, for two betas.
    rewards = [r for row in read_jsonl(out / "annotated" / "train.jsonl") for r in row["rewards"]]
    sweep, sweep_steps = [], max(4, int(24 * scale))
    for beta in (0.1, 0.5):
        neutral = statistics.fmean(rewards) / beta  # z0 = auto: an average response keeps its probability
        for offset in (-1.0, 0.0, 1.0):
            z0 = neutral + offset / beta
            run_dir = out / "z0_sweep" / f"beta{beta}_z0{z0:.2f}"
            run_recipe("rao_distributed", "tiny_rao", *common, *fresh, *start, f"output_dir={run_dir}", f"loss.beta={beta}",
                       f"loss.z0={z0}", f"max_steps_per_epoch={sweep_steps}")
            log_steps = read_disk_log(run_dir / "logs")
            last = [log_steps[s] for s in sorted(log_steps) if "loss" in log_steps[s]][-8:]
            sweep.append({"beta": beta, "z0": z0, "z0_offset": offset,
                          "logratio_best": statistics.fmean(m["logratio_best"] for m in last),
                          "reward_gap": statistics.fmean(m["implicit_reward_best"] - m["implicit_reward_worst"] for m in last)})
    done("z0 sweep")

    stage("evaluation")
    candidates = {"SFT": sft_dir, **{m: out / "align" / m / f"epoch_{epochs - 1}" for m in ALIGNMENT_CONFIGS}}
    scores = {}
    for method, checkpoint_dir in candidates.items():
        outputs = out / "answers" / f"{method}.json"
        run_recipe("generate_answers", "tiny_generate", *common, f"checkpoint_dir={checkpoint_dir}",
                   "checkpointer.checkpoint_files=[model-00001-of-00001.safetensors]",
                   f"output_dir={out / 'answers'}", f"generator={method}", "mt_bench=null",
                   f"alpaca_eval.prompts={data / 'heldout_alpaca.json'}", f"alpaca_eval.output={outputs}")
        scores[method] = score_answers(outputs)
    done("evaluation")

    summary = {"timings": timings, "scores": scores, "sweep": sweep, "reward_model_heldout": heldout,
               "alignment_logs": {m: read_disk_log(out / "align" / m / "logs") for m in ("RAO", "DPO")}}
    write_report(out, summary, seed=seed)
    return summary


# --- report --------------------------------------------------------------------------------------------------


def line_plot(path: Path, title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str) -> None:
    """A small PNG line plot (Pillow only, no plotting library needed): one line per series, with a legend."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [p for values in series.values() for p in values]
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    x_span, y_span = (x_max - x_min) or 1.0, (y_max - y_min) or 1.0

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x_min) / x_span * (width - 2 * margin),
                height - margin - (y - y_min) / y_span * (height - 2 * margin))

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    if y_min < 0 < y_max:
        draw.line([to_pixel(x_min, 0), to_pixel(x_max, 0)], fill=(200, 200, 200))
    for value, anchor in ((y_min, height - margin), (y_max, margin)):
        draw.text((4, anchor - 6), f"{value:.3g}", fill="black")
    for value, anchor in ((x_min, margin), (x_max, width - margin)):
        draw.text((anchor - 10, height - margin + 6), f"{value:.3g}", fill="black")
    draw.text((margin, 20), title, fill="black")
    draw.text((width // 2 - 40, height - 25), x_label, fill="black")
    draw.text((4, margin - 30), y_label, fill="black")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    for index, (name, values) in enumerate(series.items()):
        color = colors[index % len(colors)]
        pixels = [to_pixel(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        draw.text((width - margin - 150, margin + 8 + 14 * index), name, fill=color)
    image.save(path)


def write_report(out: Path, summary: dict[str, Any], *, seed: int) -> None:
    scores, heldout = summary["scores"], summary["reward_model_heldout"]
    lines = [
        f"# Toy pipeline (seed {seed})",
        "",
        "Greedy answers to held-out prompts, scored by the task's true reward (the fraction of the answer's",
        "positions that are right) and exact-match accuracy. Aligned models start from the SFT row and learn from",
        "the reward model's annotations of SFT samples, each with the same data and budget.",
        "",
        "| method | true reward | accuracy |",
        "|---|---|---|",
        *[f"| {m} | {v['true_reward']:.3f} | {v['accuracy']:.3f} |" for m, v in scores.items()],
        "",
        f"Reward model (Bradley-Terry on pairs ordered by the true reward): held-out accuracy "
        f"{heldout['eval_accuracy']:.3f} over {heldout['eval_pairs']:.0f} pairs, loss {heldout['eval_loss']:.3f}.",
        "",
        "## Log Z_0 sweep (RAO; last 8 steps)",
        "",
        "| beta | z0 | z0 - mean reward/beta | best-response log-ratio | implicit reward gap (best - worst) |",
        "|---|---|---|---|---|",
        *[f"| {r['beta']} | {r['z0']:.2f} | {r['z0_offset'] / r['beta']:+.1f} | {r['logratio_best']:.3f} | "
          f"{r['reward_gap']:.3f} |" for r in summary["sweep"]],
        "",
        "## Wall time per stage (s)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in summary["timings"].items()],
        "",
        "Plots: `implicit_rewards.png` (implicit rewards of each prompt's best and worst response during RAO and",
        "DPO, moving average of 8 steps; Fig. 2 left), `z0_logratio.png` and `z0_reward_gap.png` (Fig. 2 right).",
    ]
    write_atomically(out / "summary.md", "\n".join(lines) + "\n")

    def smoothed(points: list[tuple[float, float]], window: int = 8) -> list[tuple[float, float]]:
        # Per-step values are means over a few prompts: a moving average shows the trend.
        return [(x, statistics.fmean(y for _, y in points[max(0, i - window + 1) : i + 1])) for i, (x, _) in enumerate(points)]

    series = {}
    for method, steps in summary["alignment_logs"].items():
        trained = sorted((s, m) for s, m in steps.items() if "implicit_reward_best" in m)
        series[f"{method} best"] = smoothed([(s, m["implicit_reward_best"]) for s, m in trained])
        series[f"{method} worst"] = smoothed([(s, m["implicit_reward_worst"]) for s, m in trained])
    line_plot(out / "implicit_rewards.png", "implicit reward of best / worst response", series, "step", "implicit reward")
    for key, label, file_name in (("logratio_best", "best-response log-ratio", "z0_logratio.png"),
                                  ("reward_gap", "implicit reward gap", "z0_reward_gap.png")):
        by_beta: dict[str, list[tuple[float, float]]] = {}
        for row in summary["sweep"]:
            by_beta.setdefault(f"beta {row['beta']}", []).append((row["z0_offset"] / row["beta"], row[key]))
        line_plot(out / file_name, f"{label} vs log Z_0 (offset from mean reward / beta)", by_beta, "z0 - mean reward / beta", label)
