"""``optimizer_in_bwd=True``: each parameter's optimizer steps inside backward and its gradient is freed. Checked
against plain AdamW over the whole model (same update up to float rounding: AdamW's foreach kernel groups the
arithmetic differently from one call per parameter, so the comparison has a tolerance), in a unit test and in a
recipe run, and a run with it resumes to the uninterrupted run's weights."""

import pytest
import torch
from torch import nn
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from rao_tune.training import loop
from rao_tune.training.metrics import read_metrics
from rao_tune.training.optim_in_backward import OptimizerInBackward

from conftest import REPO_ROOT
from recipe_runner import StopAfterFirstEpoch, crash_after_first_checkpoint, load_recipe, run_recipe_in_process
from test_long_runs import final_weights_of
from test_preflight import refused

CONFIG = REPO_ROOT / "configs" / "tiny_rao.yaml"


def two_layer_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def train(model, optimizer, *, steps=4):
    """Four steps of a regression under a warm-up-then-cosine schedule; returns each step's gradients as seen
    after backward (None where the optimizer freed them)."""
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=steps)
    generator = torch.Generator().manual_seed(1)
    grads_after_backward = []
    for _ in range(steps):
        inputs, targets = torch.randn(5, 6, generator=generator), torch.randn(5, 3, generator=generator)
        nn.functional.mse_loss(model(inputs), targets).backward()
        grads_after_backward.append([param.grad for param in model.parameters()])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return grads_after_backward


def test_the_step_in_backward_equals_adamw_over_the_whole_model():
    plain_model, in_backward_model = two_layer_model(), two_layer_model()
    options = {"lr": 0.05, "weight_decay": 0.1, "betas": (0.9, 0.95)}
    plain_grads = train(plain_model, torch.optim.AdamW(plain_model.parameters(), **options))
    in_backward = OptimizerInBackward([{"params": list(in_backward_model.parameters())}],
                                      lambda groups: torch.optim.AdamW(groups, **options))
    in_backward_grads = train(in_backward_model, in_backward)

    assert all(grad is not None for grads in plain_grads for grad in grads)
    assert all(grad is None for grads in in_backward_grads for grad in grads)  # freed inside backward
    assert len(in_backward.optimizers) == 4 and len(in_backward.param_groups) == 1  # one per parameter; as configured
    moved = False
    for plain, stepped, start in zip(plain_model.parameters(), in_backward_model.parameters(),
                                     two_layer_model().parameters()):
        torch.testing.assert_close(stepped, plain, rtol=1e-5, atol=1e-6)
        moved |= not torch.allclose(plain, start)
    assert moved  # (equal weights under a warm-up schedule: the schedule reached every parameter's optimizer)


SHORT = ["epochs=2", "max_steps_per_epoch=3", "clip_grad_norm=null"]


def train_tiny(monkeypatch, tiny_assets, output_dir, *overrides, recipe=None):
    run_recipe_in_process(monkeypatch, recipe or load_recipe("rao_distributed"), CONFIG,
                          f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}", *SHORT, *overrides)
    return output_dir


@pytest.mark.slow
def test_a_run_with_the_step_in_backward_trains_like_plain_adamw_and_resumes(monkeypatch, tmp_path, tiny_assets):
    start = final_weights_of(tiny_assets["checkpoint_dir"], tiny_assets, tmp_path)
    plain = train_tiny(monkeypatch, tiny_assets, tmp_path / "plain")
    built = []
    monkeypatch.setattr(loop, "OptimizerInBackward", lambda *args: built.append(OptimizerInBackward(*args)) or built[-1])
    in_backward = train_tiny(monkeypatch, tiny_assets, tmp_path / "in_backward", "optimizer_in_bwd=True")
    assert len(built) == 1 and len(built[0].optimizers) == sum(1 for _ in start)  # one per trained tensor
    plain_weights = final_weights_of(plain / "epoch_1", tiny_assets, tmp_path)
    in_backward_weights = final_weights_of(in_backward / "epoch_1", tiny_assets, tmp_path)
    for name, value in plain_weights.items():
        torch.testing.assert_close(in_backward_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.allclose(plain_weights[name], start[name]) for name in start)

    # Killed after the first epoch's checkpoint (per-parameter optimizer states in DCP), then resumed.
    recipe = load_recipe("rao_distributed")
    crash_after_first_checkpoint(monkeypatch, recipe.RAORecipeDistributed)
    with pytest.raises(StopAfterFirstEpoch):
        train_tiny(monkeypatch, tiny_assets, tmp_path / "resumed", "optimizer_in_bwd=True", recipe=recipe)
    monkeypatch.undo()
    # Its optimizer state has one group per parameter: resuming it without optimizer_in_bwd is refused up front.
    with pytest.raises(ValueError, match=r"other settings optimizer_in_bwd=True \(now False\)"):
        train_tiny(monkeypatch, tiny_assets, tmp_path / "resumed", "resume_from_checkpoint=True")
    resumed = train_tiny(monkeypatch, tiny_assets, tmp_path / "resumed", "optimizer_in_bwd=True",
                         "resume_from_checkpoint=True")
    resumed_weights = final_weights_of(resumed / "epoch_1", tiny_assets, tmp_path)
    for name, value in in_backward_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("overrides, message", [
    (["clip_grad_norm=1.0"], r"optimizer_in_bwd=True steps each parameter inside backward, before every gradient's "
                             r"norm is known: set clip_grad_norm=null"),
    (["clip_grad_norm=null", "gradient_accumulation_steps=2"],
     r"optimizer_in_bwd=True steps after every backward: set gradient_accumulation_steps=1"),
])
def test_the_step_in_backward_refuses_clipping_and_accumulation(monkeypatch, tmp_path, tiny_assets, overrides, message):
    refused(monkeypatch, tiny_assets, tmp_path, message, "optimizer_in_bwd=True", *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("in_backward", [False, True])
def test_8bit_adamw_trains_close_to_adamw_and_resumes(monkeypatch, tmp_path, tiny_assets, in_backward):
    """torchao's AdamW with 8-bit states (block-quantized moments), named in the config, alone or stepped in
    backward: its step checkpoint (quantized states in DCP) resumes to the uninterrupted run's weights, and its
    losses stay near plain AdamW's (quantized moments are an approximation: a loose bound). (AdamW4bit fails
    here, torch 2.13 on CPU under FSDP2: "wrong number of dimensions1 for op: input" in its compiled step.)"""
    optimizer = "torchao.optim.AdamW8bit"
    overrides = [f"optimizer._component_={optimizer}", "~optimizer.fused", f"optimizer_in_bwd={in_backward}"]
    plain = train_tiny(monkeypatch, tiny_assets, tmp_path / "plain")
    low_bit = train_tiny(monkeypatch, tiny_assets, tmp_path / "low_bit", *overrides)
    plain_losses, low_bit_losses = losses_of(plain), losses_of(low_bit)
    assert len(low_bit_losses) == 6 and low_bit_losses != plain_losses
    assert low_bit_losses == pytest.approx(plain_losses, rel=0.1)

    recipe = load_recipe("rao_distributed")
    crash_after_first_checkpoint(monkeypatch, recipe.RAORecipeDistributed)
    with pytest.raises(StopAfterFirstEpoch):
        train_tiny(monkeypatch, tiny_assets, tmp_path / "resumed", *overrides, recipe=recipe)
    monkeypatch.undo()
    resumed = train_tiny(monkeypatch, tiny_assets, tmp_path / "resumed", *overrides, "resume_from_checkpoint=True")
    assert losses_of(resumed) == pytest.approx(low_bit_losses, rel=1e-5)
    expected = final_weights_of(low_bit / "epoch_1", tiny_assets, tmp_path)
    resumed_weights = final_weights_of(resumed / "epoch_1", tiny_assets, tmp_path)
    for name, value in expected.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def losses_of(run_dir):
    return [metrics["loss"] for step, metrics in sorted(read_metrics(run_dir).items()) if "loss" in metrics]
