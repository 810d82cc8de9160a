"""The cheap paths compute what the plain one computes: fused log-probs vs full logits, packed prefix-shared vs
padded batches, a precomputed vs an online reference; for a point-wise loss (RAO), a pairwise one (DPO) and a
reference-free one (SimPO), with 1 to 4 responses per prompt."""

import os

import pytest
import torch

from rao_tune.data import collate_packed_batch, collate_reward_batch
from rao_tune.losses import DPOLoss, RAOLoss, ResponseLogProbs, SimPOLoss
from rao_tune.training.logprobs import sequence_logps
from rao_tune.training.reference import (
    WithReferenceLogProbs,
    compute_reference_logps,
    load_or_compute_reference_logps,
    reference_fingerprint,
    tokens_fingerprint,
)

from test_logprobs import SAMPLES, direct_batch, tiny_model

LOSSES = {
    "RAO": lambda: RAOLoss(beta=0.1, z0=1.0),
    "DPO": lambda: DPOLoss(beta=0.1, pairs="all_ordered"),
    "SimPO (reference-free)": lambda: SimPOLoss(beta=2.0, gamma=0.5, pairs="all_ordered"),
}


def reference_table(samples, collate):
    return compute_reference_logps(tiny_model(seed=1).requires_grad_(False), samples, collate_fn=collate, batch_size=3,
                                   device=torch.device("cpu"), world_size=1, rank=0, chunk_tokens=5)


def logps_plain(policy, reference, samples):
    """Today's numbers, independently: full-vocabulary logits of every sequence alone, online reference."""
    batch = collate_reward_batch(samples)
    policy_logps, policy_prompt_logps = direct_batch(policy, samples)
    with torch.no_grad():
        reference_logps, reference_prompt_logps = direct_batch(reference, samples)
    return policy_logps, policy_prompt_logps, reference_logps, reference_prompt_logps, batch


def logps_fused(collate, precomputed):
    def compute(policy, reference, samples):
        if precomputed:
            samples = WithReferenceLogProbs(samples, reference_table(samples, collate))
            samples = [samples[i] for i in range(len(samples))]
        batch = collate(samples)
        policy_logps, policy_prompt_logps = sequence_logps(policy, batch, chunk_tokens=4)
        if precomputed:
            return policy_logps, policy_prompt_logps, batch["reference_logps"], batch["reference_prompt_logps"], batch
        with torch.no_grad():
            return (policy_logps, policy_prompt_logps, *sequence_logps(reference, batch, chunk_tokens=4), batch)

    return compute


PATHS = {
    "fused, padded, online reference": logps_fused(collate_reward_batch, precomputed=False),
    "fused, packed, online reference": logps_fused(collate_packed_batch, precomputed=False),
    "fused, packed rows of 9, precomputed reference": logps_fused(
        lambda samples: collate_packed_batch(samples, max_row_tokens=9), precomputed=True),
    "fused, packed, precomputed reference": logps_fused(collate_packed_batch, precomputed=True),
}


def loss_and_grads(loss_name, compute):
    policy, reference = tiny_model(seed=0), tiny_model(seed=1).requires_grad_(False)
    policy_logps, policy_prompt_logps, reference_logps, reference_prompt_logps, batch = compute(
        policy, reference, SAMPLES)
    output = LOSSES[loss_name]()(ResponseLogProbs(
        policy_logps=policy_logps, policy_prompt_logps=policy_prompt_logps, reference_logps=reference_logps,
        reference_prompt_logps=reference_prompt_logps, rewards=batch["rewards"], prompt_ids=batch["prompt_ids"],
        response_lengths=batch["response_lengths"]))
    output.loss.backward()
    return output, {name: param.grad for name, param in policy.named_parameters()}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_and_gradients_equal_the_plain_path(loss_name, path):
    expected_output, expected_grads = loss_and_grads(loss_name, logps_plain)
    output, grads = loss_and_grads(loss_name, PATHS[path])
    assert expected_output.loss.item() > 0
    torch.testing.assert_close(output.loss, expected_output.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.implicit_rewards, expected_output.implicit_rewards, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_precomputed_reference_table_equals_direct_computation():
    table = reference_table(SAMPLES, collate_packed_batch)
    expected_response, expected_prompt = direct_batch(tiny_model(seed=1), SAMPLES)
    torch.testing.assert_close(table.response_logps, expected_response.detach(), rtol=1e-5, atol=1e-5)
    assert table.offsets.tolist() == [0, 2, 3, 7, 9]
    first_of_each_prompt = table.offsets[:-1]
    torch.testing.assert_close(table.prompt_logps, expected_prompt.detach()[first_of_each_prompt], rtol=1e-5, atol=1e-5)


def test_reference_cache_is_reused_for_the_same_fingerprint_only(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return reference_table(SAMPLES, collate_packed_batch)

    first = load_or_compute_reference_logps(tmp_path, lambda: "a" * 64, compute, rank=0)
    again = load_or_compute_reference_logps(tmp_path, lambda: "a" * 64, compute, rank=0)
    assert len(calls) == 1
    torch.testing.assert_close(again.response_logps, first.response_logps, rtol=0, atol=0)
    load_or_compute_reference_logps(tmp_path, lambda: "b" * 64, compute, rank=0)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a" * 24 + ".pt", "b" * 24 + ".pt"]  # nothing partial


def test_fingerprint_follows_weights_model_dtype_and_tokens(tmp_path):
    from omegaconf import OmegaConf

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 20_000)
    checkpointer = {"checkpoint_dir": str(tmp_path), "checkpoint_files": ["model.safetensors"]}
    model = OmegaConf.create({"_component_": "torchtune.models.llama3.llama3", "vocab_size": 97})

    def fingerprint(samples=SAMPLES, cfg_model=model, dtype=torch.float32):
        return reference_fingerprint(checkpointer, cfg_model, dtype, tokens_fingerprint(samples))

    base = fingerprint()
    assert fingerprint() == base
    assert fingerprint(dtype=torch.bfloat16) != base
    assert fingerprint(cfg_model=OmegaConf.merge(model, {"vocab_size": 98})) != base
    other_tokens = [dict(SAMPLES[0], response_tokens=[[8, 9, 4], [10, 3]]), *SAMPLES[1:]]
    assert fingerprint(samples=other_tokens) != base
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # a retrained checkpoint of the same size, even with the old modification time
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = fingerprint()
    assert changed != base
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched or copied: recomputed, to be safe
    assert fingerprint() != changed
    # HF's sharded naming, as the 8B configs give it
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"y")
    sharded = {"checkpoint_dir": str(tmp_path),
               "checkpoint_files": {"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00002"}}
    assert reference_fingerprint(sharded, model, torch.float32, tokens_fingerprint(SAMPLES)) != base
