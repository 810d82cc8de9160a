"""HF-format checkpoints of reward models: read a causal LM or a ``*ForSequenceClassification`` checkpoint,
write a ``*ForSequenceClassification`` one that transformers loads.

torchtune 0.6.1's ``FullModelHFCheckpointer(model_type=REWARD)`` maps ``score.weight`` but not Qwen2's q/k/v
biases, and it cannot start a reward model from an SFT checkpoint (it saves under the names it loaded, so an
``lm_head.weight`` checkpoint cannot become ``score.weight``). This checkpointer converts the decoder body with
torchtune's own per-family converters and handles the head itself.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torchtune import training
from torchtune.models import convert_weights
from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune, qwen2_tune_to_hf
from torchtune.training.checkpointing._utils import RECIPE_STATE_DIRNAME, SAFETENSOR_INDEX_FNAME

from rao_tune.files import torch_save_atomically
from rao_tune.models.reward import init_score_head

log = logging.getLogger(__name__)

# model_type -> (HF sequence-classification class, hf->tune, tune->hf) for the decoder body.
_FAMILIES = {
    "LLAMA3": ("LlamaForSequenceClassification", convert_weights.hf_to_tune, convert_weights.tune_to_hf),
    "LLAMA3_2": ("LlamaForSequenceClassification", convert_weights.hf_to_tune, convert_weights.tune_to_hf),
    "QWEN2": ("Qwen2ForSequenceClassification", qwen2_hf_to_tune, qwen2_tune_to_hf),
}
_HEAD = "output.weight"  # torchtune's name for the score head
_MAX_SHARD_BYTES = 5 * 2**30
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MAX_COPIED_FILE_BYTES = 100 * 2**20


def _checkpoint_file_names(checkpoint_files: Union[list[str], dict[str, str], None], directory: Path) -> list[str]:
    """A list as given; torchtune's ``{filename_format, max_filename}`` form expanded; None: what the directory's
    index names, else every ``*.safetensors`` in it."""
    if checkpoint_files is None:
        index = directory / SAFETENSOR_INDEX_FNAME
        if index.exists():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return sorted(path.name for path in directory.glob("*.safetensors"))
    if isinstance(checkpoint_files, dict) or hasattr(checkpoint_files, "keys"):
        last = str(checkpoint_files["max_filename"])
        return [
            checkpoint_files["filename_format"].format(str(i).zfill(len(last)), last) for i in range(1, int(last) + 1)
        ]
    return list(checkpoint_files)


class RewardModelHFCheckpointer:
    """Loads and saves a :func:`rao_tune.models.reward_model` in Hugging Face format.

    Args:
        checkpoint_dir: HF model folder with ``config.json``: a base or SFT causal LM (its ``lm_head`` is dropped
            and a new score head is drawn from ``seed``) or a reward model (``score.weight`` is loaded).
        checkpoint_files: weight files in ``checkpoint_dir`` (list, or torchtune's ``filename_format`` /
            ``max_filename`` dict); None reads them from the index or the folder. When resuming
            (``should_load_recipe_state``), they are relative to ``output_dir``, as in torchtune.
        output_dir: where ``epoch_N/`` folders and ``recipe_state/recipe_state.pt`` go.
        model_type: ``LLAMA3`` or ``LLAMA3_2`` (also EuroLLM, SmolLM2 and other plain Llama blocks) or ``QWEN2``
            (with q/k/v biases).
        seed: seed of a new score head.
        pad_token_id: written to the saved ``config.json``; transformers finds each sequence's last token by it
            (without one, transformers scores only unpadded, one-sequence batches).
        require_score_head: refuse a checkpoint without ``score.weight`` (set it when scoring, so that pointing at
            an SFT model by mistake is an error rather than a random reward).
    """

    def __init__(
        self,
        checkpoint_dir: str,
        output_dir: str,
        model_type: str = "LLAMA3",
        checkpoint_files: Union[list[str], dict[str, str], None] = None,
        seed: int = 0,
        pad_token_id: Optional[int] = None,
        recipe_checkpoint: Optional[str] = None,
        should_load_recipe_state: bool = False,
        require_score_head: bool = False,
    ) -> None:
        if model_type not in _FAMILIES:
            raise ValueError(f"RewardModelHFCheckpointer: model_type must be one of {sorted(_FAMILIES)}, got {model_type!r}")
        self._checkpoint_dir = Path(checkpoint_dir)
        self._output_dir = Path(output_dir)
        self._model_type = model_type
        self._seed = seed
        self._should_load_recipe_state = should_load_recipe_state
        self._recipe_checkpoint = recipe_checkpoint
        config_path = self._checkpoint_dir / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} not found: an HF checkpoint folder needs its config.json")
        self._config = json.loads(config_path.read_text())
        if pad_token_id is not None:
            self._config["pad_token_id"] = pad_token_id
        elif self._config.get("pad_token_id") is None:
            log.warning("RewardModelHFCheckpointer: no pad_token_id; set it to the tokenizer's pad id so that "
                        "transformers can score padded batches with the saved model")
        self._require_score_head = require_score_head
        weights_dir = self._output_dir if should_load_recipe_state else self._checkpoint_dir
        names = _checkpoint_file_names(checkpoint_files, self._checkpoint_dir)
        self._checkpoint_paths = [weights_dir / name for name in names]
        missing = [str(path) for path in self._checkpoint_paths if not path.exists()]
        if missing or not self._checkpoint_paths:
            raise FileNotFoundError(f"RewardModelHFCheckpointer: checkpoint files not found: {missing or names}")

    def _shape_args(self) -> dict[str, Any]:
        return {
            "num_heads": self._config["num_attention_heads"],
            "num_kv_heads": self._config["num_key_value_heads"],
            "dim": self._config["hidden_size"],
            "head_dim": self._config.get("head_dim"),
        }

    def load_checkpoint(self) -> dict[str, Any]:
        hf_state: dict[str, torch.Tensor] = {}
        for path in self._checkpoint_paths:
            hf_state.update(load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True))
        score = hf_state.pop("score.weight", None)
        hf_state.pop("lm_head.weight", None)  # an SFT model's vocabulary head is not part of a reward model
        _, hf_to_tune, _ = _FAMILIES[self._model_type]
        state_dict = hf_to_tune(hf_state, **self._shape_args())
        if score is None and self._require_score_head:
            raise ValueError(
                f"{self._checkpoint_dir} has no score.weight: it is not a trained reward model "
                "(require_score_head=True); point checkpoint_dir at a reward model's epoch_N folder"
            )
        if score is None:
            reference = state_dict["tok_embeddings.weight"]
            score = init_score_head(self._config["hidden_size"], self._seed, dtype=reference.dtype)
            log.info("No score.weight in %s: new score head drawn from seed %d", self._checkpoint_dir, self._seed)
        state_dict[_HEAD] = score
        checkpoint: dict[str, Any] = {training.MODEL_KEY: state_dict}
        if self._should_load_recipe_state:
            recipe_path = (
                Path(self._recipe_checkpoint)
                if self._recipe_checkpoint
                else self._output_dir / RECIPE_STATE_DIRNAME / "recipe_state.pt"
            )
            checkpoint.update(torch.load(recipe_path, map_location="cpu", weights_only=False))
        return checkpoint

    def save_checkpoint(self, state_dict: dict[str, Any], epoch: int, intermediate_checkpoint: bool = False) -> None:
        """Write ``output_dir/epoch_{epoch}`` (weights, index, ``config.json``, tokenizer files of the input
        folder); with ``intermediate_checkpoint`` also the recipe state for resuming."""
        model_state = dict(state_dict[training.MODEL_KEY])
        score = model_state.pop(_HEAD)
        class_name, _, tune_to_hf = _FAMILIES[self._model_type]
        hf_state = tune_to_hf(model_state, **self._shape_args())
        hf_state["score.weight"] = score
        epoch_dir = self._output_dir / f"epoch_{epoch}"
        epoch_dir.mkdir(parents=True, exist_ok=True)

        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes = 0
        for name, tensor in hf_state.items():
            size = tensor.numel() * tensor.element_size()
            if shards[-1] and shard_bytes + size > _MAX_SHARD_BYTES:
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = tensor.contiguous()
            shard_bytes += size
        weight_map = {}
        for index, shard in enumerate(shards, start=1):
            file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(epoch_dir / file_name), metadata={"format": "pt"})
            weight_map.update({name: file_name for name in shard})
        total_size = sum(t.numel() * t.element_size() for t in hf_state.values())
        index_data = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (epoch_dir / SAFETENSOR_INDEX_FNAME).write_text(json.dumps(index_data, indent=2))

        config = dict(self._config)
        config.update(architectures=[class_name], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        (epoch_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # Tokenizer and generation files travel with the weights (e.g. Llama3's original/tokenizer.model).
        for path in sorted(self._checkpoint_dir.rglob("*")):
            relative = path.relative_to(self._checkpoint_dir)
            if (
                not path.is_file()
                or any(part.startswith(".") for part in relative.parts)
                or path.name.endswith(_WEIGHT_SUFFIXES)
                or path.name in ("config.json", SAFETENSOR_INDEX_FNAME)
                or path.stat().st_size > _MAX_COPIED_FILE_BYTES
            ):
                continue
            (epoch_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, epoch_dir / relative)
        log.info("Reward model saved to %s (%.2f GiB)", epoch_dir, total_size / 2**30)

        if intermediate_checkpoint:
            recipe_state = {key: value for key, value in state_dict.items() if key != training.MODEL_KEY}
            recipe_dir = self._output_dir / RECIPE_STATE_DIRNAME
            torch_save_atomically(recipe_state, recipe_dir / "recipe_state.pt")
