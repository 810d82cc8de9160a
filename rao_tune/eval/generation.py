"""Generation, one module for every use: loading a checkpoint for inference, one KV-cache decoding core
(:func:`decode_batch`, torchtune's ``generate``) under the sampler's and answers' batched :func:`generate_tokens`
and PPO's rollouts (:func:`rao_tune.training.ppo.sample_responses`), the backends that answer prompt files
(:class:`TorchtuneBackend`; :class:`VLLMBackend` on GPUs) and their sampling settings."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config, training, utils
from torchtune.generation import generate
from torchtune.modules.common_utils import local_kv_cache
from tqdm.auto import tqdm

from rao_tune.models.checkpoint_files import with_checkpoint_files

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torchtune", "vllm")
PathLike = Union[str, os.PathLike]


def load_for_inference(
    cfg_model: DictConfig, cfg_checkpointer: DictConfig, cfg_tokenizer: DictConfig, *, device: str, dtype: str
) -> tuple[nn.Module, Any, torch.device, torch.dtype]:
    """Model (weights from the HF checkpoint, eval mode, no grads), tokenizer, device and dtype from config. A
    checkpointer config without ``checkpoint_files`` reads those found in its ``checkpoint_dir``."""
    torch_device = utils.get_device(device=device)
    torch_dtype = training.get_dtype(dtype, device=torch_device)
    with training.set_default_dtype(torch_dtype), torch_device:
        model = config.instantiate(cfg_model)
    state_dict = config.instantiate(with_checkpoint_files(cfg_checkpointer)).load_checkpoint()[training.MODEL_KEY]
    model.load_state_dict(state_dict)
    model.eval().requires_grad_(False)
    return model, config.instantiate(cfg_tokenizer), torch_device, torch_dtype


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokens that end a turn: torchtune tokenizers' ``stop_tokens``, else their ``eos_id``."""
    return list(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """``[len(sequences), longest]`` token ids, each sequence right-aligned after ``pad_id`` padding: a batch of
    prompts whose continuations all start at the same column."""
    longest = max(len(sequence) for sequence in sequences)
    batch = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, longest - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
    return batch


def decode_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_tokens: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    stop_early: bool = True,
    rng: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding core of every generation here: ``prompts`` left-padded into one batch, continued by up to
    ``max_new_tokens`` with torchtune's ``generate`` and a KV cache sized for them. ``temperature == 0`` is
    greedy decoding; ``stop_early=False`` runs every decoding step even when all sequences have stopped (under
    FSDP each process must run the same forward passes). Returns the new tokens ``[B, <= max_new_tokens]`` (stop
    tokens included, padding after them) and the logits that chose them."""
    if any(pad_id in prompt for prompt in prompts):
        # torchtune's generate reads every prompt token equal to pad_id as padding and hides it.
        raise ValueError(f"pad id {pad_id} occurs inside a prompt: generation would mask those tokens; give the "
                         "tokenizer a pad token that prompts never contain")
    batch = left_padded(prompts, pad_id)
    width = batch.shape[1]
    with local_kv_cache(model, batch_size=len(prompts), device=device, dtype=dtype,
                        decoder_max_seq_len=width + max_new_tokens):
        tokens, logits = generate(
            model, batch.to(device), max_generated_tokens=max_new_tokens, pad_id=pad_id,
            temperature=temperature if temperature > 0 else 1.0, top_k=top_k if temperature > 0 else 1,
            stop_tokens=list(stop_tokens) if stop_early else None, rng=rng,
        )
    return tokens[:, width:], logits


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_tokens: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> list[list[int]]:
    """Continue each prompt (token ids) by up to ``max_new_tokens``; return only the new tokens, cut before the
    first stop token. ``temperature == 0`` is greedy decoding (the paper's setting). Prompts are decoded in
    batches of similar length (:func:`decode_batch`). ``progress`` is called with each finished batch's number
    of prompts (e.g. a progress bar's ``update``)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    rng = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        new_tokens, _ = decode_batch(
            model, [prompts[i] for i in indices], max_new_tokens=max_new_tokens, pad_id=pad_id,
            stop_tokens=stop_tokens, device=device, dtype=dtype, temperature=temperature, top_k=top_k, rng=rng,
        )
        for row, i in enumerate(indices):
            outputs[i] = cut_at_stop(new_tokens[row].tolist(), stop_tokens)
        if progress is not None:
            progress(len(indices))
    return outputs


def decode_text(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """The answer's text without special tokens and surrounding whitespace (as FastChat and AlpacaEval keep it)."""
    if "skip_special_tokens" in inspect.signature(tokenizer.decode).parameters:
        text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    else:
        text = tokenizer.decode(list(token_ids))
    return text.strip()


def cut_at_stop(tokens: Sequence[int], stop_tokens: Sequence[int]) -> list[int]:
    """``tokens`` up to (without) the first stop token."""
    stops = set(stop_tokens)
    return next((list(tokens[:i]) for i, token in enumerate(tokens) if token in stops), list(tokens))


# --- Backends ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """How answers are drawn; ``temperature == 0`` is greedy decoding (the paper's setting)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"sampling.top_k must be null or >= 1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class GenerationBackend(ABC):
    """Continues prompts given as token ids (rendered by our tokenizer) and returns only the new token ids,
    cut before the first stop token, showing a progress bar (labelled ``desc``) over the prompts: answering
    hundreds of prompts takes minutes to hours."""

    name: str

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 desc: Optional[str] = None) -> list[list[int]]:
        ...


class TorchtuneBackend(GenerationBackend):
    """torchtune's generation with a KV cache, in batches of ``batch_size`` prompts of similar length.

    torchtune samples with temperature and top-k only: ``top_p < 1`` with sampling is refused rather than
    silently ignored. A prompt too long for ``max_new_tokens`` within the model's ``max_seq_len`` gets fewer
    new tokens (with a warning).
    """

    name = "torchtune"

    def __init__(self, model: Any, tokenizer: Any, *, device: Any, dtype: Any, sampling: SamplingSettings,
                 batch_size: int = 8):
        if not sampling.greedy and sampling.top_p < 1:
            raise ValueError("the torchtune backend samples with temperature and top_k only; set sampling.top_p=1.0 "
                             "or use backend=vllm")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.sampling, self.batch_size = sampling, batch_size
        self.stop_tokens = stop_token_ids(tokenizer)
        self.pad_id = getattr(tokenizer, "pad_id", None)
        if self.pad_id is None:
            self.pad_id = 0
        self.max_seq_len = getattr(model, "max_seq_len", None)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 desc: Optional[str] = None) -> list[list[int]]:
        budgets = [max_new_tokens] * len(prompts)
        if self.max_seq_len is not None:
            budgets = [min(max_new_tokens, self.max_seq_len - len(prompt)) for prompt in prompts]
            too_long = [i for i, budget in enumerate(budgets) if budget < 1]
            if too_long:
                i = too_long[0]
                raise ValueError(f"prompt {i} has {len(prompts[i])} tokens, the model's max_seq_len is {self.max_seq_len}: "
                                 f"no room for an answer ({len(too_long)} such prompts)")
            shortened = sum(budget < max_new_tokens for budget in budgets)
            if shortened:
                log.warning("%d prompts leave room for fewer than max_new_tokens=%d new tokens within max_seq_len=%d; "
                            "their answers may be cut", shortened, max_new_tokens, self.max_seq_len)
        outputs: list[list[int]] = [[] for _ in prompts]
        with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
            for budget in sorted(set(budgets), reverse=True):  # one call when every prompt fits (the usual case)
                indices = [i for i, b in enumerate(budgets) if b == budget]
                new_tokens = generate_tokens(
                    self.model, [prompts[i] for i in indices], max_new_tokens=budget, pad_id=self.pad_id,
                    stop_tokens=self.stop_tokens, device=self.device, dtype=self.dtype,
                    temperature=self.sampling.temperature, top_k=self.sampling.top_k, batch_size=self.batch_size,
                    seed=self.sampling.seed, progress=bar.update,
                )
                for i, tokens in zip(indices, new_tokens):
                    outputs[i] = tokens
        return outputs


_VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class VLLMBackend(GenerationBackend):
    """vllm on GPUs (``pip install 'rao-tune[vllm]'``), imported only here.

    vllm reads the weights from the HF checkpoint folder but never tokenizes: prompts are token ids rendered by
    our tokenizer (so the chat format is the one the model was trained with), and the new token ids are decoded
    by our tokenizer too (``skip_tokenizer_init``). The progress bar is vllm's own (``use_tqdm``; it has its own
    label). Not run in CI (no GPU there).
    """

    name = "vllm"

    def __init__(self, model_dir: PathLike, tokenizer: Any, *, sampling: SamplingSettings, dtype: str = "bf16",
                 tensor_parallel_size: int = 1, **llm_kwargs: Any):
        try:
            import vllm
        except ImportError as err:
            raise ImportError("backend=vllm needs vllm on a GPU machine: pip install 'rao-tune[vllm]' "
                              "(or use backend=torchtune)") from err
        self._vllm = vllm
        self.sampling = sampling
        self.stop_tokens = stop_token_ids(tokenizer)
        self.llm = vllm.LLM(
            model=str(model_dir), dtype=_VLLM_DTYPES.get(dtype, dtype), tensor_parallel_size=tensor_parallel_size,
            seed=sampling.seed, skip_tokenizer_init=True, **llm_kwargs,
        )

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 desc: Optional[str] = None) -> list[list[int]]:
        params: dict[str, Any] = {
            "temperature": self.sampling.temperature, "top_p": self.sampling.top_p, "max_tokens": max_new_tokens,
            "stop_token_ids": list(self.stop_tokens), "seed": self.sampling.seed, "detokenize": False,
        }
        if self.sampling.top_k is not None:
            params["top_k"] = self.sampling.top_k
        if desc:
            log.info("%s: %d prompts", desc, len(prompts))
        results = self.llm.generate(
            [{"prompt_token_ids": list(prompt)} for prompt in prompts], self._vllm.SamplingParams(**params),
            use_tqdm=True,
        )
        return [cut_at_stop(list(result.outputs[0].token_ids), self.stop_tokens) for result in results]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` is vllm when it is installed and the device is a GPU, else torchtune."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = str(device).startswith("cuda")
    if backend == "auto":
        return "vllm" if on_gpu and vllm_available() else "torchtune"
    if backend == "vllm" and not on_gpu:
        raise ValueError(f"backend=vllm runs on GPUs only (device={device!r}); use backend=torchtune on CPU")
    return backend


@dataclass
class GenerationStats:
    prompts: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else float("nan")
        return f"{self.prompts} prompts, {self.new_tokens} new tokens in {self.seconds:.1f} s ({rate:.1f} tokens/s)"
