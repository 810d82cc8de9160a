"""EuroLLM (utter-project/EuroLLM-*): model builders and a ChatML tokenizer for torchtune 0.6.1, which has neither.

EuroLLM is a plain Llama (``LlamaForCausalLM``): GQA, SwiGLU, RMSNorm, RoPE with ``rope_theta`` 10000 and no
rope scaling, untied embeddings. torchtune's ``llama3`` component builder is exactly that architecture (its RoPE
is the plain :class:`~torchtune.modules.RotaryPositionalEmbeddings`; the Llama 3.1 scaling lives in
``llama3_1``), so the builders here only fix its sizes, and EuroLLM checkpoints load with
``model_type: LLAMA3``.

The tokenizer is SentencePiece (unk 0, ``<s>`` 1, ``</s>`` 2, ``<|im_start|>`` 3, ``<|im_end|>`` 4 as
user-defined symbols) with a ChatML chat format that starts with a BOS::

    <s><|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|></s>

See :class:`EuroLLMTokenizer` for what is masked and how the end of the conversation is written.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from sentencepiece import SentencePieceProcessor
from torchtune.data import ChatMLTemplate, Message, PromptTemplate, truncate
from torchtune.data._prompt_templates import _get_prompt_template, _TemplateType
from torchtune.models.llama3 import llama3
from torchtune.modules import TransformerDecoder
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer, SentencePieceBaseTokenizer

from rao_tune.models.reward import reward_model

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
_SPIECE_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


# --- Models ---------------------------------------------------------------------------------------------------


def eurollm(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int = 4096,
    rope_base: float = 10000.0,
    norm_eps: float = 1e-5,
) -> TransformerDecoder:
    """A EuroLLM decoder of any size: plain Llama blocks (head_dim = embed_dim / num_heads), RoPE with
    ``rope_base`` and no scaling, untied output projection. Checkpoints convert with ``model_type: LLAMA3``."""
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
    return llama3(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        rope_base=rope_base,
        norm_eps=norm_eps,
    )


def eurollm_9b() -> TransformerDecoder:
    """EuroLLM-9B (base or Instruct): 42 layers, hidden 4096, 32 heads / 8 KV heads, MLP 12288, vocab 128000
    (9.15e9 parameters)."""
    return eurollm(
        vocab_size=128_000,
        num_layers=42,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        intermediate_dim=12288,
        max_seq_len=4096,
        rope_base=10000.0,
        norm_eps=1e-5,
    )


def eurollm_1_7b() -> TransformerDecoder:
    """EuroLLM-1.7B (base or Instruct): 24 layers, hidden 2048, 16 heads / 8 KV heads, MLP 5632, vocab 128000
    (1.66e9 parameters)."""
    return eurollm(
        vocab_size=128_000,
        num_layers=24,
        num_heads=16,
        num_kv_heads=8,
        embed_dim=2048,
        intermediate_dim=5632,
        max_seq_len=4096,
        rope_base=10000.0,
        norm_eps=1e-5,
    )


def eurollm_9b_reward_model() -> TransformerDecoder:
    """EuroLLM-9B with a one-output score head (see :func:`rao_tune.models.reward_model`)."""
    return reward_model(eurollm_9b)


def eurollm_1_7b_reward_model() -> TransformerDecoder:
    """EuroLLM-1.7B with a one-output score head (see :func:`rao_tune.models.reward_model`)."""
    return reward_model(eurollm_1_7b)


# --- Tokenizer ------------------------------------------------------------------------------------------------


def _processor_without_dummy_prefix(processor: SentencePieceProcessor) -> SentencePieceProcessor:
    """``processor``, or a copy of it that does not prepend "▁" to the text it encodes.

    Each text piece of a chat (``"user\\n"``, a message's content, ``"\\n"``) is encoded on its own, and each is
    a continuation of the text before it, not the start of a document: a dummy prefix would put a space after
    every special token. Without one, the pieces encode as a whole-string encoding of the chat would (and as
    Hugging Face tokenizers with ``legacy=False`` / Metaspace ``prepend_scheme="first"`` do).
    """
    first = processor.encode("a", out_type=str)
    if not first or not first[0].startswith(_SPIECE_SPACE):
        return processor
    try:  # protobuf comes with torchtune (kagglehub); only a model with a dummy prefix needs it
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:  # pragma: no cover
        raise ImportError("EuroLLMTokenizer: this SentencePiece model adds a dummy prefix; turning it off needs "
                          "the protobuf package") from err
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    return SentencePieceProcessor(model_proto=proto.SerializeToString())


class EuroLLMTokenizer(ModelTokenizer, Transform):
    """EuroLLM's SentencePiece tokenizer with its ChatML format.

    Layout of ``tokenize_messages`` (``{x}`` is the encoded text x)::

        <s>                                                   always masked (never a target)
        per message:  <|im_start|>{role\\n}                     header
                      {content}<|im_end|>{\\n}                  body and footer
        final assistant message, add_end_tokens=True:   <|im_start|>{assistant\\n}{content}<|im_end|></s>
        final assistant message, add_end_tokens=False:  <|im_start|>{assistant\\n}{content}
        any other final message, add_end_tokens=True:   ... footer as above, then </s>

    Masks: each message's tokens follow ``message.masked``, except an assistant message's header, which is
    always masked (it is the generation prompt: given, never generated), and ``<s>`` / ``</s>``, which are
    always masked. So an unmasked answer trains ``{content}<|im_end|>`` (plus the ``\\n`` after ``<|im_end|>``
    when the assistant turn is not the last message): the stop token ``<|im_end|>`` is learned.

    The end of a conversation is ``<|im_end|></s>`` with no ``\\n`` in between: generation stops at the first
    of ``stop_tokens`` (``<|im_end|>``, ``</s>``), so a ``\\n`` there would never be generated, and ``</s>`` is
    masked (as Llama 3's end-of-text is in torchtune). A masked ``</s>`` also keeps the last scored token of a
    reward-model sequence ``<|im_end|>``, never the pad id (EuroLLM pads with ``</s>``), so transformers'
    ``*ForSequenceClassification`` (which scores the last non-pad token) reads the same position we do.
    With an empty final assistant message and ``add_end_tokens=False`` the tokens end with the assistant
    header: the generation prompt.

    Text is encoded by the SentencePiece model, piece by piece, without a dummy prefix (see
    :func:`_processor_without_dummy_prefix`); message content is not stripped. ``<|im_start|>`` /
    ``<|im_end|>`` are user-defined symbols of the model, so they encode as one token wherever they appear,
    in message text too (as Hugging Face's tokenizer and chat template would do with the same text); ``<s>``
    and ``</s>`` are control symbols and, spelled in text, encode as ordinary characters.

    Args:
        path: the SentencePiece model (``tokenizer.model``).
        max_seq_len: truncate ``tokenize_messages``' output to this length (keeping ``</s>`` when it ends
            with one).
        prompt_template: optional torchtune prompt template (not ChatML: this tokenizer writes ChatML itself).
    """

    def __init__(
        self,
        path: str,
        max_seq_len: Optional[int] = None,
        prompt_template: Optional[PromptTemplate] = None,
    ) -> None:
        if isinstance(prompt_template, ChatMLTemplate):
            raise ValueError("EuroLLMTokenizer writes ChatML itself; a ChatMLTemplate would wrap every message twice")
        self._spm_model = SentencePieceBaseTokenizer(path)
        self._spm_model.spm_model = _processor_without_dummy_prefix(self._spm_model.spm_model)
        processor = self._spm_model.spm_model
        self.vocab_size = processor.vocab_size()
        self.bos_id = processor.bos_id()
        self.eos_id = processor.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the SentencePiece model has no BOS or EOS token")
        # EuroLLM pads with </s>; a model that defines its own pad piece keeps it.
        self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else self.eos_id
        self.unk_id = processor.unk_id()
        self.im_start_id = self._piece_id(processor, IM_START, path)
        self.im_end_id = self._piece_id(processor, IM_END, path)
        self.special_tokens = {
            processor.id_to_piece(self.bos_id): self.bos_id,
            processor.id_to_piece(self.eos_id): self.eos_id,
            IM_START: self.im_start_id,
            IM_END: self.im_end_id,
        }
        if self.unk_id >= 0:
            self.special_tokens[processor.id_to_piece(self.unk_id)] = self.unk_id
        self.stop_tokens = [self.im_end_id, self.eos_id]
        self.max_seq_len = max_seq_len
        self.prompt_template = prompt_template

    @staticmethod
    def _piece_id(processor: SentencePieceProcessor, piece: str, path: str) -> int:
        token_id = processor.piece_to_id(piece)
        if processor.id_to_piece(token_id) != piece:  # unknown pieces map to unk
            raise ValueError(f"{path}: the SentencePiece model has no {piece} piece; is it a EuroLLM tokenizer?")
        return token_id

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of ``text`` (``<|im_start|>`` / ``<|im_end|>`` in it become their single tokens)."""
        return self._spm_model.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids``; ``<s>`` / ``</s>`` decode to nothing, the ChatML markers to their text."""
        return self._spm_model.decode(token_ids)

    def _text(self, text: str) -> list[int]:
        return self.encode(text, add_bos=False, add_eos=False)

    def tokenize_messages(
        self, messages: list[Message], *, add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Tokens and masks (True: not a target) of ``messages`` in EuroLLM's ChatML (see the class docstring).

        ``add_end_tokens=False`` leaves the final assistant message open (no ``<|im_end|>``, no ``</s>``): for
        generation and for prompts, whose empty final assistant message then yields just its header.
        """
        if self.prompt_template is not None:
            messages = self.prompt_template(messages)
        tokens = [self.bos_id]
        mask = [True]
        for i, message in enumerate(messages):
            is_last = i == len(messages) - 1
            header = [self.im_start_id] + self._text(f"{message.role}\n")
            body: list[int] = []
            for item in message.content:
                if item["type"] != "text":
                    raise RuntimeError(f"EuroLLMTokenizer: unsupported message content type {item['type']!r}")
                body += self._text(item["content"])
            if message.role == "assistant" and is_last:
                footer = [self.im_end_id] if add_end_tokens else []
            else:
                footer = [self.im_end_id] + self._text("\n")
            header_masked = True if message.role == "assistant" else message.masked
            tokens += header + body + footer
            mask += [header_masked] * len(header) + [message.masked] * (len(body) + len(footer))
            if self.max_seq_len and len(tokens) >= self.max_seq_len:
                break
        if add_end_tokens:
            tokens.append(self.eos_id)
            mask.append(True)
        if self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Replace ``sample["messages"]`` by ``sample["tokens"]`` and ``sample["mask"]`` (end tokens unless
        ``inference``)."""
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def eurollm_tokenizer(
    path: str, max_seq_len: Optional[int] = None, prompt_template: Optional[_TemplateType] = None
) -> EuroLLMTokenizer:
    """Config builder of :class:`EuroLLMTokenizer`: ``path`` is EuroLLM's ``tokenizer.model``;
    ``prompt_template`` may be a dotted path or a role -> (prepend, append) mapping, as in torchtune."""
    template = _get_prompt_template(prompt_template) if prompt_template is not None else None
    return EuroLLMTokenizer(path, max_seq_len=max_seq_len, prompt_template=template)
