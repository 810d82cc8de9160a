"""Any Hugging Face model's own tokenizer and chat template as a torchtune tokenizer.

torchtune 0.6.1 wraps a ``tokenizer.json`` (``HuggingFaceBaseTokenizer``) but renders no chat template, so a model
whose tokenizer torchtune does not ship (SmolLM2, any fine-tune with its own template) cannot be trained in its
own chat format. :class:`HFChatTokenizer` renders conversations with the folder's Jinja template as
``transformers``' ``apply_chat_template`` does (same sandbox, filters and variables) and tokenizes the text in
spans: the trained ones are each assistant message's content and its end of turn (the stop token that follows
it), everything else is masked. The ids are ``apply_chat_template(..., tokenize=True)``'s except where a BPE
token would straddle the start of an answer (an answer that starts with whitespace after the header's newline):
there the text is split at the answer's start, as generation splits it (the prompt is tokenized first), so a
prompt's tokens are always a prefix of its conversation's and the answer's tokens are the ones a sampler emits.

RAO's normaliser is the prompt's log-ratio after a shared first token t0, so every rendered conversation must
start with the same token: the tokenizer checks this on probe conversations (with and without a system prompt)
and refuses a template that does not.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from tokenizers import Tokenizer
from torchtune.data import Message

_PROBES = (  # conversations whose first token must agree (t0)
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": ""}],
)


def _token_text(value: Any) -> Optional[str]:
    """``tokenizer_config.json`` spells a special token as a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile(template: str):
    """The template in the sandbox ``transformers`` renders chat templates in (trim_blocks, lstrip_blocks, loop
    controls; ``tojson`` without HTML escaping, ``raise_exception``, ``strftime_now``)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return environment.from_string(template)


class HFChatTokenizer:
    """Tokenizer of an HF model folder (``tokenizer.json``, ``tokenizer_config.json``, and ``chat_template.jinja``
    or the config's ``chat_template``; ``generation_config.json`` adds stop tokens), with the torchtune interface
    the recipes use: ``tokenize_messages``, ``encode``, ``decode``, ``bos_id``, ``eos_id``, ``pad_id``,
    ``stop_tokens``.

    Args:
        path: the model folder.
        max_seq_len: cut ``tokenize_messages``' output to this many tokens (None: no cut).

    YAML::

        tokenizer:
          _component_: rao_tune.models.HFChatTokenizer
          path: ${model_dir}
    """

    def __init__(self, path: Union[str, Path], max_seq_len: Optional[int] = None,
                 pad_token: Optional[str] = None) -> None:
        self.path = Path(path)
        self.max_seq_len = max_seq_len
        tokenizer_file, config_file = self.path / "tokenizer.json", self.path / "tokenizer_config.json"
        for required in (tokenizer_file, config_file):
            if not required.is_file():
                raise FileNotFoundError(f"{required} not found: HFChatTokenizer needs an HF model folder's tokenizer")
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config = json.loads(config_file.read_text())
        template_file = self.path / "chat_template.jinja"
        self.chat_template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = {entry["name"]: entry["template"] for entry in self.chat_template}.get("default")
        if not isinstance(self.chat_template, str):
            raise ValueError(f"{self.path}: no chat template (neither chat_template.jinja nor tokenizer_config.json's "
                             "chat_template): HFChatTokenizer renders conversations with the model's own template")
        # The special tokens the template sees: only those that are set (a null bos_token must not render "None").
        self.special_token_texts = {
            key: text for key in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
                                  "mask_token")
            if (text := _token_text(config.get(key))) is not None
        }
        self.bos_id = self._id_of(self.special_token_texts.get("bos_token"))
        self.eos_id = self._id_of(self.special_token_texts.get("eos_token"))
        if self.eos_id is None:
            raise ValueError(f"{config_file}: eos_token is missing or not in the vocabulary")
        stop_tokens = [self.eos_id]
        generation_file = self.path / "generation_config.json"
        if generation_file.is_file():
            generation_eos = json.loads(generation_file.read_text()).get("eos_token_id")
            for token_id in generation_eos if isinstance(generation_eos, list) else [generation_eos]:
                if token_id is not None and token_id not in stop_tokens:
                    stop_tokens.append(int(token_id))
        self.stop_tokens = stop_tokens
        self._stop_texts = [self._tokenizer.id_to_token(token_id) for token_id in stop_tokens]
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._template = None
        self.first_token_id = self._check_first_token()
        self.pad_id = self._choose_pad_id(pad_token)

    def _id_of(self, text: Optional[str]) -> Optional[int]:
        return None if text is None else self._tokenizer.token_to_id(text)

    # Pickled as its files' content (the dataset cache fingerprints the tokenizer's pickled state).
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_template"] = None
        state["_tokenizer"] = self._tokenizer.to_str()
        return state

    def __setstate__(self, state: dict) -> None:
        state["_tokenizer"] = Tokenizer.from_str(state["_tokenizer"])
        self.__dict__.update(state)

    # --- rendering ------------------------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as ``apply_chat_template(messages, tokenize=False, ...)`` renders it."""
        if self._template is None:
            self._template = _compile(self.chat_template)
        return self._template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **self.special_token_texts)

    def _check_first_token(self) -> int:
        firsts = {}
        for probe in _PROBES:
            ids = self._tokenizer.encode(self.render(probe, add_generation_prompt=True), add_special_tokens=False).ids
            firsts[json.dumps(probe)] = ids[0] if ids else None
        if len(set(firsts.values())) != 1 or None in firsts.values():
            shown = {probe: self._tokenizer.id_to_token(first) if first is not None else None
                     for probe, first in firsts.items()}
            raise ValueError(
                f"{self.path}: the chat template does not start every conversation with the same token ({shown}); "
                "RAO's normaliser needs a shared first token t0 (e.g. a BOS token or a fixed header)")
        return next(iter(firsts.values()))

    def _choose_pad_id(self, pad_token: Optional[str]) -> int:
        """A pad id that never occurs in a rendered conversation: torchtune's generation treats every prompt token
        equal to the pad id as padding, so a pad that is also the end of a turn (SmolLM2's pad_token is
        <|im_end|>) would hide each earlier turn's end from the model. The folder's pad_token if it qualifies,
        else its unk_token; ``pad_token`` names one explicitly."""
        probe = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
        used = set(self._tokenizer.encode(self.render(probe, add_generation_prompt=True), add_special_tokens=False).ids)
        candidates = [pad_token] if pad_token else [self.special_token_texts.get(k) for k in ("pad_token", "unk_token")]
        for text in candidates:
            token_id = self._id_of(text)
            if token_id is not None and token_id not in used and token_id not in self.stop_tokens:
                return token_id
        raise ValueError(f"{self.path}: neither pad_token nor unk_token is a token that rendered conversations never "
                         f"contain ({candidates}); name one with HFChatTokenizer(pad_token=...)")

    # --- the torchtune interface ----------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """``add_bos``: the special tokens tokenizer.json's post-processor adds, as HF's ``encode`` does (SmolLM2's
        adds none; Llama 3's adds <|begin_of_text|>)."""
        ids = self._tokenizer.encode(text, add_special_tokens=add_bos).ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages: Sequence[Message], add_end_tokens: bool = True) -> tuple[list[int], list[bool]]:
        """Tokens of the conversation in the model's template and torchtune's mask (True: not trained).

        With ``add_end_tokens=False`` and a final assistant message, the conversation stops where that message's
        content ends, without its end of turn: an empty final assistant message gives the prompt that generation
        continues (``add_generation_prompt=True``)."""
        chat = [{"role": m.role, "content": m.text_content} for m in messages]
        open_last = not add_end_tokens and bool(chat) and chat[-1]["role"] == "assistant"
        if open_last:
            text = self.render(chat[:-1], add_generation_prompt=True) + chat[-1]["content"]
        else:
            text = self.render(chat)
        trained_spans = []  # [start, end) character spans of trained text
        for index, (message, chat_message) in enumerate(zip(messages, chat)):
            if chat_message["role"] != "assistant" or message.masked:
                continue
            before = self.render(chat[:index], add_generation_prompt=True)  # what precedes the answer
            start = len(before)
            turn_end = len(self.render(chat[: index + 1]))  # the answer's stop token lies before the next turn
            if not text.startswith(before):
                raise ValueError(f"{self.path}: the chat template renders the conversation before message {index} "
                                 "differently once the message follows; cannot tell which tokens are the answer")
            if open_last and index == len(chat) - 1:
                trained_spans.append((start, len(text)))
                continue
            ends = [(text.find(stop, start, turn_end), stop) for stop in self._stop_texts]
            ends = [(position, stop) for position, stop in ends if position >= 0]
            if not ends:
                raise ValueError(f"{self.path}: no stop token ({self._stop_texts}) follows assistant message {index}")
            position, stop = min(ends)
            trained_spans.append((start, position + len(stop)))
        # Each span tokenized on its own: the answer's tokens are those generation produces after the prompt's,
        # even where one BPE token would have joined the header's last characters to the answer's first.
        tokens, mask, position = [], [], 0
        for begin, end in trained_spans + [(len(text), len(text))]:
            for piece, trained in ((text[position:begin], False), (text[begin:end], True)):
                ids = self._tokenizer.encode(piece, add_special_tokens=False).ids if piece else []
                tokens += ids
                mask += [not trained] * len(ids)
            position = end
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: dict, inference: bool = False) -> dict:
        """torchtune's Transform interface: ``{"messages"}`` -> adds ``tokens`` and ``mask``."""
        tokens, mask = self.tokenize_messages(sample["messages"], add_end_tokens=not inference)
        return {**sample, "tokens": tokens, "mask": mask}
