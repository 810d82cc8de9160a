"""Reward models: the Bradley-Terry loss and pair rules against hand-worked values, the score head, and HF
checkpoints that transformers' *ForSequenceClassification reads with the same scores (Llama3 and Qwen2)."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torchtune import training
from transformers import AutoModelForSequenceClassification

from rao_tune.data import collate_packed_batch, collate_reward_batch
from rao_tune.losses import BradleyTerryLoss, preference_pairs
from rao_tune.losses.functional import bradley_terry_loss, pairwise_accuracy
from rao_tune.models import RewardModelHFCheckpointer, init_score_head, last_token_scores, reward_model
from rao_tune.toy.assets import build_llama3_checkpoint, build_qwen2_checkpoint
from rao_tune.training.attention import model_inputs
from rao_tune.training.loop import sharded_eval_batches


def test_bradley_terry_loss_and_accuracy_by_hand():
    chosen = torch.tensor([2.0, 0.5, -1.0])
    rejected = torch.tensor([1.0, 0.5, 1.0])
    # -log sigmoid(d) = log(1 + e^-d) for margins d = 1, 0, -2
    expected = (math.log1p(math.exp(-1.0)) + math.log(2.0) + math.log1p(math.exp(2.0))) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    assert pairwise_accuracy(chosen, rejected).item() == pytest.approx(1 / 3)  # the tie counts as wrong
    # a margin of -200 stays finite (logsigmoid, not log(sigmoid))
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)


REWARDS = torch.tensor([0.9, 0.1, 0.5, 1.0, 1.0, 0.3, 0.7, 0.0])
PROMPT_IDS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("best_vs_others", [(0, 1), (0, 2), (6, 5), (6, 7)]),  # prompt 1 ties: no pair
        ("all_ordered", [(0, 1), (0, 2), (2, 1), (5, 7), (6, 5), (6, 7)]),
        ("best_vs_worst", [(0, 1), (6, 7)]),
    ],
)
def test_pair_rules(rule, expected):
    chosen, rejected = preference_pairs(REWARDS, PROMPT_IDS, rule)
    assert sorted(zip(chosen.tolist(), rejected.tolist())) == sorted(expected)


def test_best_vs_random_is_seeded_and_picks_a_lower_response():
    draws = [preference_pairs(REWARDS, PROMPT_IDS, "best_vs_random", seed) for seed in range(20)]
    for chosen, rejected in draws:
        assert chosen.tolist() == [0, 6]
        assert rejected[0].item() in (1, 2) and rejected[1].item() in (5, 7)
    assert len({tuple(r.tolist()) for _, r in draws}) > 1  # the draw does vary with the seed
    again = preference_pairs(REWARDS, PROMPT_IDS, "best_vs_random", 3)
    assert again[1].tolist() == draws[3][1].tolist()
    # the draw belongs to the prompt, not to its place in the batch (so ranks, epochs and resumes agree)
    moved = preference_pairs(REWARDS[[5, 6, 7, 0, 1, 2]], torch.tensor([0, 0, 0, 1, 1, 1]), "best_vs_random", 3)
    first_rejected, third_rejected = draws[3][1].tolist()  # prompt 0 at indices 0-2, prompt 2 at 5-7
    assert moved[1].tolist() == [third_rejected - 5, first_rejected + 3]


def test_bradley_terry_module_pairs_then_averages():
    scores = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.0, 0.0, 0.5, 0.2], requires_grad=True)
    output = BradleyTerryLoss(pairs="best_vs_others")(scores, REWARDS, PROMPT_IDS)
    margins = [1.0 - -1.0, 1.0 - 2.0, 0.5 - 0.0, 0.5 - 0.2]
    assert output.num_pairs == 4
    assert output.loss.item() == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / 4, rel=1e-6)
    assert output.accuracy == pytest.approx(3 / 4)
    assert output.margin == pytest.approx(sum(margins) / 4)
    output.loss.backward()
    assert scores.grad[3].item() == 0.0 and scores.grad[4].item() == 0.0  # tied prompt gets no gradient
    with pytest.raises(ValueError, match="pair rule"):
        BradleyTerryLoss(pairs="best_vs_everyone")


def test_score_head_depends_on_the_seed_only():
    torch.manual_seed(123)
    first = init_score_head(64, seed=7)
    torch.manual_seed(999)
    assert torch.equal(first, init_score_head(64, seed=7))
    assert not torch.equal(first, init_score_head(64, seed=8))
    assert first.shape == (1, 64)


def test_last_token_scores_read_the_flat_positions_of_each_responses_last_token():
    outputs = torch.arange(12, dtype=torch.float32).reshape(2, 6, 1)
    # a response ending at row 0, column 5 and one at row 1, column 2 (a packed row may hold several)
    assert last_token_scores(outputs, torch.tensor([5, 8])).tolist() == [5.0, 8.0]


def test_packed_scores_equal_padded_scores():
    torch.manual_seed(0)
    model = reward_model("torchtune.models.llama3.llama3", vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         embed_dim=32, intermediate_dim=64, max_seq_len=64).eval()
    samples = [
        {"prompt_tokens": [1, 5, 6], "response_tokens": [[7, 8, 9], [10], [11, 12]], "rewards": [0.0, 1.0, 2.0]},
        {"prompt_tokens": [1, 13], "response_tokens": [[14, 15, 16, 17]], "rewards": [3.0]},
    ]
    with torch.no_grad():
        padded = collate_reward_batch(samples, pad_id=0)
        packed = collate_packed_batch(samples, pad_id=0)
        padded_scores = last_token_scores(model(padded["tokens"]), padded["last_positions"])
        packed_scores = last_token_scores(model(packed["tokens"], **model_inputs(packed)), packed["last_positions"])
        alone = [model(torch.tensor([s["prompt_tokens"] + r]))[0, -1, 0] for s in samples for r in s["response_tokens"]]
    torch.testing.assert_close(packed_scores, torch.stack(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_scores, torch.stack(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_eval_batches_cover_every_example_once_with_equal_batch_counts(world_size):
    dataset = [{"i": i} for i in range(7)]
    seen, counts = [], []
    for rank in range(world_size):
        batches = list(sharded_eval_batches(dataset, batch_size=2, world_size=world_size, rank=rank))
        counts.append(len(batches))
        seen += [s["i"] for samples, real in batches for s, ok in zip(samples, real) if ok]
    assert sorted(seen) == list(range(7))
    assert len(set(counts)) == 1


def _hf_and_ours_scores(saved_dir, ours, pad_id):
    hf_model = AutoModelForSequenceClassification.from_pretrained(saved_dir, torch_dtype=torch.float32)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 11, 12, pad_id, pad_id, pad_id], [5, 13, 14, 15, 16, pad_id]])
    last_positions = torch.tensor([0 * 6 + 5, 1 * 6 + 2, 2 * 6 + 4])  # row * width + length - 1
    with torch.no_grad():
        return hf_model, hf_model(tokens).logits.squeeze(-1), last_token_scores(ours(tokens), last_positions)


@pytest.mark.parametrize("family", ["LLAMA3", "QWEN2"])
def test_reward_checkpoint_round_trip_through_transformers(tmp_path, family):
    pad_id = 0
    if family == "LLAMA3":
        kwargs = build_llama3_checkpoint(tmp_path / "sft", 64, seed=0)
        decoder = "torchtune.models.llama3.llama3"
    else:  # tied embeddings, the small Qwen2.5 layout, and q/k/v biases
        kwargs = build_qwen2_checkpoint(tmp_path / "sft", 64, seed=0, tie_word_embeddings=True)
        decoder = "torchtune.models.qwen2.qwen2"
    checkpointer = RewardModelHFCheckpointer(
        str(tmp_path / "sft"), str(tmp_path / "out"), model_type=family, seed=5, pad_token_id=pad_id
    )
    state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
    assert torch.equal(state_dict["output.weight"], init_score_head(64, seed=5))  # new head, from the seed
    model = reward_model(decoder, **kwargs)
    model.load_state_dict(state_dict)  # strict: every decoder weight mapped, lm_head dropped
    model.output.weight.data.normal_()  # a trained-looking head, so the check below is not about the init
    checkpointer.save_checkpoint({training.MODEL_KEY: model.state_dict()}, epoch=0)

    saved = tmp_path / "out" / "epoch_0"
    config = json.loads((saved / "config.json").read_text())
    expected_class = "LlamaForSequenceClassification" if family == "LLAMA3" else "Qwen2ForSequenceClassification"
    assert config["architectures"] == [expected_class] and config["num_labels"] == 1
    weights = load_file(str(saved / "model-00001-of-00001.safetensors"))
    assert weights["score.weight"].shape == (1, 64) and "lm_head.weight" not in weights
    if family == "QWEN2":
        assert "model.layers.0.self_attn.q_proj.bias" in weights

    hf_model, hf_scores, our_scores = _hf_and_ours_scores(saved, model, pad_id)
    assert type(hf_model).__name__ == expected_class
    torch.testing.assert_close(hf_scores, our_scores, atol=1e-5, rtol=1e-5)

    # and the saved reward model loads back with its trained head
    reloaded = RewardModelHFCheckpointer(str(saved), str(tmp_path / "again"), model_type=family)
    for name, value in reloaded.load_checkpoint()[training.MODEL_KEY].items():
        torch.testing.assert_close(value, model.state_dict()[name], msg=name)


def test_scoring_refuses_a_checkpoint_without_a_trained_head(tmp_path):
    build_llama3_checkpoint(tmp_path / "sft", 64, seed=0)
    checkpointer = RewardModelHFCheckpointer(str(tmp_path / "sft"), str(tmp_path / "out"), require_score_head=True)
    with pytest.raises(ValueError, match="no score.weight"):
        checkpointer.load_checkpoint()


def test_score_head_computes_in_fp32_even_in_a_bf16_model():
    model = reward_model("torchtune.models.llama3.llama3", vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                         embed_dim=32, intermediate_dim=64, max_seq_len=16).to(torch.bfloat16)
    scores = model(torch.tensor([[1, 2, 3]]))
    assert scores.dtype == torch.float32
