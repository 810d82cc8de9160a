"""recipes/reward_model_distributed.py end to end on the tiny marker-word preference set."""

import subprocess
import sys

import pytest
import torch
from torchtune import training
from transformers import AutoModelForSequenceClassification

from rao_tune.data import collate_packed_batch, collate_reward_batch, reward_dataset
from rao_tune.models import RewardModelHFCheckpointer, last_token_scores, reward_model
from rao_tune.training.attention import model_inputs
from rao_tune.training.metrics import read_disk_log

from conftest import REPO_ROOT
from recipe_runner import (
    StopAfterFirstEpoch,
    crash_after_first_checkpoint,
    load_recipe,
    paper_config_on_tiny_assets,
    run_recipe_in_process,
)

CONFIG = REPO_ROOT / "configs" / "tiny_reward_model.yaml"
pytestmark = pytest.mark.slow


def train(monkeypatch, tiny_assets, output_dir, *overrides, recipe=None):
    args = [f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}", *overrides]
    run_recipe_in_process(monkeypatch, recipe or load_recipe("reward_model_distributed"), CONFIG, *args)


def heldout_batches(tiny_assets, tokenizer):
    dataset = reward_dataset(tokenizer, source="json", data_files=str(tiny_assets["preference_heldout_path"]))
    samples = [dataset[i] for i in range(len(dataset))]
    padded = collate_reward_batch(samples, pad_id=tokenizer.pad_id)
    return padded, collate_packed_batch(samples, pad_id=tokenizer.pad_id, max_row_tokens=256)


def test_reward_model_learns_the_preference_and_saves_for_transformers(monkeypatch, tmp_path, tiny_assets, tokenizer):
    train(monkeypatch, tiny_assets, tmp_path / "run", "epochs=1")
    steps = read_disk_log(tmp_path / "run" / "logs")
    last = steps[max(steps)]
    assert last["eval_pairs"] == 64  # every held-out pair, once
    assert last["eval_accuracy"] >= 0.9
    assert steps[1]["loss"] > 0.3 and last["eval_loss"] < 0.3

    # The saved epoch is a LlamaForSequenceClassification whose scores are ours.
    saved = tmp_path / "run" / "epoch_0"
    hf_model = AutoModelForSequenceClassification.from_pretrained(saved, torch_dtype=torch.float32).eval()
    ours = reward_model("torchtune.models.llama3.llama3", **tiny_assets["model_kwargs"])
    ours.load_state_dict(RewardModelHFCheckpointer(str(saved), str(tmp_path / "x")).load_checkpoint()[training.MODEL_KEY])
    batch, packed = heldout_batches(tiny_assets, tokenizer)
    with torch.no_grad():
        hf_scores = hf_model(batch["tokens"]).logits.squeeze(-1)  # padded rows, one per response
        # ours over packed rows: each prompt once, its responses after it
        our_scores = last_token_scores(ours.eval()(packed["tokens"], **model_inputs(packed)), packed["last_positions"])
    torch.testing.assert_close(hf_scores, our_scores, atol=1e-4, rtol=1e-4)
    # transformers' scores order the held-out pairs as the logged accuracy says
    chosen = batch["rewards"] == 1.0
    hf_accuracy = (hf_scores[chosen] > hf_scores[~chosen]).float().mean().item()
    assert hf_accuracy == pytest.approx(last["eval_accuracy"])


def test_resumed_reward_model_run_matches_uninterrupted(monkeypatch, tmp_path, tiny_assets):
    settings = ["epochs=2", "max_steps_per_epoch=3"]
    train(monkeypatch, tiny_assets, tmp_path / "full", *settings)

    recipe = load_recipe("reward_model_distributed")
    crash_after_first_checkpoint(monkeypatch, recipe.RewardModelRecipeDistributed)
    with pytest.raises(StopAfterFirstEpoch):
        train(monkeypatch, tiny_assets, tmp_path / "resumed", *settings, recipe=recipe)
    train(monkeypatch, tiny_assets, tmp_path / "resumed", *settings, "resume_from_checkpoint=True")

    full, resumed = read_disk_log(tmp_path / "full" / "logs"), read_disk_log(tmp_path / "resumed" / "logs")
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5), step
    final = [RewardModelHFCheckpointer(str(tmp_path / run / "epoch_1"), str(tmp_path / "x")).load_checkpoint()
             for run in ("full", "resumed")]
    for name, value in final[0][training.MODEL_KEY].items():
        torch.testing.assert_close(final[1][training.MODEL_KEY][name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_two_processes_train_and_evaluate_every_heldout_pair_once(tmp_path, tiny_assets):
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torchtune._cli.tune", "run", "--nproc_per_node", "2",
        "recipes/reward_model_distributed.py", "--config", "configs/tiny_reward_model.yaml",
        f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}", "epochs=1", "max_steps_per_epoch=6",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = read_disk_log(output_dir / "logs")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert steps[6]["eval_pairs"] == 64
    assert steps[6]["pairs"] == 16  # 2 ranks x 8 prompts, one pair each
    assert (output_dir / "epoch_0" / "model.safetensors.index.json").exists()


def test_llama3_8b_reward_model_config_runs_two_steps_with_its_tiny_sibling(monkeypatch, tmp_path, tiny_assets):
    """The shipped 8B reward-model config, with only model sizes, tokenizer, weights, data and device swapped."""
    output_dir = tmp_path / "run"
    run_recipe_in_process(
        monkeypatch, load_recipe("reward_model_distributed"), REPO_ROOT / "configs" / "llama3_8b_reward_model.yaml",
        f"output_dir={output_dir}", *paper_config_on_tiny_assets(tiny_assets, tmp_path, CONFIG),
        "eval_dataset.source=json", f"eval_dataset.data_files={tmp_path / 'uf.jsonl'}", "eval_dataset.split=train",
        "checkpointer.pad_token_id=514", "batch_size=2", "gradient_accumulation_steps=2",
    )
    steps = read_disk_log(output_dir / "logs")
    assert sorted(steps) == [1, 2]  # 8 pairs / (batch 2 x accumulation 2)
    assert steps[1]["lr"] == pytest.approx(2e-6 / 50)  # warm-up step 1 of 50
    assert steps[1]["pairs"] == 4 and steps[2]["eval_pairs"] == 8
    config = (output_dir / "epoch_0" / "config.json").read_text()
    assert "LlamaForSequenceClassification" in config
