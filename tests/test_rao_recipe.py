"""recipes/rao_distributed.py end to end on the tiny config: it trains, resumes, stops on NaN, saves HF."""

import subprocess
import sys
from functools import partial

import pytest
import torch
from torchtune import training
from torchtune.models.llama3 import llama3

from rao_tune.data import collate_packed_batch, collate_reward_batch, reward_dataset
from rao_tune.losses import RAOLoss
from rao_tune.training.logprobs import sequence_logps
from rao_tune.training.checkpoint import complete_checkpoints, read_trainer_state
from rao_tune.training.metrics import read_disk_log
from rao_tune.training.reference import compute_reference_logps

from conftest import REPO_ROOT
from recipe_runner import (
    StopAfterFirstEpoch,
    crash_after_first_checkpoint,
    load_recipe,
    paper_config_on_tiny_assets,
    record_model_builds,
    run_recipe_in_process,
)

CONFIG = REPO_ROOT / "configs" / "tiny_rao.yaml"
pytestmark = pytest.mark.slow


def load_recipe_module():
    return load_recipe("rao_distributed")


def run_in_process(monkeypatch, tiny_assets, output_dir, *overrides, recipe=None):
    args = [f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}", *overrides]
    run_recipe_in_process(monkeypatch, recipe or load_recipe_module(), CONFIG, *args)


def logged_steps(output_dir):
    return read_disk_log(output_dir / "logs")


def load_tune_model(checkpoint_dir, tiny_assets, tmp_path):
    checkpointer = training.FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_files=sorted(p.name for p in checkpoint_dir.glob("*.safetensors")),
        model_type="LLAMA3",
        output_dir=str(tmp_path / "unused"),
    )
    model = llama3(**tiny_assets["model_kwargs"])
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    return model.eval()


def best_and_worst_logratios(tiny_assets, tokenizer, policy, reference):
    """Mean log pi/pi_ref over the whole training set of each prompt's highest- and lowest-reward response."""
    dataset = reward_dataset(tokenizer, source="json", data_files=str(tiny_assets["train_data_path"]), max_seq_len=128)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=partial(collate_reward_batch, pad_id=0))
    best, worst = [], []
    with torch.no_grad():
        for batch in loader:
            logratio = sequence_logps(policy, batch)[0] - sequence_logps(reference, batch)[0]
            for prompt in batch["prompt_ids"].unique():
                members = (batch["prompt_ids"] == prompt).nonzero().squeeze(-1)
                rewards = batch["rewards"][members]
                if rewards.max() > rewards.min():
                    best.append(logratio[members[rewards.argmax()]])
                    worst.append(logratio[members[rewards.argmin()]])
    return torch.stack(best).mean().item(), torch.stack(worst).mean().item()


def test_one_process_trains_raises_best_responses_and_saves_hf(monkeypatch, tmp_path, tiny_assets, tokenizer):
    output_dir = tmp_path / "run"
    run_in_process(monkeypatch, tiny_assets, output_dir)

    steps = logged_steps(output_dir)
    assert steps[0]["calibrated/z0"] == pytest.approx(RAOLoss(beta=0.1, z0="auto").calibrate(
        reward_dataset(tokenizer, source="json", data_files=str(tiny_assets["train_data_path"])).all_rewards())["z0"])
    train_steps = [steps[s] for s in sorted(steps) if s > 0]
    assert len(train_steps) == 3 * 16  # 64 prompts / batch 4, 3 epochs
    for key in ("loss", "lr", "tokens_per_second", "implicit_reward", "target_reward", "logratio_best",
                "logratio_worst", "implicit_accuracy", "grad_norm"):
        assert key in train_steps[-1], key
    first_epoch_loss = sum(s["loss"] for s in train_steps[:16]) / 16
    last_epoch_loss = sum(s["loss"] for s in train_steps[-16:]) / 16
    assert last_epoch_loss < 0.7 * first_epoch_loss

    # RAO's point: the highest-reward responses gain probability, not only a wider gap.
    policy = load_tune_model(output_dir / "epoch_2", tiny_assets, tmp_path)
    reference = load_tune_model(tiny_assets["checkpoint_dir"], tiny_assets, tmp_path)
    best, worst = best_and_worst_logratios(tiny_assets, tokenizer, policy, reference)
    assert best > 0.5 and worst < best - 1.0

    # The saved folder is a Hugging Face checkpoint: transformers reads it and gives the same logits.
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(output_dir / "epoch_2")).eval()
    tokens = torch.randint(0, tiny_assets["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, policy(tokens), atol=1e-4, rtol=1e-4)


def count_models_built(monkeypatch, recipe):
    """Make ``recipe`` count the FSDP models it builds (policy, reference)."""
    return record_model_builds(monkeypatch, recipe)


@pytest.mark.parametrize("loss", ["rao", "dpo", "simpo"])
def test_packed_run_with_precomputed_reference_matches_padded_online_run(monkeypatch, tmp_path, tiny_assets, loss):
    """The tiny configs' defaults (packed prefix-shared rows, fused log-probs, reference log-probs computed once)
    train exactly like one padded row per response with the reference model run at every step."""
    config = REPO_ROOT / "configs" / f"tiny_{loss}.yaml"
    common = [f"assets_dir={tiny_assets['out_dir']}", "epochs=1", "max_steps_per_epoch=6"]
    run_recipe_in_process(monkeypatch, load_recipe_module(), config, f"output_dir={tmp_path / 'cheap'}", *common)
    run_recipe_in_process(monkeypatch, load_recipe_module(), config, f"output_dir={tmp_path / 'plain'}", *common,
                          "pack_responses=False", "reference_logps=online")
    cheap, plain = logged_steps(tmp_path / "cheap"), logged_steps(tmp_path / "plain")
    for step in range(1, 7):
        for key in ("loss", "grad_norm", "implicit_reward", "logratio_best", "logratio_worst"):
            # fp32 sums over ~12-token responses in two layouts differ by a few 1e-6.
            assert cheap[step][key] == pytest.approx(plain[step][key], rel=1e-4, abs=1e-5), (step, key)
    cheap_weights = load_tune_model(tmp_path / "cheap" / "epoch_0", tiny_assets, tmp_path).state_dict()
    plain_weights = load_tune_model(tmp_path / "plain" / "epoch_0", tiny_assets, tmp_path).state_dict()
    for name, value in plain_weights.items():
        torch.testing.assert_close(cheap_weights[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert (tmp_path / "cheap" / "reference_logps").exists() == (loss != "simpo")


def test_a_row_budget_too_small_for_the_data_stops_before_training(monkeypatch, tmp_path, tiny_assets):
    # The tiny data's longest prompt + response has 76 tokens.
    with pytest.raises(ValueError, match=r"max_row_tokens=40 must hold the longest prompt \+ response of the data \(76"):
        run_in_process(monkeypatch, tiny_assets, tmp_path / "run", "max_row_tokens=40")
    assert not (tmp_path / "run" / "reference_logps").exists()


def test_resumed_run_reproduces_uninterrupted_run(monkeypatch, tmp_path, tiny_assets):
    settings = ["epochs=2", "max_steps_per_epoch=5"]
    run_in_process(monkeypatch, tiny_assets, tmp_path / "full", *settings)

    recipe = load_recipe_module()
    crash_after_first_checkpoint(monkeypatch, recipe.RAORecipeDistributed)
    with pytest.raises(StopAfterFirstEpoch):
        run_in_process(monkeypatch, tiny_assets, tmp_path / "resumed", *settings, recipe=recipe)
    assert not (tmp_path / "resumed" / "epoch_1").exists()
    for log_file in (tmp_path / "resumed" / "logs").glob("*.txt"):
        log_file.rename(log_file.with_suffix(".first"))

    recipe = load_recipe_module()
    built = count_models_built(monkeypatch, recipe)
    run_in_process(monkeypatch, tiny_assets, tmp_path / "resumed", *settings, "resume_from_checkpoint=True",
                   recipe=recipe)
    assert len(built) == 1  # the policy: the reference log-probs computed before the crash are reused
    assert len(list((tmp_path / "resumed" / "reference_logps").glob("*.pt"))) == 1
    full, resumed = logged_steps(tmp_path / "full"), logged_steps(tmp_path / "resumed")
    assert sorted(s for s in resumed if s > 0) == [6, 7, 8, 9, 10]
    for step in range(6, 11):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5, abs=1e-7), step
        assert resumed[step]["lr"] == pytest.approx(full[step]["lr"])
    full_weights = load_tune_model(tmp_path / "full" / "epoch_1", tiny_assets, tmp_path).state_dict()
    resumed_weights = load_tune_model(tmp_path / "resumed" / "epoch_1", tiny_assets, tmp_path).state_dict()
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(monkeypatch, tmp_path, tiny_assets):
    calls = {"n": 0}
    forward = RAOLoss.forward

    def nan_from_the_fourth_step(self, batch):
        calls["n"] += 1
        output = forward(self, batch)
        if calls["n"] >= 4:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(RAOLoss, "forward", nan_from_the_fourth_step)
    output_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4 \(epoch 2\); no update was applied"):
        run_in_process(monkeypatch, tiny_assets, output_dir, "epochs=3", "max_steps_per_epoch=3")
    assert (output_dir / "epoch_0").exists() and not (output_dir / "epoch_1").exists()
    (last,) = complete_checkpoints(output_dir)  # the first epoch's end; nothing after the refused update
    assert read_trainer_state(last)["progress"] == {"epoch": 1, "step_in_epoch": 0, "global_step": 3}
    weights = load_tune_model(output_dir / "epoch_0", tiny_assets, tmp_path).state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_two_processes_train_with_gloo(tmp_path, tiny_assets, tokenizer):
    output_dir = tmp_path / "run2"
    command = [
        sys.executable, "-m", "torchtune._cli.tune", "run", "--nproc_per_node", "2", "recipes/rao_distributed.py",
        "--config", "configs/tiny_rao.yaml", f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}",
        "batch_size=2",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 processes" in result.stdout + result.stderr
    steps = logged_steps(output_dir)
    assert sorted(s for s in steps if s > 0) == list(range(1, 3 * 16 + 1))  # 64 prompts / (2 ranks x 2)
    policy = load_tune_model(output_dir / "epoch_2", tiny_assets, tmp_path)
    reference = load_tune_model(tiny_assets["checkpoint_dir"], tiny_assets, tmp_path)
    best, worst = best_and_worst_logratios(tiny_assets, tokenizer, policy, reference)
    assert best > 0.5 and worst < best - 1.0

    # Each process computed the reference log-probs of half the prompts; together they equal one process's.
    (table_path,) = (output_dir / "reference_logps").glob("*.pt")
    stored = torch.load(table_path, weights_only=True)
    dataset = reward_dataset(tokenizer, source="json", data_files=str(tiny_assets["train_data_path"]), max_seq_len=128)
    one_process = compute_reference_logps(
        reference.requires_grad_(False), dataset, collate_fn=partial(collate_packed_batch, max_row_tokens=256),
        batch_size=4, device=torch.device("cpu"), world_size=1, rank=0, chunk_tokens=1024)
    torch.testing.assert_close(stored["response_logps"], one_process.response_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stored["prompt_logps"], one_process.prompt_logps, rtol=1e-5, atol=1e-5)


def test_llama3_8b_config_runs_two_steps_with_its_tiny_sibling(monkeypatch, tmp_path, tiny_assets):
    """The paper config as shipped (loss, optimizer, schedule, UltraFeedback-binarized dataset builder), with
    only the model, tokenizer, checkpoint, data files and device swapped for tiny local ones."""
    output_dir = tmp_path / "run"
    run_recipe_in_process(
        monkeypatch, load_recipe_module(), REPO_ROOT / "configs" / "llama3_8b_rao.yaml", f"output_dir={output_dir}",
        *paper_config_on_tiny_assets(tiny_assets, tmp_path, CONFIG), "batch_size=2", "gradient_accumulation_steps=2",
        "epochs=1",
    )
    steps = logged_steps(output_dir)
    assert sorted(steps) == [1, 2]  # 8 prompts / (batch 2 x accumulation 2)
    assert steps[1]["lr"] == pytest.approx(5e-7 * 1 / 100)  # warm-up step 1 of 100
    # z0 = 50 against rewards in [0, 10] and beta 0.1: targets r/beta - z0 in [-50, 50], loss = mean (r - 5)^2 at step 1
    assert steps[1]["implicit_reward"] == pytest.approx(0.1 * 50)
    assert (output_dir / "epoch_0" / "config.json").exists()
