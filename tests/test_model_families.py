"""Llama 3, Qwen2.5 and EuroLLM side by side, each from its tiny assets and through config instantiation as a
YAML would: checkpoints against transformers (causal LM and reward model), exact chat layouts and masks written
by hand from each tokenizer's pieces, the shared first token t0, and EuroLLM's published parameter counts."""

import json

import pytest
import sentencepiece
import torch
from omegaconf import OmegaConf
from torchtune import config, training
from torchtune.data import ChatMLTemplate, Message
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rao_tune.data import reward_dataset
from rao_tune.data.reward_dataset import tokenize_prompt_and_responses
from rao_tune.models import (
    EuroLLMTokenizer,
    eurollm_1_7b,
    eurollm_1_7b_reward_model,
    eurollm_9b,
    eurollm_9b_reward_model,
    eurollm_tokenizer,
    last_token_scores,
)
from rao_tune.toy.task import tiny_corpus
from rao_tune.toy.families import FAMILIES, build_eurollm_tokenizer, build_family_assets

HF_CLASSES = {"llama3": "Llama", "qwen2_5": "Qwen2", "eurollm": "Llama"}
SYSTEM, USER, ANSWER, OTHER_ANSWER = "be brief", "count to 3", "1 2 3", "1 2"


@pytest.fixture(scope="module")
def family_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(family):
        if family not in built:
            built[family] = build_family_assets(root / family, family, seed=0)
        return built[family]

    return get


def instantiate(component, **kwargs):
    return config.instantiate(OmegaConf.create({"_component_": component, **kwargs}))


def make_tokenizer(assets):
    return instantiate(assets["tokenizer_component"], **assets["tokenizer_kwargs"])


def conversation(system=True):
    messages = [Message("system", SYSTEM, masked=True)] if system else []
    return messages + [Message("user", USER, masked=True), Message("assistant", ANSWER, masked=False)]


# --- Checkpoints against transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_through_torchtune_and_matches_transformers(tmp_path, family_assets, family):
    assets = family_assets(family)
    tokenizer = make_tokenizer(assets)
    model = instantiate(assets["model_component"], **assets["model_kwargs"])
    checkpointer = instantiate(
        "torchtune.training.FullModelHFCheckpointer",
        checkpoint_dir=str(assets["checkpoint_dir"]),
        checkpoint_files=assets["checkpoint_files"],
        model_type=assets["model_type"],
        output_dir=str(tmp_path / "out"),
    )
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])  # strict: every weight mapped
    assert model.tok_embeddings.num_embeddings == assets["vocab_size"]

    tokens = torch.tensor([tokenizer.tokenize_messages(conversation())[0]])
    assert tokens.max().item() < assets["vocab_size"]
    hf_model = AutoModelForCausalLM.from_pretrained(assets["checkpoint_dir"], dtype=torch.float32)
    assert type(hf_model).__name__ == f"{HF_CLASSES[family]}ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["eurollm", "qwen2_5"])
def test_reward_model_round_trip_through_transformers(tmp_path, family_assets, family):
    assets = family_assets(family)
    tokenizer = make_tokenizer(assets)
    model = instantiate("rao_tune.models.reward_model", decoder=assets["model_component"], **assets["model_kwargs"])
    checkpointer = instantiate(
        "rao_tune.models.RewardModelHFCheckpointer",
        checkpoint_dir=str(assets["checkpoint_dir"]),
        output_dir=str(tmp_path / "out"),
        model_type=assets["model_type"],
        pad_token_id=assets["pad_id"],
        seed=3,
    )
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    torch.manual_seed(0)
    model.output.weight.data.normal_()
    checkpointer.save_checkpoint({training.MODEL_KEY: model.state_dict()}, epoch=0)

    # Real scored sequences (prompt + response, as the reward recipes build them), right-padded with the pad id.
    prompt, responses = tokenize_prompt_and_responses(
        tokenizer, conversation()[:-1], [ANSWER, OTHER_ANSWER, "reverse: moon sun"]
    )
    sequences = [prompt + response for response in responses]
    assert all(assets["pad_id"] not in sequence for sequence in sequences)  # else HF would stop early
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    width = int(lengths.max())
    tokens = torch.tensor([sequence + [assets["pad_id"]] * (width - len(sequence)) for sequence in sequences])

    saved = tmp_path / "out" / "epoch_0"
    assert json.loads((saved / "config.json").read_text())["pad_token_id"] == assets["pad_id"]
    hf_model = AutoModelForSequenceClassification.from_pretrained(saved, dtype=torch.float32)
    assert type(hf_model).__name__ == f"{HF_CLASSES[family]}ForSequenceClassification"
    with torch.no_grad():
        ours = last_token_scores(model(tokens), torch.arange(len(sequences)) * width + lengths - 1)
        torch.testing.assert_close(hf_model(tokens).logits.squeeze(-1), ours, atol=1e-5, rtol=1e-5)


# --- Chat layouts and masks, by hand ----------------------------------------------------------------------------


def expected_layout(family, tokenizer, assets):
    """(prompt messages, assistant header, response, trailing end tokens, whether the header is masked), each
    written from the tokenizer's pieces independently of tokenize_messages."""
    special = assets["special_tokens"]
    if family == "eurollm":  # the raw SentencePiece model: this tiny one has no dummy prefix to remove
        raw = sentencepiece.SentencePieceProcessor(model_file=assets["tokenizer_kwargs"]["path"])
        bos, eos, im_start, im_end = 1, 2, 3, 4  # EuroLLM's ids, which the tiny model keeps
        assert [special[p] for p in ("<s>", "</s>", "<|im_start|>", "<|im_end|>")] == [bos, eos, im_start, im_end]

        def turn(role, content):
            return [im_start] + raw.encode(f"{role}\n") + raw.encode(content) + [im_end] + raw.encode("\n")

        prompt = [bos] + turn("system", SYSTEM) + turn("user", USER)
        header = [im_start] + raw.encode("assistant\n")
        return prompt, header, raw.encode(ANSWER) + [im_end], [eos], True

    def enc(text):
        return tokenizer.encode(text, add_bos=False, add_eos=False)

    if family == "llama3":
        start, end, eot = special["<|start_header_id|>"], special["<|end_header_id|>"], special["<|eot_id|>"]

        def head(role):
            return [start] + enc(role) + [end] + enc("\n\n")

        prompt = [special["<|begin_of_text|>"]] + head("system") + enc(SYSTEM) + [eot] + head("user") + enc(USER) + [eot]
        return prompt, head("assistant"), enc(ANSWER) + [eot], [special["<|end_of_text|>"]], False

    im_start, im_end = special["<|im_start|>"], special["<|im_end|>"]  # Qwen2.5: no BOS; eos is <|im_end|>
    prompt = [im_start] + enc("system\n") + enc(SYSTEM) + [im_end] + enc("\n")
    prompt += [im_start] + enc("user\n") + enc(USER) + [im_end] + enc("\n")
    return prompt, [im_start] + enc("assistant\n"), enc(ANSWER) + [im_end], [], False


@pytest.mark.parametrize("family", FAMILIES)
def test_two_turn_layout_masks_and_prompt_response_split(family_assets, family):
    assets = family_assets(family)
    tokenizer = make_tokenizer(assets)
    prompt, header, response, end, header_masked = expected_layout(family, tokenizer, assets)

    tokens, mask = tokenizer.tokenize_messages(conversation())
    assert tokens == prompt + header + response + end
    assert mask == [True] * len(prompt) + [header_masked] * len(header) + [False] * len(response) + [True] * len(end)

    prompt_tokens, response_tokens = tokenize_prompt_and_responses(
        tokenizer, conversation()[:-1], [ANSWER, OTHER_ANSWER]
    )
    assert prompt_tokens == prompt + header  # ends with the assistant header: the generation prompt
    assert response_tokens[0] == response  # content + the end-of-turn token the model must learn to stop at
    assert response_tokens[1][-1] == response[-1] and tokenizer.decode(response_tokens[1][:-1]) == OTHER_ANSWER
    assert response[-1] in tokenizer.stop_tokens


# --- The first token t0 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_sequence_starts_with_the_familys_first_token(tmp_path, family_assets, family):
    assets = family_assets(family)
    tokenizer = make_tokenizer(assets)
    expected = {"llama3": "<|begin_of_text|>", "qwen2_5": "<|im_start|>", "eurollm": "<s>"}[family]
    assert assets["first_token"] == expected
    assert tokenizer.special_tokens[expected] == assets["first_token_id"]
    rows = [
        {"prompt": "count to 3", "responses": ["1 2 3", "1 2"], "rewards": [1.0, 0.5]},
        {
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: a b"}],
            "responses": ["b a", "a b"],
            "rewards": [1.0, 0.0],
        },
        {"prompt": [{"role": "user", "content": "repeat the word sun 3 times"}], "responses": ["sun sun sun"],
         "rewards": [1.0]},
    ]
    data_path = tmp_path / "rows.jsonl"
    data_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = reward_dataset(tokenizer, source="json", data_files=str(data_path))
    assert len(dataset) == 3
    assert dataset.first_token == assets["first_token_id"]
    assert {sample["prompt_tokens"][0] for sample in dataset} == {assets["first_token_id"]}


# --- EuroLLM ----------------------------------------------------------------------------------------------------


def llama_parameter_count(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, score_head=False):
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v (no biases)
    per_layer = attention + 3 * hidden * intermediate + 2 * hidden  # gate/up/down + two RMSNorms
    head = hidden if score_head else vocab * hidden  # untied
    return vocab * hidden + layers * per_layer + hidden + head


def test_eurollm_builders_have_the_published_sizes():
    with torch.device("meta"):
        models = {
            "9b": eurollm_9b(), "1.7b": eurollm_1_7b(),
            "9b_rm": eurollm_9b_reward_model(), "1.7b_rm": eurollm_1_7b_reward_model(),
        }
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts["9b"] == llama_parameter_count(128000, 4096, 12288, 42, 32, 8, 128) == 9_152_319_488
    assert counts["1.7b"] == llama_parameter_count(128000, 2048, 5632, 24, 16, 8, 128) == 1_656_850_432
    assert counts["9b_rm"] == llama_parameter_count(128000, 4096, 12288, 42, 32, 8, 128, score_head=True)
    assert counts["1.7b_rm"] == llama_parameter_count(128000, 2048, 5632, 24, 16, 8, 128, score_head=True)
    layer = models["9b"].layers[0].attn
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (32, 8, 128)
    assert layer.pos_embeddings.base == 10000.0 and type(layer.pos_embeddings).__name__ == "RotaryPositionalEmbeddings"
    assert models["9b"].max_seq_len == 4096 and models["9b"].norm.eps == 1e-5
    assert models["9b_rm"].output.weight.shape == (1, 4096)


def test_eurollm_tokenizer_ids_and_text(family_assets):
    tokenizer = make_tokenizer(family_assets("eurollm"))
    assert isinstance(tokenizer, EuroLLMTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.im_start_id, tokenizer.im_end_id) == (
        1, 2, 2, 3, 4
    )
    assert tokenizer.stop_tokens == [4, 2] and tokenizer.vocab_size == family_assets("eurollm")["vocab_size"]
    text = "count to 3\nreverse: moon sun"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode(text)[0] == 1 and tokenizer.encode(text)[-1] == 2
    # ChatML markers in text are single tokens; <s> / </s> spelled in text are ordinary characters.
    tokens = tokenizer.encode("a <|im_start|>b<|im_end|>", add_bos=False, add_eos=False)
    assert tokens.count(3) == 1 and tokens.count(4) == 1 and tokens[-1] == 4
    assert not {1, 2} & set(tokenizer.encode("<s> </s>", add_bos=False, add_eos=False))


def test_eurollm_multi_turn_masks_generation_prompt_and_transform(family_assets):
    tokenizer = make_tokenizer(family_assets("eurollm"))

    def enc(text):
        return tokenizer.encode(text, add_bos=False, add_eos=False)

    messages = [
        Message("user", "count to 2", masked=True),
        Message("assistant", "1 2", masked=False),
        Message("user", "count to 3", masked=True),
        Message("assistant", "", masked=False),
    ]
    first_user = [3] + enc("user\ncount to 2") + [4] + enc("\n")
    first_answer_header, first_answer = [3] + enc("assistant\n"), enc("1 2") + [4] + enc("\n")
    second_user = [3] + enc("user\ncount to 3") + [4] + enc("\n")
    header = [3] + enc("assistant\n")
    tokens, mask = tokenizer.tokenize_messages(messages, add_end_tokens=False)
    assert tokens == [1] + first_user + first_answer_header + first_answer + second_user + header
    masked_before = 1 + len(first_user) + len(first_answer_header)
    # an earlier answer trains its content, <|im_end|> and the newline after it; its header is never trained
    assert mask == [True] * masked_before + [False] * len(first_answer) + [True] * (len(second_user) + len(header))

    sample = tokenizer({"messages": messages[:2], "other": 7})
    assert sample["tokens"] == [1] + first_user + first_answer_header + enc("1 2") + [4, 2]
    assert sample["mask"][-3:] == [False, False, True] and sample["other"] == 7 and "messages" not in sample
    inference = tokenizer({"messages": messages[:1]}, inference=True)
    assert inference["tokens"] == [1] + first_user  # a final user turn keeps its footer, no </s>

    truncated = eurollm_tokenizer(family_assets("eurollm")["tokenizer_kwargs"]["path"], max_seq_len=8)
    tokens, mask = truncated.tokenize_messages(messages[:2])
    assert len(tokens) == 8 and tokens[-1] == 2 and mask[-1] is True
    with pytest.raises(ValueError, match="ChatML"):
        EuroLLMTokenizer(family_assets("eurollm")["tokenizer_kwargs"]["path"], prompt_template=ChatMLTemplate())


def test_eurollm_tokenizer_turns_a_dummy_prefix_off_and_needs_the_chatml_pieces(tmp_path):
    corpus = tiny_corpus(0)
    path = build_eurollm_tokenizer(tmp_path / "prefixed", corpus, add_dummy_prefix=True)["tokenizer_path"]
    raw = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert raw.encode("user", out_type=str)[0].startswith("\u2581")  # the model itself prepends "▁"
    tokenizer = EuroLLMTokenizer(str(path))
    pieces = [raw.id_to_piece(i) for i in tokenizer.encode("user\n", add_bos=False, add_eos=False)]
    assert not pieces[0].startswith("\u2581") and tokenizer.decode(tokenizer.encode("user\n")) == "user\n"
    assert "".join(pieces).replace("<0x0A>", "\n") == "user\n"

    plain = tmp_path / "plain"
    plain.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(plain / "sp"), vocab_size=300, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    with pytest.raises(ValueError, match="<\\|im_start\\|>"):
        EuroLLMTokenizer(str(plain / "sp.model"))
