"""recipes/sft_distributed.py trains the assistant turns of the tiny chat data, and only those."""

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config, training

from rao_tune.data import collate_reward_batch, reward_dataset
from rao_tune.training.logprobs import sequence_logps
from rao_tune.training.metrics import read_disk_log

from conftest import REPO_ROOT
from recipe_runner import load_recipe, run_recipe_in_process

CONFIG = REPO_ROOT / "configs" / "tiny_sft.yaml"
pytestmark = pytest.mark.slow


def load(checkpoint_dir, tiny_assets, tmp_path):
    model = config.instantiate(OmegaConf.load(CONFIG).model)
    checkpointer = training.FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir), checkpoint_files=sorted(p.name for p in checkpoint_dir.glob("*.safetensors")),
        model_type="LLAMA3", output_dir=str(tmp_path / "unused"),
    )
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    return model.eval()


def test_sft_raises_the_likelihood_of_the_trained_answers_only(monkeypatch, tmp_path, tiny_assets, tokenizer):
    run_recipe_in_process(monkeypatch, load_recipe("sft_distributed"), CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                          f"output_dir={tmp_path}", "epochs=2")
    steps = read_disk_log(tmp_path / "logs")
    assert len(steps) == 32 and steps[32]["loss"] < steps[1]["loss"] - 2.0

    # The SFT data pairs each prompt with its best response: those gain log-prob; the prompt is never a target.
    before, after = load(tiny_assets["checkpoint_dir"], tiny_assets, tmp_path), load(tmp_path / "epoch_1", tiny_assets, tmp_path)
    data = reward_dataset(tokenizer, source="json", data_files=str(tiny_assets["train_data_path"]))
    batch = collate_reward_batch([data[i] for i in range(16)], pad_id=tokenizer.pad_id)
    best = torch.tensor([i for i in range(len(batch["rewards"]))
                         if batch["rewards"][i] == batch["rewards"][batch["prompt_ids"] == batch["prompt_ids"][i]].max()])
    with torch.no_grad():
        response_before, _ = sequence_logps(before, batch)
        response_after, _ = sequence_logps(after, batch)
    per_token_gain = (response_after - response_before)[best] / batch["response_lengths"][best]
    assert per_token_gain.mean() > 1.0
    # every step trained only assistant tokens: far fewer than all tokens
    assert steps[1]["trained_tokens"] < 0.5 * steps[1]["tokens_per_second"] * steps[1]["step_time"]
