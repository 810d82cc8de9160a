"""recipes/annotate_rewards.py and rao_tune.annotate: same file for any process count, exact resume after a
crash, rule-based scorers, bad rows, and the output trains RAO as it is."""

import json
import math
import statistics
import subprocess
import sys

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config

from rao_tune.files import read_jsonl
from rao_tune.annotate import annotate, annotation_dataset
from rao_tune.data import reward_dataset
from rao_tune.models import RewardModelHFCheckpointer
from rao_tune.rewards import KeywordReward, python_reward, word_count
from rao_tune.training.metrics import read_disk_log

from conftest import REPO_ROOT
from recipe_runner import load_recipe, run_recipe_in_process, threads_of_torchrun_per_process

CONFIG = REPO_ROOT / "configs" / "tiny_annotate.yaml"
# Uneven on purpose: 66 rows in 7 shards (4 for rank 0, 3 for rank 1), several batches per shard.
SETTINGS = ["rows_per_shard=10", "batch_size=5", "dataset.on_bad_row=drop"]
# Bad values of the right type: a mixed-type column would turn into datasets' Json feature for every row.
BAD_ROWS = [{"prompt": "count to 2", "responses": ["1 2", "  "]}, {"prompt": "", "responses": ["1"]}]


def chat(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def unscored(tiny_assets, tmp_path_factory):
    """The tiny training rows without their rewards, with two bad rows among them (rows 3 and 40)."""
    rows = [{k: v for k, v in row.items() if k != "rewards"} for row in read_jsonl(tiny_assets["train_data_path"])]
    rows.insert(3, BAD_ROWS[0])
    rows.insert(40, BAD_ROWS[1])
    path = tmp_path_factory.mktemp("unscored") / "unscored.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def annotated_by_one_process(tiny_assets, unscored, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one_process")
    with pytest.MonkeyPatch.context() as monkeypatch, threads_of_torchrun_per_process():
        run_recipe_in_process(monkeypatch, load_recipe("annotate_rewards"), CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                              f"output_dir={output_dir}", f"dataset.data_files={unscored}", *SETTINGS)
    return output_dir / "annotated.jsonl"


@pytest.fixture(scope="module")
def tiny_scorer(tiny_assets, tmp_path_factory):
    cfg = OmegaConf.load(CONFIG)
    cfg.assets_dir, cfg.output_dir = str(tiny_assets["out_dir"]), str(tmp_path_factory.mktemp("unused"))
    return config.instantiate(cfg.scorer)


@pytest.mark.slow
def test_two_processes_write_exactly_the_file_of_one(tiny_assets, unscored, annotated_by_one_process, tmp_path,
                                                     tiny_scorer):
    one = annotated_by_one_process
    rows = read_jsonl(one)
    expected = read_jsonl(tiny_assets["train_data_path"])
    assert [(r["prompt"], r["responses"]) for r in rows] == [(r["prompt"], r["responses"]) for r in expected]
    assert not one.with_name("annotated.jsonl.parts").exists()
    # The rewards are the reward model's, read at each sequence's last token: scoring one at a time agrees.
    for row in rows[:3]:
        prompts = [[{"role": "user", "content": row["prompt"]}]] * len(row["responses"])
        alone = [tiny_scorer.score([p], [r])[0] for p, r in zip(prompts, row["responses"])]
        assert row["rewards"] == pytest.approx(alone, abs=1e-5)

    output_dir = tmp_path / "two"
    command = [
        sys.executable, "-m", "torchtune._cli.tune", "run", "--nproc_per_node", "2", "recipes/annotate_rewards.py",
        "--config", "configs/tiny_annotate.yaml", f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}",
        f"dataset.data_files={unscored}", *SETTINGS,
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 processes" in result.stdout + result.stderr
    assert "'dropped': {'empty_response': 1, 'empty_prompt': 1}" in result.stdout + result.stderr
    # Exact by construction: each process runs the very forward passes of the one-process run (shards and the
    # batches inside them depend on the data alone), with one thread each, as the one-process run had.
    assert (output_dir / "annotated.jsonl").read_bytes() == one.read_bytes()


class Crash(Exception):
    pass


@pytest.mark.slow
def test_crashed_run_resumes_to_the_same_file_without_rescoring(monkeypatch, tmp_path, unscored,
                                                                annotated_by_one_process, tiny_scorer):
    rows = annotation_dataset("json", data_files=str(unscored), on_bad_row="drop")
    output = tmp_path / "annotated.jsonl"
    scored, crash_at_batch = [], [20]
    real_score = tiny_scorer.score

    def score_or_crash(prompts, responses):
        if len(scored) + 1 == crash_at_batch[0]:
            raise Crash
        scored.append(len(responses))
        return real_score(prompts, responses)

    monkeypatch.setattr(tiny_scorer, "score", score_or_crash)
    with pytest.raises(Crash), threads_of_torchrun_per_process():
        annotate(rows, tiny_scorer, str(output), rows_per_shard=10, batch_size=5)
    parts = tmp_path / "annotated.jsonl.parts"
    finished = sorted(p.name for p in parts.glob("shard_*.jsonl"))
    assert 0 < len(finished) < 7 and finished == [f"shard_{i:06d}.jsonl" for i in range(len(finished))]
    assert not output.exists()
    responses_done = sum(len(r["responses"]) for name in finished for r in read_jsonl(parts / name))

    with pytest.raises(ValueError, match=r"other settings \(batch_size differ\)"):
        annotate(rows, tiny_scorer, str(output), rows_per_shard=10, batch_size=4)

    scored.clear()
    crash_at_batch[0] = None
    with threads_of_torchrun_per_process():  # the fixture's thread count: the same forward passes, exactly
        summary = annotate(rows, tiny_scorer, str(output), rows_per_shard=10, batch_size=5)
    assert summary["shards_done_before"] == len(finished)
    assert summary["dropped"] == {"empty_response": 1, "empty_prompt": 1}
    total_responses = sum(len(r["responses"]) for r in read_jsonl(annotated_by_one_process))
    assert sum(scored) == total_responses - responses_done  # finished shards were not scored again
    assert output.read_bytes() == annotated_by_one_process.read_bytes()


def test_rule_based_scorers_from_component(tmp_path, unscored):
    rows = annotation_dataset("json", data_files=str(unscored), on_bad_row="drop")
    scorer = config.instantiate(OmegaConf.create(
        {"_component_": "rao_tune.rewards.python_reward", "function": "rao_tune.rewards.word_count"}))
    annotate(rows, scorer, str(tmp_path / "words.jsonl"), rows_per_shard=7)
    for row in read_jsonl(tmp_path / "words.jsonl"):
        assert row["rewards"] == [word_count(row["prompt"], r) for r in row["responses"]]

    # A class with __call__ given directly by _component_, on UltraFeedback-binarized rows, written as parquet.
    pairs = [{"prompt_id": str(i), "chosen": chat(f"say {w}", f"{w} {w}"), "rejected": chat(f"say {w}", "no")}
             for i, w in enumerate(["cat", "dog", "sun"])]
    datasets.Dataset.from_list(pairs).to_parquet(str(tmp_path / "pairs.parquet"))
    rows = annotation_dataset("parquet", data_files=str(tmp_path / "pairs.parquet"))
    keyword = config.instantiate(OmegaConf.create(
        {"_component_": "rao_tune.rewards.KeywordReward", "keywords": ["cat", "sun"], "length_penalty": 0.25}))
    annotate(rows, keyword, str(tmp_path / "pairs_rewarded.parquet"), keep_columns=["prompt_id"])
    out = datasets.load_dataset("parquet", data_files=str(tmp_path / "pairs_rewarded.parquet"), split="train")
    assert out.column_names == ["prompt", "responses", "rewards", "prompt_id"]
    assert out[0] == {"prompt": [{"role": "user", "content": "say cat"}], "responses": ["cat cat", "no"],
                      "rewards": [0.5, -0.25], "prompt_id": "0"}
    assert out["rewards"][1] == [-0.5, -0.25]
    assert KeywordReward(["x"])("p", "X y") == 1.0


def test_bad_row_error_names_file_row_and_field(tmp_path, unscored):
    rows = annotation_dataset("json", data_files=str(unscored))
    with pytest.raises(ValueError, match=r"unscored\.jsonl, line 4, field 'responses\[1\]': response is empty"):
        annotate(rows, python_reward("rao_tune.rewards.word_count"), str(tmp_path / "out.jsonl"))

    def not_a_number(prompt, response):
        return float("nan") if "3" in response else 1.0

    rows = annotation_dataset("json", data_files=str(unscored), on_bad_row="drop")
    with pytest.raises(ValueError, match=r"row \d+, field 'responses\[\d\]': the scorer returned nan"):
        annotate(rows, not_a_number, str(tmp_path / "out.jsonl"))  # no finished shard: new settings are fine


@pytest.mark.slow
def test_annotated_file_trains_rao_without_conversion(monkeypatch, tmp_path, tiny_assets, tokenizer,
                                                      annotated_by_one_process):
    output_dir = tmp_path / "rao"
    run_recipe_in_process(monkeypatch, load_recipe("rao_distributed"), REPO_ROOT / "configs" / "tiny_rao.yaml",
                          f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}",
                          f"dataset.data_files={annotated_by_one_process}", "epochs=1", "max_steps_per_epoch=2")
    steps = read_disk_log(output_dir / "logs")
    assert sorted(s for s in steps if s > 0) == [1, 2] and all(math.isfinite(steps[s]["loss"]) for s in (1, 2))
    dataset = reward_dataset(tokenizer, source="json", data_files=str(annotated_by_one_process))
    assert len(dataset) == 64 and torch.isfinite(dataset.all_rewards()).all()


@pytest.mark.slow
def test_llama3_8b_config_runs_with_its_tiny_sibling(monkeypatch, tmp_path, tiny_assets):
    """The 8B config as shipped, with only the model sizes, files, data source and device swapped for tiny ones."""
    rows = [{"prompt_id": f"id{i}", "prompt": f"count to {n}", "chosen": chat(f"count to {n}", "1 2"),
             "rejected": chat(f"count to {n}", "2 1"), "score_chosen": 8.0, "score_rejected": 2.0}
            for i, n in enumerate(range(2, 7))]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "uf.parquet"))
    tiny_model = OmegaConf.load(CONFIG).scorer.model
    overrides = [f"scorer.model.{key}={value}" for key, value in tiny_model.items()]
    # The 8B config only accepts a trained reward model (score.weight): save the tiny one as such.
    checkpointer = RewardModelHFCheckpointer(str(tiny_assets["checkpoint_dir"]), str(tmp_path / "rm"), seed=0)
    checkpointer.save_checkpoint(checkpointer.load_checkpoint(), epoch=0)
    run_recipe_in_process(monkeypatch, load_recipe("annotate_rewards"), REPO_ROOT / "configs" / "llama3_8b_annotate.yaml", *overrides,
        f"output_dir={tmp_path}", f"reward_model_dir={tmp_path / 'rm' / 'epoch_0'}",
        f"scorer.tokenizer.path={tiny_assets['tokenizer_path']}",
        f"scorer.tokenizer.special_tokens_path={tiny_assets['special_tokens_path']}",
        "dataset.source=parquet", f"dataset.data_files={tmp_path / 'uf.parquet'}", "dataset.split=train",
        "scorer.device=cpu", "scorer.dtype=fp32",
    )
    out = read_jsonl(tmp_path / "ultrafeedback_binarized_rm.jsonl")
    assert [r["prompt_id"] for r in out] == [f"id{i}" for i in range(5)]
    assert out[0]["prompt"] == [{"role": "user", "content": "count to 2"}] and out[0]["responses"] == ["1 2", "2 1"]
    assert all(len(r["rewards"]) == 2 and r["rewards"] != [8.0, 2.0] for r in out)


def test_annotation_agreement_counts_the_pairs_the_reference_orders(tmp_path):
    """Two rows: the reference orders 3 + 1 pairs strictly (ties are no pair); the annotation agrees on 2 + 1."""
    from rao_tune.annotate import annotation_agreement
    from rao_tune.files import write_jsonl

    responses = [["a", "b", "c"], ["d", "e"]]
    reference = write_jsonl(tmp_path / "reference.jsonl", [
        {"prompt": "p", "responses": responses[0], "rewards": [1.0, 0.5, 0.0]},
        {"prompt": "q", "responses": responses[1], "rewards": [0.0, 1.0]},
    ])
    annotated = write_jsonl(tmp_path / "annotated.jsonl", [
        {"prompt": "p", "responses": responses[0], "rewards": [2.0, -1.0, 0.0]},  # a>b yes, a>c yes, b>c no
        {"prompt": "q", "responses": responses[1], "rewards": [-3.0, 3.0]},  # e>d yes
    ])
    agreement = annotation_agreement(annotated, reference)
    assert agreement["pairs"] == 4
    assert agreement["pair_agreement"] == 3 / 4
    assert agreement["reference_std"] == pytest.approx(statistics.pstdev([1.0, 0.5, 0.0, 0.0, 1.0]))
    assert agreement["annotated_std"] == pytest.approx(statistics.pstdev([2.0, -1.0, 0.0, -3.0, 3.0]))
    assert read_jsonl(annotated)[1]["rewards"] == [-3.0, 3.0]

    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "responses": ["x", "b", "c"], "rewards": [0, 0, 0]},
                                                   {"prompt": "q", "responses": responses[1], "rewards": [0, 0]}])
    with pytest.raises(ValueError, match="row 0 holds other responses"):
        annotation_agreement(other, reference)
