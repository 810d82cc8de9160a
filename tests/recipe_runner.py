"""Run a recipe file's ``recipe_main`` inside the test process, as ``tune run --nproc_per_node 1`` would."""

import contextlib
import json
import shutil

import torch

from omegaconf import OmegaConf

from rao_tune.inprocess import call_recipe_main, load_recipe
from rao_tune.training import recipe_base, value
from rao_tune.training.distributed import one_process_env

__all__ = [
    "StopAfterFirstEpoch",
    "TORCHRUN_THREADS",
    "threads_of_torchrun_per_process",
    "crash_after_first_checkpoint",
    "record_model_builds",
    "load_recipe",
    "paper_config_on_tiny_assets",
    "run_recipe_in_process",
]


def run_recipe_in_process(monkeypatch, recipe, config_path, *overrides):
    """A one-process group on a free port, the config and ``key=value`` overrides on the command line."""
    for key, value in one_process_env().items():
        monkeypatch.setenv(key, value)
    call_recipe_main(recipe, config_path, *overrides)


# torchrun gives each of N > 1 processes one intra-op thread (it sets OMP_NUM_THREADS=1 unless set), while an
# in-process run or a one-process launch uses every core. On CPU the thread count is part of the computation: a
# matrix product split over 2 threads sums in another order than over 1, which moves the 7th-8th significant digit.
# Runs compared bit for bit across process counts must therefore run at one thread each.
TORCHRUN_THREADS = {"OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def threads_of_torchrun_per_process():
    """Run the body (an in-process recipe run) at the one intra-op thread torchrun gives each of N > 1 processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(TORCHRUN_THREADS["OMP_NUM_THREADS"]))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def record_model_builds(monkeypatch, recipe):
    """The FSDP models ``recipe`` (a loaded recipe module) builds, in order, wherever it builds them: in the recipe
    file (policy), through the shared recipe base (reference) or :mod:`rao_tune.training.value` (value and reward
    models)."""
    built = []
    for module in (recipe, recipe_base, value):
        original = module.setup_fsdp_model
        monkeypatch.setattr(module, "setup_fsdp_model",
                            lambda *a, _original=original, **k: built.append(_original(*a, **k)) or built[-1])
    return built


class StopAfterFirstEpoch(Exception):
    """Raised by a recipe patched with :func:`crash_after_first_checkpoint`."""


def crash_after_first_checkpoint(monkeypatch, recipe_class):
    """Make ``recipe_class`` stop like a killed job right after its first epoch's export and checkpoint."""
    end_epoch = recipe_class.end_epoch

    def end_epoch_then_crash(self, *args, **kwargs):
        end_epoch(self, *args, **kwargs)
        raise StopAfterFirstEpoch

    monkeypatch.setattr(recipe_class, "end_epoch", end_epoch_then_crash)


def paper_config_on_tiny_assets(tiny_assets, tmp_path, tiny_config, num_prompts=8):
    """Overrides that run a shipped paper config (UltraFeedback-binarized data, HF-sharded SFT checkpoint in
    ``sft_dir``, cuda, bf16) on the tiny assets: only the model sizes (from ``tiny_config``), tokenizer, weights,
    data files and device change. The data: ``num_prompts`` tiny rows as chosen/rejected pairs, scores x10."""
    rows = [json.loads(line) for line in tiny_assets["train_data_path"].read_text().splitlines()]
    uf_rows = []
    for row in rows[:num_prompts]:
        best = max(range(len(row["rewards"])), key=row["rewards"].__getitem__)
        other = (best + 1) % len(row["rewards"])
        turns = [[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["responses"][i]}]
                 for i in (best, other)]
        uf_rows.append({"prompt": row["prompt"], "chosen": turns[0], "rejected": turns[1],
                        "score_chosen": 10 * row["rewards"][best], "score_rejected": 10 * row["rewards"][other]})
    data_path = tmp_path / "uf.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in uf_rows))

    # The paper configs name their weights by HF's shard format (model-00001-of-00004.safetensors, ...).
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    shutil.copy(tiny_assets["checkpoint_dir"] / "config.json", sft_dir / "config.json")
    shutil.copy(tiny_assets["checkpoint_dir"] / "model.safetensors", sft_dir / "model-00001-of-00001.safetensors")
    model_overrides = [f"model.{key}={value}" for key, value in OmegaConf.load(tiny_config).model.items()]
    return [
        f"sft_dir={sft_dir}", *model_overrides, f"tokenizer.path={tiny_assets['tokenizer_path']}",
        f"tokenizer.special_tokens_path={tiny_assets['special_tokens_path']}",
        "checkpointer.checkpoint_files.max_filename=00001", "dataset.source=json", f"dataset.data_files={data_path}",
        "dataset.split=train", "device=cpu", "dtype=fp32", "optimizer.fused=False",
    ]
