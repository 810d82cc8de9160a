"""DRO: the loss against its formula, and recipes/rao_distributed.py training the policy with its value network."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import LlamaModel

from rao_tune.data import collate_packed_batch, collate_reward_batch, reward_dataset
from rao_tune.losses import DROLoss, ResponseLogProbs
from rao_tune.models import init_score_head, reward_model
from rao_tune.training.checkpoint import complete_checkpoints
from rao_tune.training.metrics import read_disk_log
from rao_tune.training.value import prompt_values

from conftest import REPO_ROOT
from recipe_runner import StopAfterFirstEpoch, crash_after_first_checkpoint, load_recipe, run_recipe_in_process

CONFIG = REPO_ROOT / "configs" / "tiny_dro.yaml"


def test_dro_loss_gradients_and_implicit_reward_match_the_formula():
    torch.manual_seed(0)
    prompt_ids = torch.tensor([0, 0, 0, 1, 2, 2, 3])  # one to three responses per prompt
    policy = torch.randn(7, dtype=torch.float64, requires_grad=True)
    reference, rewards = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    prompt_values = torch.randn(4, dtype=torch.float64, requires_grad=True)  # V(x), one per prompt
    tau = 0.3
    output = DROLoss(tau=tau)(ResponseLogProbs(
        policy_logps=policy, policy_prompt_logps=torch.zeros(7), reference_logps=reference,
        reference_prompt_logps=torch.zeros(7), rewards=rewards, prompt_ids=prompt_ids,
        response_lengths=torch.ones(7), values=prompt_values[prompt_ids]))
    output.loss.backward()

    # Independently, one trajectory at a time: 1/2 (r - V(x) - tau log pi/pi_ref)^2, mean per prompt, then over prompts.
    members = {p: [i for i in range(7) if int(prompt_ids[i]) == p] for p in range(4)}
    with torch.no_grad():
        residual = [float(rewards[i] - prompt_values[int(prompt_ids[i])] - tau * (policy[i] - reference[i]))
                    for i in range(7)]
    expected = sum(sum(0.5 * residual[i] ** 2 for i in m) / len(m) for m in members.values()) / 4
    assert output.loss.item() == pytest.approx(expected, rel=1e-12)
    for i in range(7):  # d/d log pi(y_i|x) = -tau * residual_i / (4 * k_x)
        k = len(members[int(prompt_ids[i])])
        assert policy.grad[i].item() == pytest.approx(-tau * residual[i] / (4 * k), rel=1e-10)
    for p, m in members.items():  # d/dV(x) = -sum of its residuals / (4 * k_x): V moves to the mean target
        assert prompt_values.grad[p].item() == pytest.approx(-sum(residual[i] for i in m) / (4 * len(m)), rel=1e-10)
    torch.testing.assert_close(output.implicit_rewards, (tau * (policy - reference) + prompt_values[prompt_ids]).detach())


def test_dro_loss_refuses_a_batch_without_values_and_a_bad_tau():
    with pytest.raises(ValueError, match="tau must be > 0"):
        DROLoss(tau=0.0)
    batch = ResponseLogProbs(*(torch.zeros(2),) * 5, prompt_ids=torch.zeros(2, dtype=torch.long),
                             response_lengths=torch.ones(2))
    with pytest.raises(ValueError, match="value model"):
        DROLoss()(batch)


def test_value_of_each_prompt_is_read_at_its_last_token_from_the_prompts_alone(tiny_assets):
    """V(x) from either batch layout equals the value model run on the prompt by itself, for every response."""
    torch.manual_seed(0)
    value_model = reward_model("torchtune.models.llama3.llama3", **tiny_assets["model_kwargs"]).eval()
    samples = [{"prompt_tokens": [1, 5, 9, 11], "response_tokens": [[20, 21], [22]], "rewards": [0.0, 1.0]},
               {"prompt_tokens": [1, 7], "response_tokens": [[30, 31, 32]], "rewards": [0.5]},
               {"prompt_tokens": [1, 8, 8, 8, 8, 2], "response_tokens": [[40], [41, 42], [43]], "rewards": [0.0] * 3}]
    with torch.no_grad():
        alone = [value_model(torch.tensor([s["prompt_tokens"]]))[0, -1, 0] for s in samples]
        expected = torch.stack([alone[i] for i, s in enumerate(samples) for _ in s["response_tokens"]])
        for batch in (collate_packed_batch(samples, pad_id=0, max_row_tokens=12), collate_reward_batch(samples, pad_id=0)):
            torch.testing.assert_close(prompt_values(value_model, batch), expected, atol=1e-5, rtol=1e-5)


def run(monkeypatch, tiny_assets, output_dir, *overrides, recipe=None):
    run_recipe_in_process(monkeypatch, recipe or load_recipe("rao_distributed"), CONFIG,
                          f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}", *overrides)


@pytest.mark.slow
def test_first_step_loss_is_the_formula_with_an_independent_value_model(monkeypatch, tmp_path, tiny_assets, tokenizer):
    """At step 1 the policy is its reference, so the loss is 1/2 mean (r - V(x))^2 with V(x) the value model's
    start: the base checkpoint's decoder (transformers here) at the prompt's last token, through a head drawn
    from the seed."""
    run(monkeypatch, tiny_assets, tmp_path / "run", "shuffle=False", "epochs=1", "max_steps_per_epoch=1", "seed=3")
    logged = read_disk_log(tmp_path / "run" / "logs")[1]

    dataset = reward_dataset(tokenizer, source="json", data_files=str(tiny_assets["train_data_path"]), max_seq_len=128)
    decoder = LlamaModel.from_pretrained(str(tiny_assets["checkpoint_dir"])).eval()
    head = init_score_head(decoder.config.hidden_size, seed=3)[0].double()
    per_prompt = []
    with torch.no_grad():
        for index in range(4):  # batch_size 4, unshuffled: the first four prompts
            example = dataset[index]
            hidden = decoder(torch.tensor([example["prompt_tokens"]])).last_hidden_state[0, -1]
            value = float(hidden.double() @ head)
            per_prompt.append(sum(0.5 * (r - value) ** 2 for r in example["rewards"]) / len(example["rewards"]))
    assert logged["loss"] == pytest.approx(sum(per_prompt) / 4, rel=1e-5)


@pytest.mark.slow
def test_policy_and_value_are_checkpointed_together_and_resume_exactly(monkeypatch, tmp_path, tiny_assets):
    settings = ["epochs=2", "max_steps_per_epoch=4", "shuffle=False", "value_lr=1e-2"]
    run(monkeypatch, tiny_assets, tmp_path / "full", *settings)
    full = read_disk_log(tmp_path / "full" / "logs")
    # The same four batches in each epoch: policy and value learn them (and their own learning rates are logged).
    assert sum(full[step]["loss"] for step in (5, 6, 7, 8)) < 0.8 * sum(full[step]["loss"] for step in (1, 2, 3, 4))
    assert full[4]["lr_value"] / full[4]["lr"] == pytest.approx(1e-2 / 3e-3)

    recipe = load_recipe("rao_distributed")
    crash_after_first_checkpoint(monkeypatch, recipe.RAORecipeDistributed)
    with pytest.raises(StopAfterFirstEpoch):
        run(monkeypatch, tiny_assets, tmp_path / "resumed", *settings, recipe=recipe)
    checkpoint = complete_checkpoints(tmp_path / "resumed")[-1]
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    assert "model.value.output.weight" in saved and "model.policy.output.weight" in saved
    assert any(name.startswith("optimizer.state.value.") for name in saved)
    # The export is the policy alone, in HF causal-LM format.
    assert "score" not in (tmp_path / "resumed" / "epoch_0" / "config.json").read_text()

    for log_file in (tmp_path / "resumed" / "logs").glob("*.txt"):
        log_file.rename(log_file.with_suffix(".first"))
    run(monkeypatch, tiny_assets, tmp_path / "resumed", *settings, "resume_from_checkpoint=True")
    resumed = read_disk_log(tmp_path / "resumed" / "logs")
    assert sorted(step for step in resumed if step > 0) == [5, 6, 7, 8]
    for step in range(5, 9):  # a value model restarted from its initial weights would give other losses
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5, abs=1e-7), step


@pytest.mark.slow
def test_a_value_model_without_a_loss_that_uses_it_is_refused(monkeypatch, tmp_path, tiny_assets):
    with pytest.raises(ValueError, match="learns no value network"):
        run(monkeypatch, tiny_assets, tmp_path / "run", "loss._component_=rao_tune.losses.RAOLoss", "~loss.tau",
            "loss.beta=0.1", "loss.z0=0.0")
