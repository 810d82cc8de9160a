"""The paper's pipeline on a real pretrained model: SmolLM2-135M-Instruct on instructions with verifiable
constraints, every stage one of our recipes run in this process with the shipped ``configs/smollm2_135m_*.yaml``.

    prompts (train / validation / test on disjoint topics)
    -> k samples per training (and validation) prompt from the start model (our sampler)
    -> the checker's reward (fraction of constraints met): the oracle annotation
    -> a Bradley-Terry reward model (LoRA) on checker-ordered pairs, held-out accuracy on validation samples
    -> the training samples annotated by the reward model
    -> per method x annotation x grid point: alignment (LoRA) from the start model, greedy answers to the
       validation and test prompts scored by the checker
    -> per method and annotation, the grid point with the best validation score; its test figures against the
       start model's, with a paired bootstrap interval over test prompts (one seed).

Finished stages are reused on a re-run (each writes its output last); :func:`run` returns the report.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from rao_tune.annotate import annotation_agreement
from rao_tune.files import read_jsonl, write_atomically, write_jsonl
from rao_tune.inprocess import run_recipe
from rao_tune.real.instructions import constraint_results, instruction_prompts
from rao_tune.toy.study import grid_settings
from rao_tune.training.metrics import read_metrics


# The pipeline names every data file itself: the configs' data_dir is left unread, and a training recipe refuses an
# unread top-level key.
NO_DATA_DIR = ("~data_dir",)


def score(prompts: Sequence[str], answers: Sequence[str]) -> dict[str, list[float]]:
    """Per prompt: the checker's reward (fraction of constraints met) and whether every constraint is met."""
    results = [constraint_results(prompt, answer) for prompt, answer in zip(prompts, answers, strict=True)]
    return {"reward": [sum(r) / len(r) for r in results], "all_met": [float(all(r)) for r in results]}


def paired_bootstrap(start: Sequence[float], method: Sequence[float], *, samples: int = 10000,
                     seed: int = 0) -> dict[str, float]:
    """Mean of ``method - start`` over the same test prompts and its 95% percentile interval from resampling
    the prompts with replacement (the prompt is the unit: one seed leaves no other source of variation)."""
    differences = [m - s for s, m in zip(start, method, strict=True)]
    rng = random.Random(seed)
    n = len(differences)
    means = sorted(statistics.fmean(rng.choices(differences, k=n)) for _ in range(samples))
    return {"mean": statistics.fmean(differences), "low": means[int(0.025 * samples)],
            "high": means[int(0.975 * samples) - 1]}


class Pipeline:
    """One seed of the pipeline in ``cfg.out`` (see ``configs/real/smollm2_pipeline.yaml`` for the keys)."""

    def __init__(self, cfg: DictConfig, log: Callable[[str], None] = print) -> None:
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.data = self.out / "data"
        self.model_dir = Path(cfg.model_dir)
        self.common = [f"model_dir={self.model_dir}", f"seed={cfg.seed}"]
        self.times: dict[str, float] = {}

    def _stage(self, name: str, done: Path, work: Callable[[], None]) -> None:
        """Run ``work`` unless ``done`` exists (a stage's last output), and time it."""
        if done.exists():
            self.log(f"[{name}] reused {done}")
            return
        started = time.perf_counter()
        work()
        self.times[name] = time.perf_counter() - started
        self.log(f"[{name}] {self.times[name]:.0f} s")
        # Every stage's time, kept across re-runs (a re-run times only what it runs).
        times_path = self.out / "stage_seconds.json"
        times = json.loads(times_path.read_text()) if times_path.exists() else {}
        write_atomically(times_path, json.dumps({**times, name: self.times[name]}, indent=2) + "\n")

    # --- shared stages ----------------------------------------------------------------------------------------

    def check_reuse(self) -> None:
        """A folder's finished stages are reused only by a run of the same scale, seed and model: its prompts,
        samples and answers would otherwise be another run's. ``settings.json`` records what they were made with."""
        settings = {"seed": self.cfg.seed, "scale": OmegaConf.to_container(self.cfg.scale, resolve=True),
                    "model_dir": str(self.model_dir), "reward_model_lr": self.cfg.reward_model_lr}
        path = self.out / "settings.json"
        if path.exists():
            previous = json.loads(path.read_text())
            changed = sorted(key for key in settings if previous.get(key) != settings[key])
            if changed:
                raise ValueError(f"{self.out} holds a pipeline run with other {', '.join(changed)} ({path}); "
                                 "use another --out, or the same settings to reuse its finished stages")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(settings, indent=2) + "\n")

    def prepare(self) -> dict[str, Any]:
        scale = self.cfg.scale
        prompts = instruction_prompts({"train": scale.train_prompts, "validation": scale.validation_prompts,
                                       "test": scale.test_prompts}, seed=self.cfg.seed)
        self.prompts = prompts
        for split, split_prompts in prompts.items():
            write_jsonl(self.data / f"prompts_{split}.jsonl", [{"prompt": prompt} for prompt in split_prompts])
        # One AlpacaEval-format file for greedy answers: validation, then test (split again by position).
        evaluation = self.data / "evaluation_alpaca.json"
        write_atomically(evaluation, json.dumps([{"instruction": p} for p in prompts["validation"] + prompts["test"]]))

        for split in ("train", "validation"):  # validation samples only measure the reward model
            samples = self.out / "samples" / f"{split}.jsonl"
            self._stage(f"sample {split}", samples, lambda split=split, samples=samples: run_recipe(
                "sample_responses", "smollm2_135m_sample", *self.common, f"output_dir={self.out / 'samples'}",
                f"prompts={self.data / f'prompts_{split}.jsonl'}", f"output_path={samples}",
                f"num_samples={scale.samples_per_prompt}", f"temperature={scale.temperature}",
                f"max_new_tokens={scale.max_new_tokens}", f"batch_size={scale.sample_batch_size}",
                f"dtype={scale.generation_dtype}"))
            checked = self.out / "checker" / f"{split}.jsonl"
            self._stage(f"checker {split}", checked, lambda split=split, samples=samples, checked=checked: run_recipe(
                "annotate_rewards", "smollm2_135m_checker", f"output_dir={self.out / 'checker'}",
                f"dataset.data_files={samples}", f"output_path={checked}"))

        self.annotations = {"checker": self.out / "checker" / "train.jsonl"}
        self.evaluation_prompts = evaluation
        checked_train = read_jsonl(self.out / "checker" / "train.jsonl")
        prepared = {"samples": {"mean_reward": statistics.fmean(r for row in checked_train for r in row["rewards"]),
                                "best_of_k": statistics.fmean(max(row["rewards"]) for row in checked_train)},
                    "reward_model": None}
        if "reward_model" not in self.cfg.annotations:  # the oracle alone needs no reward model
            return prepared

        reward_model = self.out / "reward_model"
        epochs = scale.reward_model_epochs
        reward_model_dir = reward_model / f"epoch_{epochs - 1}"
        self._stage("reward model", reward_model_dir / "config.json", lambda: run_recipe(
            "reward_model_distributed", "smollm2_135m_reward_model_lora", *self.common, *NO_DATA_DIR, "overwrite=True",
            f"output_dir={reward_model}", f"dataset.data_files={self.out / 'checker' / 'train.jsonl'}",
            "dataset.on_bad_row=drop", f"eval_dataset.data_files={self.out / 'checker' / 'validation.jsonl'}",
            "eval_dataset.on_bad_row=drop", "loss.pairs=all_ordered", f"epochs={epochs}",
            f"optimizer.lr={self.cfg.reward_model_lr}", f"dataset.max_seq_len={scale.max_seq_len}",
            f"eval_dataset.max_seq_len={scale.max_seq_len}"))
        heldout = read_metrics(reward_model)
        heldout = heldout[max(heldout)]

        annotated = self.out / "annotated" / "train.jsonl"
        self._stage("annotate", annotated, lambda: run_recipe(
            "annotate_rewards", "smollm2_135m_annotate", *self.common, f"output_dir={self.out / 'annotated'}",
            f"reward_model_dir={reward_model_dir}", f"dataset.data_files={self.out / 'checker' / 'train.jsonl'}",
            "dataset.on_bad_row=drop", f"output_path={annotated}", f"scorer.max_seq_len={scale.max_seq_len}"))
        self.annotations["reward_model"] = annotated
        prepared["reward_model"] = {"heldout_accuracy": heldout.get("eval_accuracy"),
                                    "heldout_pairs": heldout.get("eval_pairs"),
                                    "pair_agreement": annotation_agreement(annotated, self.annotations["checker"])["pair_agreement"]}
        return prepared

    # --- evaluation and alignment -------------------------------------------------------------------------------

    def evaluate(self, out: Path, checkpoint_dir: Path, generator: str) -> dict[str, Any]:
        """Greedy answers of ``checkpoint_dir`` to the validation and test prompts, scored by the checker."""
        answers_path = out / "answers.json"
        self._stage(f"answers {generator}", answers_path, lambda: run_recipe(
            "generate_answers", "smollm2_135m_generate", *self.common, f"checkpoint_dir={checkpoint_dir}",
            f"output_dir={out}", f"generator={generator}", "mt_bench=null",
            f"alpaca_eval.prompts={self.evaluation_prompts}", f"alpaca_eval.output={answers_path}",
            f"alpaca_eval.max_new_tokens={self.cfg.scale.max_new_tokens}",
            f"batch_size={self.cfg.scale.sample_batch_size}", f"dtype={self.cfg.scale.generation_dtype}"))
        answers = [item["output"] for item in json.loads(answers_path.read_text())]
        n_val = len(self.prompts["validation"])
        return {"validation": score(self.prompts["validation"], answers[:n_val]),
                "test": score(self.prompts["test"], answers[n_val:]), "answers": answers}

    def align(self, method: str, annotations: str, setting: tuple) -> dict[str, Any]:
        spec = self.cfg.methods[method]
        # The loss's settings are part of the run's identity: another beta or z0 is another run, not a reuse.
        loss = json.dumps(OmegaConf.to_container(spec.loss, resolve=True), sort_keys=True)
        loss_id = hashlib.sha256(loss.encode()).hexdigest()[:8]
        name = "_".join([method, annotations, *[f"{k}-{v}" for k, v in setting], loss_id])
        out = self.out / "runs" / name
        epochs = int(dict(setting).get("epochs", self.cfg.scale.align_epochs))  # a grid may vary the epochs
        final_dir = out / f"epoch_{epochs - 1}"
        # The shipped LoRA RAO config with the method's whole loss section (an override would merge into RAO's).
        config = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "smollm2_135m_rao_lora.yaml")
        config.loss = spec.loss
        config_path = self.out / "configs" / f"{method}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, config_path)
        self._stage(f"align {name}", final_dir / "config.json", lambda: run_recipe(
            "rao_distributed", config_path, *self.common, *NO_DATA_DIR, "overwrite=True", f"output_dir={out}",
            f"dataset.data_files={self.annotations[annotations]}", "dataset.on_bad_row=drop",
            f"dataset.max_seq_len={self.cfg.scale.max_seq_len}", "dataset.standardize_rewards=True",
            f"batch_size={self.cfg.scale.align_batch_size}",
            *[f"{key}={value}" for key, value in {"epochs": epochs, **dict(setting)}.items()]))
        scores = self.evaluate(out, final_dir, name)
        steps = read_metrics(out)
        trained = [steps[s] for s in sorted(steps) if "loss" in steps[s]]
        for path in [out / "checkpoints", out / "reference_logps"]:  # keep logs, answers, the last export
            shutil.rmtree(path, ignore_errors=True)
        rates = [s["tokens_per_second"] for s in trained if "tokens_per_second" in s]
        return {**scores, "name": name, "setting": dict(setting), "steps": len(trained),
                "tokens_per_second": statistics.median(rates) if rates else None}


def run(cfg: DictConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole pipeline for ``cfg`` (one seed); writes ``report.json`` and ``report.md`` into ``cfg.out``."""
    started = time.perf_counter()
    pipeline = Pipeline(cfg, log)
    pipeline.check_reuse()
    prepared = pipeline.prepare()
    start = pipeline.evaluate(pipeline.out / "start", pipeline.model_dir, "start")
    results = {}
    for method in [name for name, spec in cfg.methods.items() if spec is not None]:  # methods.X=null drops X
        for annotation in cfg.annotations:
            runs = [pipeline.align(method, annotation, setting)
                    for setting in grid_settings(cfg.methods[method].get("grid"))]
            chosen = max(runs, key=lambda r: statistics.fmean(r["validation"]["reward"]))  # validation only
            results[f"{method} ({annotation})"] = {
                "chosen": chosen["name"], "setting": chosen["setting"],
                "grid": {r["name"]: statistics.fmean(r["validation"]["reward"]) for r in runs},
                "test_reward": statistics.fmean(chosen["test"]["reward"]),
                "test_all_met": statistics.fmean(chosen["test"]["all_met"]),
                "vs_start_reward": paired_bootstrap(start["test"]["reward"], chosen["test"]["reward"], seed=cfg.seed),
                "vs_start_all_met": paired_bootstrap(start["test"]["all_met"], chosen["test"]["all_met"], seed=cfg.seed),
                "tokens_per_second": chosen["tokens_per_second"], "answers": chosen["answers"],
            }
    report = {"prepared": prepared,
              "start": {"test_reward": statistics.fmean(start["test"]["reward"]),
                        "test_all_met": statistics.fmean(start["test"]["all_met"]), "answers": start["answers"]},
              "methods": results, "stage_seconds": json.loads((pipeline.out / "stage_seconds.json").read_text()),
              "wall_seconds_this_run": time.perf_counter() - started, "config": OmegaConf.to_container(cfg, resolve=True)}
    write_atomically(pipeline.out / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomically(pipeline.out / "report.md", render_report(report, pipeline.prompts))
    return report


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_report(report: Mapping[str, Any], prompts: Mapping[str, Sequence[str]], examples: int = 3) -> str:
    start = report["start"]
    lines = [
        "# SmolLM2-135M-Instruct on verifiable instructions", "",
        f"Test prompts: {len(prompts['test'])} (topics disjoint from training and validation). Checker reward = "
        "fraction of a prompt's constraints met; all met = share of prompts meeting every constraint. Greedy "
        "answers. Intervals: 95% paired bootstrap over test prompts (one seed), method minus start model.", "",
        "| model | test reward | all met | reward vs start | all met vs start | chosen on validation |",
        "|---|---|---|---|---|---|",
        f"| start (SmolLM2-135M-Instruct) | {start['test_reward']:.3f} | {start['test_all_met']:.3f} | | | |",
    ]
    for name, row in report["methods"].items():
        reward, all_met = row["vs_start_reward"], row["vs_start_all_met"]
        lines.append(f"| {name} | {row['test_reward']:.3f} | {row['test_all_met']:.3f} | "
                     f"{reward['mean']:+.3f} [{reward['low']:+.3f}, {reward['high']:+.3f}] | "
                     f"{all_met['mean']:+.3f} [{all_met['low']:+.3f}, {all_met['high']:+.3f}] | "
                     f"{', '.join(f'{k}={v}' for k, v in row['setting'].items()) or '-'} |")
    prepared, reward_model = report["prepared"], report["prepared"]["reward_model"]
    lines += ["", f"Samples (training prompts): mean checker reward {prepared['samples']['mean_reward']:.3f}, best of k "
              f"{prepared['samples']['best_of_k']:.3f}."
              + (f" Reward model: held-out pair accuracy {_number(reward_model['heldout_accuracy'])} "
                 f"({_number(reward_model['heldout_pairs'], 0)} pairs of validation samples), agreement with the checker "
                 f"on training pairs {reward_model['pair_agreement']:.3f}." if reward_model else ""),
              f"Time on this machine: {sum(report['stage_seconds'].values()) / 60:.1f} min in stages, "
              f"{report['wall_seconds_this_run'] / 60:.1f} min in this invocation; stages (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items()), "", "## Answers before and after", ""]
    n_val = len(prompts["validation"])
    first_method = next(iter(report["methods"].values()), None)
    for index in range(min(examples, len(prompts["test"]))):
        lines += [f"**{prompts['test'][index]}**", "", "start:", "", "    " + start["answers"][n_val + index].replace("\n", "\n    "), ""]
        if first_method:
            lines += [f"{next(iter(report['methods']))}:", "",
                      "    " + first_method["answers"][n_val + index].replace("\n", "\n    "), ""]
    return "\n".join(lines) + "\n"
