"""Any HF Llama/Qwen2 folder as it is: rao_tune.models.hf_model builds the decoder from config.json, torchtune's
checkpointer loads and saves the weights, and the logits equal transformers' on the same folder (random tiny
folders of each architecture, tied and untied, and the real SmolLM2-135M-Instruct); the model's own tokenizer and
chat template give apply_chat_template's ids."""

import json
import random

import pytest
import torch
from torchtune import training
from torchtune.data import Message
from torchtune.training import FullModelHFCheckpointer

from rao_tune.models import HFChatTokenizer, RewardModelHFCheckpointer, hf_model, hf_model_type, lora_hf_model
from rao_tune.models import reward_model

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
CASES = {
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=100000.0)),
    # Llama 3.1's rope scaling, with frequency factors other than torchtune's defaults and a short original
    # context, so that scaling changes the rope at these lengths.
    "llama_untied_rope_scaled": ("LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                      "original_max_position_embeddings": 32})),
    "qwen2_tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2_untied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1000000.0)),
}


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_folder(request, tmp_path_factory):
    """A random tiny HF checkpoint folder written by transformers itself; q/k/v biases (Qwen2) get random values
    (transformers starts them at 0, which would hide a missing bias)."""
    architecture, extra = CASES[request.param]
    torch.manual_seed(0)
    model_class = getattr(transformers, architecture)
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    model = model_class(config_class(**TINY, **extra)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return folder


def load_tune(folder, output_dir, **kwargs):
    model = hf_model(str(folder), **kwargs)
    checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(folder), checkpoint_files=["model.safetensors"],
                                           model_type=hf_model_type(folder), output_dir=str(output_dir))
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    return model.eval(), checkpointer


def tokens_for(vocab_size, seed=0, shape=(2, 48)):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_logits_equal_transformers_and_the_export_loads_back(hf_folder, tmp_path):
    ours, checkpointer = load_tune(hf_folder, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    tokens = tokens_for(TINY["vocab_size"], shape=(2, 200))  # past the original context of the rope-scaled case
    with torch.no_grad():
        assert relative_error(ours(tokens), theirs(tokens).logits) < 1e-4
    # Out again in HF format (tied weights stay tied: no lm_head written); transformers reads our export.
    checkpointer.save_checkpoint({training.MODEL_KEY: ours.state_dict()}, epoch=0)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "epoch_0", dtype=torch.float32)
    with torch.no_grad():
        assert relative_error(exported.eval()(tokens).logits, theirs(tokens).logits) < 1e-6


def test_legacy_rope_keys_and_refused_fields(tmp_path):
    """transformers < 5 writes rope_theta / rope_scaling, 5 writes rope_parameters: both read the same. Fields the
    builders cannot honour are refused by name."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **TINY, "rope_theta": 1234.0,
              "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hf_model(str(tmp_path)).layers[0].attn.pos_embeddings.base == 1234.0
    config.pop("rope_theta")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 4321.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hf_model(str(tmp_path)).layers[0].attn.pos_embeddings.base == 4321.0
    for change, named in [({"attention_bias": True}, "attention_bias=True"), ({"hidden_act": "gelu"}, "hidden_act=gelu"),
                          ({"head_dim": 32}, "head_dim=32"),
                          ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
                          ({"model_type": "gemma"}, "model_type 'gemma'")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=named.replace("(", r"\(")):
            hf_model(str(tmp_path))


def test_lora_model_starts_as_the_base_model(hf_folder, tmp_path):
    base, checkpointer = load_tune(hf_folder, tmp_path / "out")
    lora = lora_hf_model(str(hf_folder), ["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8)
    missing = lora.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY], strict=False).missing_keys
    assert missing and all(".lora_" in name for name in missing)
    for name, parameter in lora.named_parameters():
        if name.endswith("lora_b.weight"):
            torch.nn.init.zeros_(parameter)
        elif name.endswith("lora_a.weight"):
            torch.nn.init.normal_(parameter)
    tokens = tokens_for(TINY["vocab_size"])
    with torch.no_grad():
        assert relative_error(lora.eval()(tokens), base(tokens)) < 1e-6


def test_reward_model_on_an_hf_folder_exports_a_sequence_classifier(hf_folder, tmp_path):
    """A reward model whose decoder is hf_model: the causal LM's body with a new score head; the export is a
    *ForSequenceClassification folder whose transformers score is ours at the last token."""
    model_type = hf_model_type(hf_folder)
    model = reward_model(decoder="rao_tune.models.hf_model", checkpoint_dir=str(hf_folder))
    checkpointer = RewardModelHFCheckpointer(checkpoint_dir=str(hf_folder), output_dir=str(tmp_path),
                                             model_type=model_type, pad_token_id=0)
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    checkpointer.save_checkpoint({training.MODEL_KEY: model.state_dict()}, epoch=0)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "epoch_0",
                                                                                 dtype=torch.float32).eval()
    tokens = tokens_for(TINY["vocab_size"]).clamp(min=1)  # no pad id (0) inside: the last token is the last position
    with torch.no_grad():
        ours = model.eval()(tokens)[:, -1, 0]
        theirs = classifier(tokens).logits[:, 0]
    assert relative_error(ours, theirs) < 1e-5


# --- the model's own tokenizer and chat template --------------------------------------------------------------------

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3's shape: a BOS from the template, headers, content trimmed, <|eot_id|> ends a turn.
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]
WORDS = ["count", "to", "ten", "résumé", "naïve", "日本語", "emoji 🙂", "  two  spaces", "tab\there", "new\nline",
         "JSON {\"a\": 1}", "", "-", "1.", "Apple", "über", "ünïcödé", "why?", "'quoted'", "end."]


def write_tokenizer_folder(folder, template, bos, eos):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([" ".join(WORDS) * 3, "system user assistant helpful"] * 20, trainer)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": eos, "pad_token": "<|endoftext|>", "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def conversations(count, seed=0, answers_start_with_text=True):
    """Varied chats: with and without a system prompt, one to three turns, unicode, empty content. With
    ``answers_start_with_text``, no answer starts with whitespace (see test_answer_starting_with_whitespace)."""
    rng = random.Random(seed)
    words = [word for word in WORDS if word[:1].strip()] if answers_start_with_text else WORDS
    chats = []
    for index in range(count):
        chat = [{"role": "system", "content": " ".join(rng.sample(WORDS, 3))}] if index % 3 == 0 else []
        for _ in range(1 + index % 3):
            chat.append({"role": "user", "content": " ".join(rng.sample(WORDS, rng.randint(0, 4)))})
            chat.append({"role": "assistant", "content": " ".join(rng.sample(words, rng.randint(0, 5)))})
        chats.append(chat)
    return chats


def byte_level_text(tokenizer, ids):
    """The text of ``ids`` read straight off the byte-level vocabulary (GPT-2's byte <-> character table), without
    the tokenizer's decoder, whose space handling after special tokens differs between tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = printable + [256 + n for n in range(256 - len(printable))]
    to_byte = {chr(c): b for b, c in zip(printable + [b for b in range(256) if b not in printable], characters)}
    raw = tokenizer._tokenizer
    special = {token.content for token in raw.get_added_tokens_decoder().values()}
    data = b""
    for token in map(raw.id_to_token, ids):
        data += token.encode() if token in special else bytes(to_byte[c] for c in token)
    return data.decode()


def as_messages(chat):
    return [Message(role=m["role"], content=m["content"], masked=m["role"] != "assistant") for m in chat]


def apply_chat_template(hf_tokenizer, chat, **kwargs):
    ids = hf_tokenizer.apply_chat_template(chat, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("template, bos, eos", [(CHATML, "<|im_start|>", "<|im_end|>"),
                                                (LLAMA3, "<|begin_of_text|>", "<|eot_id|>")], ids=["chatml", "llama3"])
def test_token_ids_equal_apply_chat_template_and_the_mask_trains_answers(tmp_path, template, bos, eos):
    folder = write_tokenizer_folder(tmp_path / "tok", template, bos, eos)
    ours = HFChatTokenizer(str(folder))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    chats = conversations(60)
    for chat in chats:
        tokens, mask = ours.tokenize_messages(as_messages(chat))
        assert tokens == apply_chat_template(theirs, chat), chat
        assert tokens[0] == ours.first_token_id  # t0
        # Trained: each answer (as the template renders it) and the end of its turn, nothing else.
        trained = byte_level_text(ours, [t for t, m in zip(tokens, mask) if not m])
        answers = [m["content"].strip() if template == LLAMA3 else m["content"] for m in chat if m["role"] == "assistant"]
        assert trained == "".join(answer + eos for answer in answers), chat
    # The prompt the model answers: an open assistant turn, as add_generation_prompt renders it.
    for chat in chats[:10]:
        prompt = as_messages(chat[:-1]) + [Message(role="assistant", content="")]
        tokens, _ = ours.tokenize_messages(prompt, add_end_tokens=False)
        assert tokens == apply_chat_template(theirs, chat[:-1], add_generation_prompt=True)
    assert ours.stop_tokens == [theirs.convert_tokens_to_ids(eos)]


def test_an_answer_starting_with_whitespace_is_split_where_generation_splits_it(tmp_path):
    """Whole-text BPE joins the header's newline with an answer's leading space ("\n " + " two"); the tokens a
    model generates after the prompt cannot, so the answer is tokenized after the prompt, as sampled."""
    ours = HFChatTokenizer(str(write_tokenizer_folder(tmp_path / "tok", CHATML, "<|im_start|>", "<|im_end|>")))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    chat = [{"role": "user", "content": "count"}, {"role": "assistant", "content": "  two  spaces"}]
    tokens, mask = ours.tokenize_messages(as_messages(chat))
    prompt = apply_chat_template(theirs, chat[:1], add_generation_prompt=True)
    answer = len(tokens) - len(prompt) - 1  # the template's "\n" after <|im_end|> is not trained
    assert tokens[: len(prompt)] == prompt and mask == [True] * len(prompt) + [False] * answer + [True]
    assert byte_level_text(ours, tokens[len(prompt): -1]) == "  two  spaces<|im_end|>"
    assert byte_level_text(ours, tokens) == theirs.apply_chat_template(chat, tokenize=False)


def test_a_template_without_a_shared_first_token_is_refused(tmp_path):
    folder = write_tokenizer_folder(tmp_path / "tok", "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                                    "<|begin_of_text|>", "<|eot_id|>")
    with pytest.raises(ValueError, match="shared first token t0"):
        HFChatTokenizer(str(folder))


def test_tokenizer_pickles_to_the_same_tokenizer(tmp_path):
    import pickle

    ours = HFChatTokenizer(str(write_tokenizer_folder(tmp_path / "tok", CHATML, "<|im_start|>", "<|im_end|>")))
    again = pickle.loads(pickle.dumps(ours))
    chat = as_messages(conversations(2)[1])
    assert again.tokenize_messages(chat) == ours.tokenize_messages(chat)
    assert pickle.dumps(again) == pickle.dumps(ours)  # the dataset cache's fingerprint is stable


# --- the real model ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_logits_equal_transformers(smollm2_dir, tmp_path):
    ours, _ = load_tune(smollm2_dir, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokens = tokens_for(49152, shape=(2, 64))
    with torch.no_grad():
        assert relative_error(ours(tokens), theirs(tokens).logits) < 1e-4


@pytest.mark.slow
def test_smollm2_tokenizer_equals_apply_chat_template(smollm2_dir):
    ours = HFChatTokenizer(str(smollm2_dir))
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for chat in conversations(50, seed=1):
        tokens, mask = ours.tokenize_messages(as_messages(chat))
        assert tokens == apply_chat_template(theirs, chat), chat
        trained = byte_level_text(ours, [t for t, m in zip(tokens, mask) if not m])
        assert trained == "".join(m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant")
    # SmolLM2's vocabulary has the token "\n " that whole-text BPE puts across an answer's start; ours splits there.
    chat = [{"role": "user", "content": "count"}, {"role": "assistant", "content": "  two"}]
    tokens, mask = ours.tokenize_messages(as_messages(chat))
    prompt = apply_chat_template(theirs, chat[:1], add_generation_prompt=True)
    assert tokens[: len(prompt)] == prompt != apply_chat_template(theirs, chat)[: len(prompt)]
    assert byte_level_text(ours, [t for t, m in zip(tokens, mask) if not m]) == "  two<|im_end|>"
    assert ours.first_token_id == theirs.convert_tokens_to_ids("<|im_start|>")
    assert ours.stop_tokens == [theirs.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.slow
def test_smollm2_greedy_generation_equals_transformers(smollm2_dir, tmp_path):
    """Our generation path (chat prompt, pad id, KV cache) on the real model gives transformers' greedy tokens. Its
    pad token (<|endoftext|>) never occurs in a prompt; the folder's own pad_token is <|im_end|>, which ends every
    turn, and torchtune's generate hides every prompt token equal to the pad id."""
    from rao_tune.eval.generation import decode_batch, generate_tokens

    ours, _ = load_tune(smollm2_dir, tmp_path / "out")
    tokenizer = HFChatTokenizer(str(smollm2_dir))
    assert tokenizer.pad_id == 0 and tokenizer.pad_id not in tokenizer.stop_tokens
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for question in ["List three fruits, one per line.", "Describe tea. Do not use any commas."]:
        prompt, _ = tokenizer.tokenize_messages([Message(role="user", content=question),
                                                 Message(role="assistant", content="")], add_end_tokens=False)
        assert 2 in prompt  # <|im_end|> closes the system turn: it must stay visible
        ours_new = generate_tokens(ours, [prompt], max_new_tokens=12, pad_id=tokenizer.pad_id,
                                   stop_tokens=tokenizer.stop_tokens, device=torch.device("cpu"), dtype=torch.float32)[0]
        with torch.no_grad():
            generated = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
        theirs_new = generated.tolist()
        theirs_new = theirs_new[: theirs_new.index(2)] if 2 in theirs_new else theirs_new
        assert ours_new == theirs_new, (question, tokenizer.decode(ours_new), tokenizer.decode(theirs_new))
    with pytest.raises(ValueError, match="occurs inside a prompt"):
        decode_batch(ours, [prompt], max_new_tokens=2, pad_id=2, stop_tokens=[2], device=torch.device("cpu"),
                     dtype=torch.float32)
