"""Fused, logit-free per-sequence log-probs (padded and packed layouts) against a direct computation from full
logits, one sequence at a time."""

import pytest
import torch
from torchtune.models.llama3 import llama3
from torchtune.models.qwen2 import qwen2

from rao_tune.data import collate_packed_batch, collate_reward_batch
from rao_tune.training.attention import enable_prefix_shared_attention
from rao_tune.training.logprobs import fused_token_logps, sequence_logps


def tiny_model(seed=0, tied=False, attention="dense mask"):
    """``attention``: how packed rows are attended, a dense boolean mask to SDPA or SDPA on the allowed blocks
    only (what every model the recipes build on CPU does)."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64,
                 intermediate_dim=64)
    model = qwen2(**shape, tie_word_embeddings=True) if tied else llama3(**shape)
    return enable_prefix_shared_attention(model) if attention == "allowed blocks" else model


ATTENTION = ["dense mask", "allowed blocks"]


# Uneven response counts (1 to 4) and lengths; every prompt starts with the shared t0 = 1.
SAMPLES = [
    {"prompt_tokens": [1, 5, 6, 7], "response_tokens": [[8, 9, 3], [10, 3]], "rewards": [1.0, 0.0]},
    {"prompt_tokens": [1, 11], "response_tokens": [[12, 13, 14, 15, 3]], "rewards": [0.5]},
    {"prompt_tokens": [1, 11, 40, 41, 42], "response_tokens": [[12, 3], [50, 51, 52, 53], [60], [70, 71]],
     "rewards": [0.5, 1.0, 2.0, 3.0]},
    {"prompt_tokens": [1, 20, 21], "response_tokens": [[22, 23], [24, 25, 26]], "rewards": [2.0, -1.0]},
]

LAYOUTS = {
    "padded": collate_reward_batch,
    "packed, one row": collate_packed_batch,
    "packed, rows of 16": lambda samples: collate_packed_batch(samples, max_row_tokens=16),
    # 9 tokens cannot hold the third prompt with all its responses: it is split, the prompt repeated.
    "packed, rows of 9 (split groups)": lambda samples: collate_packed_batch(samples, max_row_tokens=9),
}


def direct_logps(model, prompt, response):
    """log pi(response | prompt) and log pi(prompt after t0 | t0) from the full logits of this sequence alone."""
    sequence = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(sequence).float(), dim=-1)[0]
    token_logps = [logp[i - 1, sequence[0, i]] for i in range(1, sequence.shape[1])]
    return sum(token_logps[len(prompt) - 1:]), sum(token_logps[: len(prompt) - 1])


def direct_batch(model, samples):
    pairs = [direct_logps(model, s["prompt_tokens"], r) for s in samples for r in s["response_tokens"]]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied embeddings"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk_tokens", [3, 1024])
def test_fused_logps_match_full_logits_per_sequence(layout, chunk_tokens, tied, attention):
    model = tiny_model(tied=tied, attention=attention)
    response_logps, prompt_logps = sequence_logps(model, LAYOUTS[layout](SAMPLES), chunk_tokens=chunk_tokens)
    expected_response, expected_prompt = direct_batch(model, SAMPLES)
    torch.testing.assert_close(response_logps, expected_response, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prompt_logps, expected_prompt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_full_logits_per_sequence(layout, attention):
    # Distinct weights per response and on the prompt term, so every token's gradient differs.
    weights = torch.linspace(0.5, 2.0, sum(len(s["response_tokens"]) for s in SAMPLES))

    def grads(compute):
        model = tiny_model(attention=attention)
        response_logps, prompt_logps = compute(model)
        ((weights * response_logps).sum() + 0.3 * prompt_logps.sum()).backward()
        return {name: param.grad for name, param in model.named_parameters()}

    expected = grads(lambda model: direct_batch(model, SAMPLES))
    fused = grads(lambda model: sequence_logps(model, LAYOUTS[layout](SAMPLES), chunk_tokens=4))
    for name in expected:
        torch.testing.assert_close(fused[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_token_logps_equal_log_softmax_with_gradients(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 8, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    upstream = torch.randn(13)
    upstream[[2, 5, 6]] = 0.0  # tokens without gradient are skipped in backward

    fused = fused_token_logps(hidden, weight, targets, chunk_tokens=4)
    (fused * upstream).sum().backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    plain = torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    (plain * upstream).sum().backward()
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused, plain.detach(), **tolerance)
    torch.testing.assert_close(fused_grads[0], hidden.grad, **tolerance)
    torch.testing.assert_close(fused_grads[1], weight.grad, **tolerance)
    assert fused_grads[0].dtype == dtype


def test_reference_model_without_gradients():
    model = tiny_model().requires_grad_(False)
    with torch.no_grad():
        response_logps, _ = sequence_logps(model, collate_packed_batch(SAMPLES))
    torch.testing.assert_close(response_logps, direct_batch(model, SAMPLES)[0], rtol=1e-5, atol=1e-5)


def test_flex_attention_block_mask_follows_the_dense_rule():
    """CUDA runs use a flex-attention BlockMask; its mask function must allow exactly what the dense mask does."""
    from rao_tune.training.attention import prefix_sharing_block_mask, prefix_sharing_mask

    batch = collate_packed_batch(SAMPLES, max_row_tokens=16)
    group_ids, segment_ids = batch["group_ids"], batch["segment_ids"]
    block_mask = prefix_sharing_block_mask(group_ids, segment_ids)
    rows, length = group_ids.shape
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    from_mask_mod = torch.stack([block_mask.mask_mod(torch.tensor(row), torch.tensor(0), query, key)
                                 for row in range(rows)])
    assert torch.equal(from_mask_mod, prefix_sharing_mask(group_ids, segment_ids))


@pytest.mark.slow
def test_flex_attention_with_the_block_mask_equals_dense_sdpa():
    """The CUDA path's kernel, run on CPU (torch.compile of flex attention, ~25 s): fixed-width packed rows with
    the prefix-sharing BlockMask give what SDPA gives with the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    from rao_tune.training.attention import prefix_sharing_block_mask, prefix_sharing_mask

    batch = collate_packed_batch(SAMPLES, max_row_tokens=256, fixed_width=True)
    group_ids, segment_ids = batch["group_ids"], batch["segment_ids"]
    torch.manual_seed(0)
    query, key, value = (torch.randn(group_ids.shape[0], 4, group_ids.shape[1], 16) for _ in range(3))
    flex = torch.compile(flex_attention)(query, key, value, block_mask=prefix_sharing_block_mask(group_ids, segment_ids))
    dense = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=prefix_sharing_mask(group_ids, segment_ids)[:, None])
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
