"""The toy pipeline (README's first command) at a tiny scale: every stage runs and leaves its outputs."""

import json

import pytest

from rao_tune.pipeline import ALIGNMENT_CONFIGS, run_pipeline
from rao_tune.tiny import true_reward

pytestmark = pytest.mark.slow


def test_every_stage_produces_its_outputs_and_the_aligned_models_are_scored(tmp_path):
    out = tmp_path / "toy"
    # Below ~0.3 the SFT model samples only wrong answers: every prompt's rewards tie, and the reward model stage
    # rightly refuses data without a single preference pair.
    summary = run_pipeline(out, scale=0.3, log=lambda message: None)

    assert (out / "sft" / "epoch_1" / "config.json").exists()
    samples = [json.loads(line) for line in (out / "samples" / "train.jsonl").read_text().splitlines()]
    assert samples and all(row["responses"] for row in samples)
    scored = [json.loads(line) for line in (out / "true_rewards" / "train.jsonl").read_text().splitlines()]
    for row in scored:  # the true reward, recomputed
        assert row["rewards"] == [true_reward(row["prompt"], response) for response in row["responses"]]
    assert (out / "reward_model" / "epoch_1" / "config.json").exists()
    assert (out / "annotated" / "train.jsonl").exists()

    assert set(summary["scores"]) == {"SFT", *ALIGNMENT_CONFIGS}
    for method, score in summary["scores"].items():
        answers = json.loads((out / "answers" / f"{method}.json").read_text())
        rewards = [true_reward(item["instruction"], item["output"]) for item in answers]
        assert score["true_reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert len(summary["sweep"]) == 6
    report = (out / "summary.md").read_text()
    assert "| RAO |" in report and "| SFT |" in report
    for plot in ("implicit_rewards.png", "z0_logratio.png", "z0_reward_gap.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
