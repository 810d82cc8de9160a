"""Chunked, checkpointed per-sequence log-probs against a direct per-sequence computation."""

import pytest
import torch
from torchtune.models.llama3 import llama3

from rao_tune.data import collate_reward_batch
from rao_tune.training.logprobs import sequence_logps


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return llama3(vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64,
                  intermediate_dim=64)


SAMPLES = [
    {"prompt_tokens": [1, 5, 6, 7], "response_tokens": [[8, 9, 3], [10, 3]], "rewards": [1.0, 0.0]},
    {"prompt_tokens": [1, 11], "response_tokens": [[12, 13, 14, 15, 3]], "rewards": [0.5]},
]


def direct_logps(model, prompt, response):
    """Sum log p(token | prefix) over the response, and over the prompt after its first token, one sequence at a time."""
    sequence = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(sequence).float(), dim=-1)[0]
    token_logps = [logp[i - 1, sequence[0, i]] for i in range(1, sequence.shape[1])]
    prompt_part = sum(token_logps[: len(prompt) - 1])
    response_part = sum(token_logps[len(prompt) - 1:])
    return response_part, prompt_part


@pytest.mark.parametrize("num_chunks", [0, 1, 3])
def test_sequence_logps_match_direct_computation(num_chunks):
    model = tiny_model()
    model.set_num_output_chunks(num_chunks)
    batch = collate_reward_batch(SAMPLES, pad_id=0)
    response_logps, prompt_logps = sequence_logps(model, batch)

    model.set_num_output_chunks(0)
    expected = [direct_logps(model, s["prompt_tokens"], r) for s in SAMPLES for r in s["response_tokens"]]
    torch.testing.assert_close(response_logps, torch.stack([e[0] for e in expected]))
    torch.testing.assert_close(prompt_logps, torch.stack([e[1] for e in expected]))
    # responses of one prompt share its prompt log-prob
    torch.testing.assert_close(prompt_logps[0], prompt_logps[1])


def test_chunked_gradients_equal_unchunked_gradients():
    batch = collate_reward_batch(SAMPLES, pad_id=0)
    grads = []
    for num_chunks in (0, 4):
        model = tiny_model()
        model.set_num_output_chunks(num_chunks)
        response_logps, prompt_logps = sequence_logps(model, batch)
        (response_logps.sum() + 0.5 * prompt_logps.sum()).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
