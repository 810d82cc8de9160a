"""The prepared GPU check (scripts/gpu_check.py) in its small CPU mode: every section runs and its figures are
sane, so the script is ready when a GPU session comes."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def test_gpu_check_small_mode_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    finished = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "gpu_check.py"), "--small", "--device", "cpu",
                               "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads(out.read_text())

    # Packed prefix-shared rows give the padded rows' log-probs (other kernels and sums: a tolerance, fp32);
    # flex attention needs CUDA and says so.
    packed = results["packed_attention"]
    assert packed["sequences"] == 6
    assert packed["dense_sdpa"]["max_abs_difference_vs_padded"] < 1e-3
    assert packed["flex_block_mask"].startswith("skipped")

    fused = results["fused_logprobs"]
    assert fused["largest_sequence_logp"] > 100  # hundreds of tokens: a difference is measured at a real scale
    assert fused["fused_fp32_max_abs_difference"] < 1e-5 * fused["largest_sequence_logp"]
    assert 0 < fused["fused_bf16_max_relative_difference"] < 1e-2

    generation = results["generation"]
    assert generation["tokens_per_second"] == generation["batch"] * generation["new_tokens"] / generation["decode_seconds"]

    steps = results["steps"]
    assert "error" not in steps
    assert set(steps["eager"]) >= {"torchtune", "all", "sft_fused"}
    assert all(steps["eager"][mode]["useful_tokens_per_s"] > 0 for mode in ("torchtune", "all", "sft_fused"))
    # Our packed path processes each prompt once and no padding; torchtune's DPO rows repeat prompts and pad.
    assert 1.0 <= steps["eager"]["all"]["processed_per_useful"] < steps["eager"]["torchtune"]["processed_per_useful"]
    assert steps["qlora"]["all"]["useful_tokens_per_s"] > 0
    assert set(steps["optimizers"]) == {"all [adamw]", "all [adamw+in_bwd]", "all [adamw8bit]",
                                        "all [adamw8bit+in_bwd]", "wall_seconds"}
    assert steps["compiled"].startswith("skipped") and steps["float8"].startswith("skipped")


def test_benchmark_runs_on_an_hf_folder_as_it_is(tmp_path):
    """--checkpoint-dir: the benchmark takes an HF Llama folder's shape and weights (rao_tune.models.hf_model), so
    it can measure a real checkpoint such as SmolLM2-135M-Instruct's; here a random 2-layer folder of vocab 300."""
    from rao_tune.toy.assets import build_llama3_checkpoint

    folder = tmp_path / "hf"
    build_llama3_checkpoint(folder, 300, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
                            intermediate_dim=128, max_seq_len=2048, bos_token_id=1, eos_token_id=2)
    out = tmp_path / "bench.json"
    finished = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark_efficiency.py"), "--checkpoint-dir", str(folder),
         "--modes", "torchtune", "all", "all_dense_mask", "--rounds", "1", "--steps", "1", "--max-tokens", "256", "--max-seq-len",
         "2048", "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(out.read_text())
    settings = report["settings"]  # read from config.json, not the shape flags' defaults
    assert (settings["vocab"], settings["layers"], settings["dim"], settings["heads"], settings["kv_heads"],
            settings["intermediate"]) == (300, 2, 64, 4, 2, 128)
    assert report["runs"]["all"][0]["parameters"] == report["runs"]["torchtune"][0]["parameters"] > 0
    assert report["summaries"]["all"]["useful_tokens_per_s"] > 0
    # The attention over the allowed blocks and the dense-mask SDPA compute the same step.
    assert report["runs"]["all"][0]["losses"] == pytest.approx(report["runs"]["all_dense_mask"][0]["losses"], rel=1e-5)


def test_benchmark_compares_optimizers_and_profiles_a_step(tmp_path):
    """--optimizers runs each mode per optimizer (rows 'mode [optimizer]'); --profile adds one profiled step per
    row: phases, op families and the training state's sizes, which must match the model's own count."""
    out = tmp_path / "bench.json"
    finished = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark_efficiency.py"), "--vocab", "500", "--layers", "2",
         "--dim", "64", "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--max-tokens", "128",
         "--max-seq-len", "512", "--modes", "all", "--optimizers", "adamw", "adamw8bit+in_bwd", "--rounds", "1",
         "--steps", "2", "--lr", "1e-3", "--profile", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"all [adamw]", "all [adamw8bit+in_bwd]"}
    plain, low_bit = runs["all [adamw]"][0], runs["all [adamw8bit+in_bwd]"][0]
    assert plain["losses"][0] == pytest.approx(low_bit["losses"][0], rel=1e-6)  # same weights, same first batch
    assert plain["losses"][1:] != low_bit["losses"][1:]  # then different updates
    weights_gib = plain["parameters"] * 4 / 2**30  # fp32, every parameter trained
    for run in (plain, low_bit):
        state = run["profile"]["state_gib"]
        assert state["weights"] == pytest.approx(weights_gib) and state["gradients (trained weights' size)"] == pytest.approx(weights_gib)
        assert set(run["profile"]["phases_s"]) == {"forward", "backward", "optimizer"}
    assert plain["profile"]["state_gib"]["optimizer state"] == pytest.approx(2 * weights_gib, rel=0.01)  # 2 moments
    assert low_bit["profile"]["state_gib"]["optimizer state"] < 0.5 * plain["profile"]["state_gib"]["optimizer state"]
