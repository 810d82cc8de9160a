"""Every loss trains the tiny config through recipes/rao_distributed.py, switched by config or CLI only."""

import math

import pytest
from omegaconf import OmegaConf

from rao_tune.training.metrics import read_disk_log

from conftest import REPO_ROOT
from recipe_runner import load_recipe, record_model_builds, run_recipe_in_process

pytestmark = pytest.mark.slow
TINY_RAO = REPO_ROOT / "configs" / "tiny_rao.yaml"
BASELINES = {  # config -> needs a reference model
    "tiny_dpo": True, "tiny_ipo": True, "tiny_cal_dpo": True, "tiny_distillation": True, "tiny_reward_aware_rpo": True,
    "tiny_reward_partition": True, "tiny_simpo": False, "tiny_slic_hf": False, "tiny_orpo": False, "tiny_rloo": False,
    "tiny_qrpo": True, "tiny_rebel": True,
}
COMPARABLE = {"loss", "implicit_reward", "target_reward", "logratio_best", "logratio_worst", "implicit_reward_best",
              "implicit_reward_worst", "implicit_accuracy", "reward_correlation"}


def run_counting_models(monkeypatch, tiny_assets, config, output_dir, *overrides):
    """Run 3 steps; return how many models (policy, reference) the recipe built."""
    recipe = load_recipe("rao_distributed")
    built = record_model_builds(monkeypatch, recipe)
    run_recipe_in_process(monkeypatch, recipe, config, f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}",
                          "epochs=1", "max_steps_per_epoch=3", *overrides)
    return len(built)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_each_baseline_config_trains_and_logs_the_same_metrics(monkeypatch, tmp_path, tiny_assets, name):
    config = REPO_ROOT / "configs" / f"{name}.yaml"
    # The baseline configs are the RAO config with another loss: same data, model, optimizer, schedule.
    baseline, rao = OmegaConf.load(config), OmegaConf.load(TINY_RAO)
    for cfg in (baseline, rao):
        del cfg["loss"], cfg["output_dir"]
    assert baseline == rao

    models = run_counting_models(monkeypatch, tiny_assets, config, tmp_path)
    assert models == (2 if BASELINES[name] else 1)  # reference-free losses load no reference model
    steps = read_disk_log(tmp_path / "logs")
    assert sorted(step for step in steps if step > 0) == [1, 2, 3]
    assert COMPARABLE <= set(steps[3])
    assert math.isfinite(steps[3]["loss"])


def test_cli_switches_the_tiny_rao_config_to_another_loss(monkeypatch, tmp_path, tiny_assets):
    models = run_counting_models(
        monkeypatch, tiny_assets, TINY_RAO, tmp_path, "~loss.z0", "loss._component_=rao_tune.losses.SimPOLoss",
        "loss.beta=2.0", "loss.gamma=0.5", "loss.pairs=all_ordered",
    )
    assert models == 1
    assert sorted(step for step in read_disk_log(tmp_path / "logs") if step > 0) == [1, 2, 3]


def test_a_reference_free_loss_can_log_true_log_ratios(monkeypatch, tmp_path, tiny_assets):
    """monitor_with_reference loads the reference for metrics only: logratio_* become log pi/pi_ref (near 0 at
    step 1, where policy = reference), where without it they are log pi (far below 0)."""
    config = REPO_ROOT / "configs" / "tiny_simpo.yaml"
    assert run_counting_models(monkeypatch, tiny_assets, config, tmp_path / "with", "monitor_with_reference=True") == 2
    assert run_counting_models(monkeypatch, tiny_assets, config, tmp_path / "without") == 1
    with_reference = read_disk_log(tmp_path / "with" / "logs")[1]
    without = read_disk_log(tmp_path / "without" / "logs")[1]
    assert abs(with_reference["logratio_best"]) < 1e-4
    assert without["logratio_best"] < -5
    assert with_reference["loss"] == pytest.approx(without["loss"])  # the loss never sees the reference
