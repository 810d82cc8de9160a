"""The toy study end to end at CI size: 2 methods x 2 settings x 2 seeds, the ablations and a Fig. 2 sweep, every
stage through our recipes. Selection reads validation only; test is only reported; a re-run skips finished runs and
a recomputed run gives the same numbers."""

import json
import shutil
import statistics

import pytest
from omegaconf import OmegaConf

from rao_tune.files import read_jsonl
from rao_tune.toy.study import (Condition, Run, Study, load_study_config, mean_interval, run_study, select_setting,
                                verdict)
from rao_tune.toy.task import true_reward

pytestmark = pytest.mark.slow

STUDY = """
seeds: [0, 1]
scale: {sft_demonstrations: 128, train_prompts: 48, validation_prompts: 12, test_prompts: 12, samples_per_prompt: 4,
        sft_epochs: 4, reward_model_epochs: 2, align_epochs: 1}
main: {responses_per_prompt: 4, annotations: reward_model}
ablations: {responses_per_prompt: [2], annotations: [true_reward]}
methods:
  RAO: {config: tiny_rao, reward: explicit, grid: {loss.beta: [0.3, 1.0]}}
  DPO: {config: tiny_dpo, reward: implicit, grid: {optimizer.lr: [1e-3, 3e-3]}}
  PPO: {config: tiny_ppo, recipe: ppo_distributed, reward: online, annotations: [reward_model]}
sweeps:
  rao_z0: {method: RAO, grid: {loss.z0: [-2.0, 2.0]}}
"""


def table_lines(path):
    return [line for line in path.read_text().splitlines() if line.startswith("|")]


def result_path(out, condition, method, folder, seed):
    return out / "runs" / condition / method / folder / f"seed{seed}" / "result.json"


def test_study_selects_on_validation_reports_test_and_resumes(tmp_path):
    config_path = tmp_path / "study.yaml"
    config_path.write_text(f"out: {tmp_path / 'study'}\n" + STUDY)
    cfg = load_study_config(config_path)
    out = tmp_path / "study"
    logged = []
    report = run_study(cfg, log=logged.append)

    # Disjoint splits, in the files the study trained and evaluated on: no prompt in two splits or twice in one,
    # and no held-out prompt among the SFT demonstrations.
    for seed in (0, 1):
        data = out / "seeds" / f"seed{seed}" / "data"
        splits = {split: [row["prompt"] for row in read_jsonl(data / f"{split}_prompts.jsonl")]
                  for split in ("train", "validation", "test")}
        assert [len(splits[s]) for s in ("train", "validation", "test")] == [48, 12, 12]
        all_prompts = [prompt for prompts in splits.values() for prompt in prompts]
        assert len(set(all_prompts)) == len(all_prompts)
        demonstrated = {row["messages"][0]["content"] for row in read_jsonl(data / "sft.jsonl")}
        assert len(demonstrated) > 50 and not demonstrated & set(splits["validation"] + splits["test"])
        trained = {row["prompt"] for row in read_jsonl(out / "seeds" / f"seed{seed}" / "annotated" / "train.jsonl")}
        assert trained <= set(splits["train"])

    # Every run's answers are scored by the true reward, recomputed here from the answers file.
    run_dir = out / "runs" / "k4_reward_model" / "RAO" / "loss.beta_0.3" / "seed0"
    answers = json.loads((run_dir / "answers" / "answers.json").read_text())
    result = json.loads((run_dir / "result.json").read_text())
    assert len(answers) == 24
    validation = [true_reward(a["instruction"], a["output"]) for a in answers[:12]]
    test = [true_reward(a["instruction"], a["output"]) for a in answers[12:]]
    assert result["validation"]["true_reward"] == pytest.approx(statistics.fmean(validation))
    assert result["test"]["true_reward"] == pytest.approx(statistics.fmean(test))
    # The normaliser and the KL estimate are logged for every loss.
    assert {"prompt_logratio", "kl_estimate", "joint_logratio_best", "response_length"} <= set(result["training"]["final"])

    # Selection: per method the setting with the best mean validation true reward over the seeds.
    settings = {"RAO": ["loss.beta_0.3", "loss.beta_1.0"], "DPO": ["optimizer.lr_0.001", "optimizer.lr_0.003"]}
    for method, folders in settings.items():
        validation_means = [statistics.fmean(
            json.loads(result_path(out, "k4_reward_model", method, folder, seed).read_text())["validation"]["true_reward"]
            for seed in (0, 1)) for folder in folders]
        best = folders[validation_means.index(max(validation_means))]
        row = next(r for r in report["main"] if r["method"] == method)
        assert best.endswith(row["setting"].replace("=", "_"))
        chosen_test = [json.loads(result_path(out, "k4_reward_model", method, best, s).read_text())["test"]["true_reward"]
                       for s in (0, 1)]
        assert row["test"] == pytest.approx(mean_interval(chosen_test))
    assert [r["method"] for r in report["main"]] == ["SFT", "RAO", "DPO", "PPO"]
    # PPO samples and scores online with the reward model: it has the k ablation (samples per prompt), not true_reward.
    assert {(r["condition"], r["method"]) for r in report["ablations"]} == {
        (c, m) for c in ("k2_reward_model", "k4_true_reward") for m in ("RAO", "DPO")} | {("k2_reward_model", "PPO")}
    ppo_run = out / "runs" / "k4_reward_model" / "PPO" / "defaults" / "seed0"
    ppo_log = [json.loads(line) for line in (ppo_run / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "kl", "entropy", "clip_fraction"} <= {key for row in ppo_log for key in row}
    assert {"reward", "kl"} <= set(json.loads((ppo_run / "result.json").read_text())["training"]["final"])
    assert [r["loss.z0"] for r in report["sweeps"]] == [-2.0, 2.0]
    for figure in ("results.png", "fig2_sweep.png", "training_curves.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = table_lines(out / "study.md")

    # A test figure cannot move the selection: make every unchosen setting's test reward perfect, re-run (nothing
    # is retrained), and the chosen settings stay while the reported test figures of unchosen ones are not used.
    for method, folders in settings.items():
        chosen = next(r for r in report["main"] if r["method"] == method)["setting"].replace("=", "_")
        for folder in folders:
            if not folder.endswith(chosen):
                for seed in (0, 1):
                    path = result_path(out, "k4_reward_model", method, folder, seed)
                    doctored = json.loads(path.read_text())
                    doctored["test"]["true_reward"] = 1.0
                    path.write_text(json.dumps(doctored))
    logged.clear()
    again = run_study(cfg, log=logged.append)
    assert any("main grid: 10 runs, 10 done before" in line for line in logged)
    assert not any(": validation " in line for line in logged)  # no run trained again
    assert [r["setting"] for r in again["main"]] == [r["setting"] for r in report["main"]]
    assert [r["test"] for r in again["main"]] == [r["test"] for r in report["main"]]

    # Same seed, same tables: a deleted run is recomputed to the same numbers.
    shutil.rmtree(run_dir)
    run_study(cfg, log=logged.append)
    assert json.loads((run_dir / "result.json").read_text())["test"] == result["test"]
    assert json.loads((run_dir / "result.json").read_text())["validation"] == result["validation"]
    assert table_lines(out / "study.md") == tables


def test_selection_sees_only_validation_and_breaks_ties_by_grid_order():
    assert select_setting({"a": [0.2, 0.4], "b": [0.3, 0.35], "c": [0.1, 0.2]}) == "b"
    assert select_setting({"a": [0.3], "b": [0.3]}) == "a"


def test_intervals_are_student_t():
    mean, half = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert mean_interval([0.5])[0] == 0.5


def test_the_report_says_plainly_which_methods_beat_sft():
    # paired gains over SFT per seed: clearly above, clearly below, and spread across zero
    gains = {"A": [0.10, 0.12, 0.11], "B": [-0.05, -0.06, -0.055], "C": [0.10, -0.10, 0.0]}
    rows = [{"method": "SFT"}] + [{"method": m, "vs_sft": mean_interval(g)} for m, g in gains.items()]
    half_a = 4.303 * statistics.stdev(gains["A"]) / 3**0.5
    text = verdict(rows)
    assert text.startswith(f"Beat SFT on test with a 95% interval above zero: A (0.110 ± {half_a:.3f}). ")
    assert "Below SFT with an interval below zero: B (-0.055 ± " in text
    assert text.endswith("The other 1 methods are within their intervals of SFT.")
    one_seed = [{"method": "SFT"}] + [{"method": m, "vs_sft": mean_interval(g[:1])} for m, g in gains.items()]
    assert verdict(one_seed).startswith("One seed, so no intervals: test true reward above SFT's for 2 of 3 methods "
                                        "(A +0.100, C +0.100)")


def test_plan_ablations_at_the_chosen_setting_and_sweeps_override_it(tmp_path):
    cfg = OmegaConf.create(f"out: {tmp_path}\n" + STUDY)
    study = Study(cfg, log=lambda message: None)
    chosen = {"RAO": (("loss.beta", 1.0),), "DPO": (("optimizer.lr", 0.001),), "PPO": ()}
    runs = study.later_runs(chosen)
    k2 = Condition(2, "reward_model")
    assert Run("RAO", (("loss.beta", 1.0),), k2, 0) in runs
    assert Run("DPO", (("optimizer.lr", 0.001),), Condition(4, "true_reward"), 1) in runs
    main = Condition(4, "reward_model")
    assert Run("RAO", (("loss.beta", 1.0), ("loss.z0", -2.0)), main, 0) in runs
    assert Run("PPO", (), k2, 0) in runs and Run("PPO", (), Condition(4, "true_reward"), 0) not in runs
    assert len(runs) == 2 * (3 + 2) + 2 * 2  # seeds x (k2: 3 methods, true_reward: 2 methods) + the z0 sweep
    # A sweep point equal to a grid point is that run (same key order, same folder), not a second one.
    two_keys = {**chosen, "RAO": (("loss.beta", 1.0), ("optimizer.lr", 0.001))}
    swept = Study(OmegaConf.create(f"out: {tmp_path}\n" + STUDY.replace("loss.z0: [-2.0, 2.0]", "loss.beta: [0.3]")),
                  log=lambda message: None).later_runs(two_keys)
    assert Run("RAO", (("loss.beta", 0.3), ("optimizer.lr", 0.001)), main, 0) in swept
