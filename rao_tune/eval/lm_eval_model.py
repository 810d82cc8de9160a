"""An lm-eval model over a torchtune model and tokenizer (no hub id, no HFLM): what ``recipes/evaluate.py`` runs.

torchtune 0.6.1's own wrapper subclasses ``HFLM(pretrained="gpt2")``, which reaches for the hub, and its eval recipe
breaks with lm-eval >= 0.4.10. This one implements lm-eval's ``TemplateLM`` directly:

- ``loglikelihood``: sum of log p(continuation tokens | context), and whether greedy decoding would produce them;
  batched, right-padded, sequences cut from the left to ``max_seq_len``.
- ``loglikelihood_rolling``: the whole text in disjoint windows of ``max_seq_len`` (lm-eval's own window helpers).
- ``generate_until``: batched generation with a KV cache (:func:`rao_tune.eval.generation.generate_tokens`),
  cut at the task's stop strings.
- ``chat_format=True`` renders each context as a user turn in the model's chat format, ending with the assistant
  header (as our training prompts), for instruction-tuned evaluation such as GSM8K chain-of-thought zero-shot.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from torchtune.data import Message
from tqdm.auto import tqdm

from rao_tune.data.reward_dataset import tokenize_prompt
from rao_tune.eval.generation import generate_tokens, stop_token_ids


class TorchtuneLM(TemplateLM):
    """lm-eval model over ``model`` (a torchtune ``TransformerDecoder``) and its torchtune ``tokenizer``.

    Args:
        batch_size: sequences per forward pass.
        max_seq_len: the longest sequence scored at once (default: the model's ``max_seq_len``).
        max_new_tokens: default generation length when a task gives no ``max_gen_toks``.
        chat_format: render contexts as a user turn of the tokenizer's chat format.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = 8,
        max_seq_len: Optional[int] = None,
        max_new_tokens: int = 256,
        chat_format: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self._device, self.dtype = device, dtype
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len or model.max_seq_len
        self.max_new_tokens = max_new_tokens
        self.chat_format = chat_format

    # --- tokenization ---------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: the BOS, or the end of text for tokenizers without one (Qwen)."""
        bos_id = getattr(self.tokenizer, "bos_id", None)
        return bos_id if bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_bos=add_special_tokens is not False, add_eos=False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _chat_prompt(self, context: str) -> list[int]:
        return tokenize_prompt(self.tokenizer, [Message(role="user", content=context, masked=True)])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not self.chat_format:
            return super()._encode_pair(context, continuation)
        # The answer opens the assistant turn: lm-eval's target delimiter (a space) is not part of it.
        return self._chat_prompt(context), self.tok_encode(continuation.lstrip(), add_special_tokens=False)

    # --- scoring ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """For each ``(key, context_tokens, continuation_tokens)``: (sum log p(continuation), is greedy)."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        # Longest first: the batches' padding stays small and a too-long input fails at once.
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=disable_tqdm):
            indices = order[start : start + self.batch_size]
            inputs, targets = [], []
            for i in indices:
                _, context, continuation = requests[i]
                if not continuation:
                    raise ValueError("lm-eval asked for the log-likelihood of an empty continuation")
                sequence = (context + continuation)[-(self.max_seq_len + 1) :]
                inputs.append(sequence[:-1])
                targets.append(continuation)
            width = max(len(seq) for seq in inputs)
            tokens = torch.full((len(inputs), width), self.tokenizer.pad_id, dtype=torch.long)
            for row, seq in enumerate(inputs):
                tokens[row, : len(seq)] = torch.tensor(seq)
            logits = self.model(tokens.to(self._device))
            logits = torch.cat(logits, dim=1) if isinstance(logits, list) else logits
            for row, i in enumerate(indices):
                # The continuation's n tokens are predicted by the last n positions of this row's input.
                n, end = len(targets[row]), len(inputs[row])
                logps = F.log_softmax(logits[row, end - n : end].float(), dim=-1)
                target = torch.tensor(targets[row], device=logps.device)
                total = logps.gather(-1, target.unsqueeze(-1)).sum().item()
                greedy = bool((logps.argmax(-1) == target).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text), the text scored in disjoint windows of at most ``max_seq_len`` tokens after a BOS."""
        scores = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_seq_len,
                    context_len=1,
                )
            ]
            pieces = self._loglikelihood_tokens([(None, context, continuation) for context, continuation in windows],
                                                disable_tqdm=True)
            scores.append(sum(logp for logp, _ in pieces))
        return scores

    # --- generation -----------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations, cut at the first of the task's ``until`` strings."""
        outputs: list[str] = []
        # Requests with the same generation settings run in batches together.
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            _, gen_kwargs = request.args
            key = (
                tuple(gen_kwargs.get("until", []) or []),
                int(gen_kwargs.get("max_gen_toks", self.max_new_tokens)),
                float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", False) else 0.0,
            )
            groups.setdefault(key, []).append(index)
        texts: dict[int, str] = {}
        for (until, max_new_tokens, temperature), indices in tqdm(list(groups.items()), desc="generate_until",
                                                                   disable=disable_tqdm):
            prompts = []
            for i in indices:
                context = requests[i].args[0]
                prompt = self._chat_prompt(context) if self.chat_format else self.tok_encode(context)
                prompts.append(prompt[-(self.max_seq_len - max_new_tokens) :])
            new_tokens = generate_tokens(
                self.model, prompts, max_new_tokens=max_new_tokens, pad_id=self.tokenizer.pad_id,
                stop_tokens=stop_token_ids(self.tokenizer), device=self._device, dtype=self.dtype,
                temperature=temperature, batch_size=self.batch_size,
            )
            for i, tokens in zip(indices, new_tokens):
                text = self.tok_decode(tokens)
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                texts[i] = text
        outputs = [texts[i] for i in range(len(requests))]
        return outputs
