"""Every config in configs/ is loaded, instantiated and run for two steps on CPU through its recipe.

A paper config (Llama3-8B, Qwen2.5-7B, EuroLLM-9B: SFT, reward model, annotation, RAO) runs as shipped, with only
what cannot exist here swapped: the model for its tiny sibling of the same family (same builder code, small
sizes), the tokenizer for the family's tiny one, the checkpoint for a tiny HF checkpoint named by the config's
shard format, the hub dataset for a few local rows in the config's layout, and cuda / bf16 for cpu / fp32.
The tiny configs run as they are.
"""

import json
import shutil

import pytest
from omegaconf import DictConfig, OmegaConf
from torchtune import training

from rao_tune.files import write_jsonl
from rao_tune.models import RewardModelHFCheckpointer
from rao_tune.toy.task import reward_rows, sft_rows
from rao_tune.toy.families import build_family_assets
from rao_tune.training.metrics import read_disk_log

from conftest import REPO_ROOT
from recipe_runner import load_recipe, run_recipe_in_process

pytestmark = pytest.mark.slow
# The generation configs run in tests/test_generate_answers.py (on the tiny checkpoint, with judge-format checks),
# the SmolLM2 ones in tests/test_smollm2_recipes.py (on the real model).
CONFIGS = sorted(path.stem for path in (REPO_ROOT / "configs").glob("*.yaml")
                 if not path.stem.endswith("_generate") and not path.stem.startswith("smollm2"))
FAMILIES = {"llama3_8b": "llama3", "qwen2_5_7b": "qwen2_5", "eurollm_9b": "eurollm"}
RECIPES = {"sft": "sft_distributed", "reward_model": "reward_model_distributed", "annotate": "annotate_rewards",
           "true_reward": "annotate_rewards", "eval": "evaluate", "sample": "sample_responses", "ppo": "ppo_distributed"}


# A LoRA config keeps its LoRA settings on the family's tiny model: the family's LoRA component builder.
LORA_COMPONENTS = {"torchtune.models.llama3.llama3": "torchtune.models.llama3.lora_llama3",
                   "torchtune.models.qwen2.qwen2": "torchtune.models.qwen2.lora_qwen2",
                   "rao_tune.models.eurollm": "torchtune.models.llama3.lora_llama3"}


def stage_of(name):
    base = name.removesuffix("_lora")
    return next((stage for stage in RECIPES if base.endswith(f"_{stage}")), "rao")


def family_of(name):
    return next((family for prefix, family in FAMILIES.items() if name.startswith(prefix)), None)


@pytest.fixture(scope="module")
def family_assets(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_family_assets(tmp_path_factory.mktemp(family), family)
        return cache[family]

    return get


def tiny_data(tmp_path, stage):
    """A few local rows in the layout the paper config reads: UltraChat messages for SFT, UltraFeedback pairs
    otherwise."""
    rows = reward_rows(8, responses_per_prompt=(2, 2), seed=1)
    if stage == "sft":
        return write_jsonl(tmp_path / "ultrachat.jsonl", sft_rows(rows))
    pairs = []
    for i, row in enumerate(rows):
        best, other = (0, 1) if row["rewards"][0] >= row["rewards"][1] else (1, 0)
        turns = [[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["responses"][j]}]
                 for j in (best, other)]
        pairs.append({"prompt_id": f"p{i}", "prompt": row["prompt"], "chosen": turns[0], "rejected": turns[1],
                      "score_chosen": 10 * row["rewards"][best], "score_rejected": 10 * row["rewards"][other]})
    return write_jsonl(tmp_path / "ultrafeedback.jsonl", pairs)


def sharded_copy(assets, directory):
    """The tiny checkpoint as the paper configs name theirs: model-00001-of-00001.safetensors (+ tokenizer files)."""
    directory.mkdir(parents=True)
    shutil.copy(assets["checkpoint_dir"] / "config.json", directory / "config.json")
    shutil.copy(assets["checkpoint_dir"] / assets["checkpoint_files"][0], directory / "model-00001-of-00001.safetensors")
    return directory


def saved_reward_model(assets, tmp_path):
    """The family's tiny model saved as a trained reward model (what annotation and PPO configs read)."""
    checkpointer = RewardModelHFCheckpointer(str(assets["checkpoint_dir"]), str(tmp_path / "rm"),
                                             model_type=assets["model_type"], pad_token_id=assets["pad_id"])
    checkpointer.save_checkpoint({training.MODEL_KEY: checkpointer.load_checkpoint()[training.MODEL_KEY]}, epoch=0)
    return tmp_path / "rm" / "epoch_0"


def paper_config_overrides(name, assets, tmp_path, tiny_assets):
    stage, cfg = stage_of(name), OmegaConf.load(REPO_ROOT / "configs" / f"{name}.yaml")
    if stage == "eval":  # the family's tiny checkpoint on the tiny local tasks instead of lm-eval's hub tasks
        return [f"output_dir={tmp_path / 'run'}", f"model={assets['model_component']}",
                *[f"model.{key}={value}" for key, value in assets["model_kwargs"].items()],
                *[f"tokenizer.{key}={value}" for key, value in assets["tokenizer_kwargs"].items()],
                f"checkpoints=[{{name: tiny, checkpoint_dir: {assets['checkpoint_dir']}}}]",
                "tasks=[tiny_choice,tiny_answer]", f"include_path={tiny_assets['eval_tasks_dir']}",
                "include_defaults=False", "limit=3", "device=cpu", "dtype=fp32"]
    if "lora_rank" in cfg.get("model", {}):
        assets = {**assets, "model_component": LORA_COMPONENTS[assets["model_component"]]}
    data = tiny_data(tmp_path, stage)
    model_key = {"reward_model": "model", "annotate": "scorer.model"}.get(stage)
    sizes = [f"{model_key or 'model'}.{key}={value}" for key, value in assets["model_kwargs"].items()]
    model = [f"{model_key}.decoder={assets['model_component']}"] if model_key else [f"model={assets['model_component']}"]
    tokenizer_key = "scorer.tokenizer" if stage == "annotate" else "tokenizer"
    tokenizer = [f"{tokenizer_key}.{key}={value}" for key, value in assets["tokenizer_kwargs"].items()]
    data_overrides = ["dataset.source=json", f"dataset.data_files={data}", "dataset.split=train"]
    common = [f"output_dir={tmp_path / 'run'}", *model, *sizes, *tokenizer, *data_overrides]
    # DRO's value model and PPO's reward model (the value model follows it) get the family's tiny decoder too.
    for key in ("value_model", "reward_model"):
        if isinstance(cfg.get(key), DictConfig) and "decoder" in cfg[key]:
            common += [f"{key}.decoder={assets['model_component']}",
                       *[f"{key}.{name}={value}" for name, value in assets["model_kwargs"].items()]]
    if stage == "annotate":
        return [*common, f"reward_model_dir={saved_reward_model(assets, tmp_path)}", "scorer.device=cpu",
                "scorer.dtype=fp32", "rows_per_shard=4", "batch_size=4"]
    if stage == "ppo":
        common += [f"reward_model_dir={saved_reward_model(assets, tmp_path)}", "samples_per_prompt=2",
                   "max_generated_tokens=4", "ppo_minibatches=1"]
    start_dir = "base_dir" if "base_dir" in cfg else "sft_dir"
    overrides = [*common, f"{start_dir}={sharded_copy(assets, tmp_path / 'start')}",
                 "checkpointer.checkpoint_files.max_filename=00001", "device=cpu", "dtype=fp32",
                 "optimizer.fused=False", "batch_size=2", "gradient_accumulation_steps=1", "epochs=1",
                 "max_steps_per_epoch=2"]
    if stage == "reward_model":
        overrides += [f"checkpointer.pad_token_id={assets['pad_id']}", "eval_dataset.source=json",
                      f"eval_dataset.data_files={data}", "eval_dataset.split=train"]
    return overrides


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_two_steps_on_cpu(monkeypatch, tmp_path, tiny_assets, family_assets, name):
    stage, family = stage_of(name), family_of(name)
    if family is None:  # a tiny config: as shipped, on the session's tiny assets
        overrides = [f"assets_dir={tiny_assets['out_dir']}", f"output_dir={tmp_path / 'run'}"]
        if stage == "sample":  # the tiny base model instead of a trained SFT run
            overrides += [f"checkpoint_dir={tiny_assets['checkpoint_dir']}", "checkpointer.checkpoint_files=[model.safetensors]",
                          "num_samples=2", "max_new_tokens=4"]
        elif stage not in ("annotate", "true_reward", "eval"):
            overrides += ["epochs=1", "max_steps_per_epoch=2"]
        if stage == "ppo":  # the tiny base model saved as a reward model, instead of a trained one
            tiny = {"checkpoint_dir": tiny_assets["checkpoint_dir"], "model_type": "LLAMA3", "pad_id": 514}
            overrides += [f"reward_model_dir={saved_reward_model(tiny, tmp_path)}"]
    else:
        overrides = paper_config_overrides(name, family_assets(family), tmp_path, tiny_assets)
    run_recipe_in_process(monkeypatch, load_recipe(RECIPES.get(stage, "rao_distributed")),
                          REPO_ROOT / "configs" / f"{name}.yaml", *overrides)

    if stage == "eval":
        table = (tmp_path / "run" / "results.md").read_text().splitlines()
        assert len(table) == 3 and table[0].startswith("| checkpoint | tiny_choice | tiny_answer")
        return
    if stage == "sample":
        rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 32 and all(1 <= len(row["responses"]) <= 2 for row in rows)
        return
    if stage in ("annotate", "true_reward"):
        output = OmegaConf.load(REPO_ROOT / "configs" / f"{name}.yaml").output_path.split("/")[-1]
        rows = (tmp_path / "run" / output).read_text().splitlines()
        assert len(rows) == (8 if family else 64) and all(len(json.loads(r)["rewards"]) >= 1 for r in rows)
        return
    steps = read_disk_log(tmp_path / "run" / "logs")
    assert {1, 2} <= set(steps)
    assert (tmp_path / "run" / "epoch_0" / "config.json").exists()
    assert (tmp_path / "run" / "epoch_0" / "adapter" / "adapter_config.json").exists() == name.endswith("_lora")
