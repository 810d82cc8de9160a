"""Held-out evaluation during RAO training: when it runs, that it covers every held-out prompt once with 1 and 2
processes, and that its figures equal an independent computation."""

import json
import subprocess
import sys

import pytest
import torch

from rao_tune.data import collate_reward_batch, reward_dataset
from rao_tune.losses import RAOLoss, ResponseLogProbs
from rao_tune.training.logprobs import sequence_logps
from rao_tune.training.metrics import read_metrics

from conftest import REPO_ROOT
from recipe_runner import load_recipe, run_recipe_in_process
from test_rao_recipe import load_tune_model

pytestmark = pytest.mark.slow
CONFIG = REPO_ROOT / "configs" / "tiny_rao.yaml"
HELD_OUT_PROMPTS = 7  # odd: two processes get 4 and 3


@pytest.fixture
def held_out(tmp_path, tiny_assets):
    rows = [json.loads(line) for line in tiny_assets["preference_heldout_path"].read_text().splitlines()]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:HELD_OUT_PROMPTS]))
    return path


def eval_overrides(tiny_assets, output_dir, held_out, *more):
    return [f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}",
            f"eval_dataset={{_component_: rao_tune.data.reward_dataset, source: json, data_files: {held_out}, "
            "max_seq_len: 128}", *more]


def test_held_out_metrics_every_n_steps_match_an_independent_computation(monkeypatch, tmp_path, tiny_assets,
                                                                         tokenizer, held_out):
    output_dir = tmp_path / "run"
    run_recipe_in_process(monkeypatch, load_recipe("rao_distributed"), CONFIG,
                          *eval_overrides(tiny_assets, output_dir, held_out, "epochs=1", "max_steps_per_epoch=4",
                                          "eval_every_n_steps=2", f"eval_batch_size={HELD_OUT_PROMPTS}"))
    steps = read_metrics(output_dir)
    assert [step for step in sorted(steps) if "eval_loss" in steps[step]] == [2, 4]  # step 4 ends the epoch: once
    assert steps[4]["eval_prompts"] == HELD_OUT_PROMPTS
    for key in ("eval_implicit_accuracy", "eval_reward_correlation", "eval_logratio_best", "eval_logratio_worst"):
        assert key in steps[4], key

    # The same figures from the exported policy (the weights after step 4) and the starting model as reference.
    policy = load_tune_model(output_dir / "epoch_0", tiny_assets, tmp_path)
    reference = load_tune_model(tiny_assets["checkpoint_dir"], tiny_assets, tmp_path)
    dataset = reward_dataset(tokenizer, source="json", data_files=str(held_out), max_seq_len=128)
    batch = collate_reward_batch([dataset[i] for i in range(len(dataset))], pad_id=0)
    with torch.no_grad():
        policy_logps, policy_prompt_logps = sequence_logps(policy, batch)
        reference_logps, reference_prompt_logps = sequence_logps(reference, batch)
    loss = RAOLoss(beta=0.1, z0=steps[0]["calibrated/z0"])(ResponseLogProbs(
        policy_logps=policy_logps, policy_prompt_logps=policy_prompt_logps, reference_logps=reference_logps,
        reference_prompt_logps=reference_prompt_logps, rewards=batch["rewards"], prompt_ids=batch["prompt_ids"],
        response_lengths=batch["response_lengths"]))
    assert steps[4]["eval_loss"] == pytest.approx(loss.loss.item(), rel=1e-4, abs=1e-6)
    log_ratios = policy_logps - reference_logps
    best, worst, correct = [], [], 0
    for prompt in batch["prompt_ids"].unique():
        members = (batch["prompt_ids"] == prompt).nonzero().squeeze(-1)
        rewards = batch["rewards"][members]
        best.append(log_ratios[members[rewards.argmax()]])
        worst.append(log_ratios[members[rewards.argmin()]])
        implicit = loss.implicit_rewards[members]
        correct += int(implicit[rewards.argmax()] > implicit[rewards.argmin()])
    assert steps[4]["eval_logratio_best"] == pytest.approx(torch.stack(best).mean().item(), abs=1e-4)
    assert steps[4]["eval_logratio_worst"] == pytest.approx(torch.stack(worst).mean().item(), abs=1e-4)
    assert steps[4]["eval_implicit_accuracy"] == pytest.approx(correct / HELD_OUT_PROMPTS)
    assert abs(steps[4]["eval_logratio_best"]) > 1e-3  # the policy moved: these are not the starting model's zeros


def test_two_processes_score_every_held_out_prompt_once(monkeypatch, tmp_path, tiny_assets, held_out):
    """lr 0 keeps the weights where they start, so the held-out figures cannot depend on how training was split;
    with 4 + 3 prompts on two processes they must equal one process's, sums and counts alike.

    The reference runs online: policy and reference (equal weights) then score the very same batch, so every
    log-ratio is exactly 0 by construction in either run. A precomputed reference table is built from other
    batches than the evaluation's (another packing, another summation order), which leaves log-ratios of +-1 ulp
    of a ~70-nat sequence log-prob and turns the implicit accuracy's exact ties into a coin toss per prompt."""
    settings = ["epochs=1", "max_steps_per_epoch=2", "optimizer.lr=0", "eval_batch_size=2", "reference_logps=online"]
    run_recipe_in_process(monkeypatch, load_recipe("rao_distributed"), CONFIG,
                          *eval_overrides(tiny_assets, tmp_path / "one", held_out, *settings))
    command = [sys.executable, "-m", "torchtune._cli.tune", "run", "--nproc_per_node", "2", "recipes/rao_distributed.py",
               "--config", str(CONFIG), *eval_overrides(tiny_assets, tmp_path / "two", held_out, *settings, "batch_size=2")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    one, two = read_metrics(tmp_path / "one")[2], read_metrics(tmp_path / "two")[2]
    assert one["eval_prompts"] == two["eval_prompts"] == HELD_OUT_PROMPTS
    held_out_keys = {key for key in one if key.startswith("eval_")}
    assert held_out_keys == {key for key in two if key.startswith("eval_")}
    assert {"eval_target_reward", "eval_implicit_accuracy", "eval_logratio_best", "eval_response_length"} <= held_out_keys
    for run in (one, two):
        assert run["eval_logratio_best"] == run["eval_logratio_worst"] == run["eval_implicit_accuracy"] == 0.0
    # Sums of the same per-prompt values in another order (4 + 3 prompts, then a gloo sum): fp32 rounding only.
    for key in held_out_keys - {"eval_loss"}:  # (the loss is a per-micro-batch mean: it depends on the split)
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
