"""LoRA and QLoRA through the training recipes on the tiny model: only adapters train, the reference is the base
(adapters off), resume reproduces, and both exports (merged HF model, PEFT adapter) give the adapted model's outputs."""

import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torchtune import config, training
from torchtune.modules.peft import disable_adapter

from rao_tune.data import collate_reward_batch, reward_dataset
from rao_tune.toy.assets import build_llama3_checkpoint
from rao_tune.training.checkpoint import complete_checkpoints
from rao_tune.training.logprobs import sequence_logps
from rao_tune.training.lora import initial_adapter_state
from rao_tune.training.metrics import read_metrics

from conftest import REPO_ROOT
from recipe_runner import (
    StopAfterFirstEpoch,
    crash_after_first_checkpoint,
    load_recipe,
    record_model_builds,
    run_recipe_in_process,
)

pytestmark = pytest.mark.slow
RAO_LORA = REPO_ROOT / "configs" / "tiny_rao_lora.yaml"
RM_LORA = REPO_ROOT / "configs" / "tiny_reward_model_lora.yaml"
# The tiny LoRA model of tiny_rao_lora.yaml, as overrides of a full-fine-tuning tiny config.
LORA_MODEL = ["model._component_=torchtune.models.llama3.lora_llama3", "model.lora_attn_modules=[q_proj,k_proj,v_proj,output_proj]",
              "model.apply_lora_to_mlp=True", "model.lora_rank=8", "model.lora_alpha=16", "optimizer.lr=1e-2"]
BASELINES = ["tiny_dpo", "tiny_ipo", "tiny_cal_dpo", "tiny_distillation", "tiny_reward_aware_rpo", "tiny_reward_partition",
             "tiny_simpo", "tiny_slic_hf", "tiny_orpo", "tiny_rloo", "tiny_qrpo", "tiny_rebel"]


def run(monkeypatch, tiny_assets, output_dir, *overrides, config_path=RAO_LORA, recipe="rao_distributed", module=None):
    """Run a recipe in this process; returns how many models it built (policy, reference)."""
    module = module or load_recipe(recipe)
    built = record_model_builds(monkeypatch, module)
    run_recipe_in_process(monkeypatch, module, config_path, f"assets_dir={tiny_assets['out_dir']}",
                          f"output_dir={output_dir}", *overrides)
    return built


def adapted_model(config_path, run_dir, tiny_assets, *, checkpoint_dir=None):
    """The configured LoRA model, plain (no FSDP): base weights from the starting checkpoint, adapters (and what
    else trained) from the run's newest step checkpoint."""
    cfg = OmegaConf.load(config_path)
    cfg.assets_dir, cfg.output_dir = str(tiny_assets["out_dir"]), str(run_dir)
    model = config.instantiate(cfg.model)
    checkpointer = config.instantiate(cfg.checkpointer, output_dir=str(run_dir / "unused"))
    state = {**checkpointer.load_checkpoint()[training.MODEL_KEY], **initial_adapter_state(model, seed=0)}
    model.load_state_dict(state)
    saved = dcp.FileSystemReader(str(complete_checkpoints(run_dir)[-1])).read_metadata().state_dict_metadata
    trained = {name[len("model."):] for name in saved if name.startswith("model.")}
    loaded = {"model": {name: tensor for name, tensor in model.state_dict().items() if name in trained}}
    dcp.load(loaded, checkpoint_id=str(complete_checkpoints(run_dir)[-1]), no_dist=True)
    model.load_state_dict(loaded["model"], strict=False)
    return model.eval(), trained


def peft_model(base, adapter_dir, monkeypatch):
    peft = pytest.importorskip("peft")
    # peft >= 0.18 refuses torchao < 0.16 as soon as it sees it installed, even for plain LoRA layers; torchtune 0.6.1
    # needs torchao < 0.16 (STACK.md). An environment without torchao (e.g. a vllm one) needs no such patch.
    import peft.tuners.lora.torchao as peft_torchao
    monkeypatch.setattr(peft_torchao, "is_torchao_available", lambda: False)
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def batch_of(tiny_assets, tokenizer, rows=8):
    dataset = reward_dataset(tokenizer, source="json", data_files=str(tiny_assets["train_data_path"]), max_seq_len=128)
    return collate_reward_batch([dataset[i] for i in range(rows)], pad_id=0)


def test_adapters_off_is_the_base_model(tiny_assets, tokenizer):
    """The reference a LoRA run uses: its policy with adapters switched off scores every response exactly as the
    base model does, though its adapters (here non-zero) move the policy."""
    from torchtune.models.llama3 import llama3, lora_llama3

    base = llama3(**tiny_assets["model_kwargs"]).eval()
    checkpointer = training.FullModelHFCheckpointer(
        checkpoint_dir=str(tiny_assets["checkpoint_dir"]), checkpoint_files=["model.safetensors"], model_type="LLAMA3",
        output_dir="/tmp/unused")
    base_state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    base.load_state_dict(base_state)
    policy = lora_llama3(lora_attn_modules=["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, lora_rank=4,
                         lora_alpha=8, **tiny_assets["model_kwargs"]).eval()
    adapters = initial_adapter_state(policy, seed=1)
    adapters = {name: torch.randn_like(t) * 0.1 if "lora_b" in name else t for name, t in adapters.items()}
    policy.load_state_dict({**base_state, **adapters})

    batch = batch_of(tiny_assets, tokenizer)
    with torch.no_grad():
        base_logps, base_prompt_logps = sequence_logps(base, batch)
        with disable_adapter(policy):
            off_logps, off_prompt_logps = sequence_logps(policy, batch)
        on_logps, _ = sequence_logps(policy, batch)
    torch.testing.assert_close(off_logps, base_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(off_prompt_logps, base_prompt_logps, atol=1e-5, rtol=0)
    assert (on_logps - base_logps).abs().max() > 0.1


def test_lora_rao_trains_adapters_only_and_both_exports_match(monkeypatch, tmp_path, tiny_assets, tokenizer):
    run_dir = tmp_path / "run"
    built = run(monkeypatch, tiny_assets, run_dir, "epochs=3")
    assert len(built) == 1  # the reference log-probs came from the policy with adapters off: no second model
    steps = read_metrics(run_dir)
    train = [steps[s] for s in sorted(steps) if s > 0]
    assert abs(train[0]["logratio_best"]) < 1e-5  # B = 0 at the start: the adapted model is the base model
    assert sum(s["loss"] for s in train[-16:]) < 0.85 * sum(s["loss"] for s in train[:16])

    # Only adapters were saved and trained; the merged export changes exactly the adapted weights.
    model, trained = adapted_model(RAO_LORA, run_dir, tiny_assets)
    assert trained and all(".lora_" in name for name in trained)
    transformers = pytest.importorskip("transformers")
    merged = transformers.LlamaForCausalLM.from_pretrained(str(run_dir / "epoch_2")).eval()
    base = transformers.LlamaForCausalLM.from_pretrained(str(tiny_assets["checkpoint_dir"])).eval()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(merged.state_dict()[name], base.state_dict()[name], atol=0, rtol=0)

    # RAO's point with LoRA too: each prompt's best response gains log-probability over the base.
    batch = batch_of(tiny_assets, tokenizer, rows=64)
    with torch.no_grad():
        policy_logps, _ = sequence_logps(model, batch)
        with disable_adapter(model):
            reference_logps, _ = sequence_logps(model, batch)
    log_ratios, best = policy_logps - reference_logps, []
    for prompt in batch["prompt_ids"].unique():
        members = (batch["prompt_ids"] == prompt).nonzero().squeeze(-1)
        best.append(log_ratios[members[batch["rewards"][members].argmax()]])
    assert torch.stack(best).mean() > 0.2

    tokens = torch.randint(0, tiny_assets["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted_logits = model(tokens)
        torch.testing.assert_close(merged(tokens).logits, adapted_logits, atol=2e-5, rtol=1e-5)
        with_adapter = peft_model(base, run_dir / "epoch_2" / "adapter", monkeypatch)
        torch.testing.assert_close(with_adapter(tokens).logits, adapted_logits, atol=2e-5, rtol=1e-5)


def test_online_reference_with_adapters_off_matches_the_precomputed_base_reference(monkeypatch, tmp_path, tiny_assets):
    """Online, the reference is the policy with adapters off at every step, after the adapters have moved; if that
    were not the base model, its losses would leave those of the reference table computed before training."""
    settings = ["epochs=1", "max_steps_per_epoch=6", *LORA_MODEL]
    dpo = REPO_ROOT / "configs" / "tiny_dpo.yaml"
    assert len(run(monkeypatch, tiny_assets, tmp_path / "pre", *settings, config_path=dpo)) == 1
    assert len(run(monkeypatch, tiny_assets, tmp_path / "online", *settings, "reference_logps=online", config_path=dpo)) == 1
    precomputed, online = read_metrics(tmp_path / "pre"), read_metrics(tmp_path / "online")
    assert abs(precomputed[6]["logratio_best"]) > 1e-2  # the adapters did move the policy away from the base
    for step in range(1, 7):
        assert online[step]["loss"] == pytest.approx(precomputed[step]["loss"], rel=1e-5, abs=1e-6), step


def test_lora_resume_reproduces_the_uninterrupted_run(monkeypatch, tmp_path, tiny_assets):
    settings = ["epochs=2", "max_steps_per_epoch=4"]
    run(monkeypatch, tiny_assets, tmp_path / "full", *settings)
    module = load_recipe("rao_distributed")
    crash_after_first_checkpoint(monkeypatch, module.RAORecipeDistributed)
    with pytest.raises(StopAfterFirstEpoch):
        run(monkeypatch, tiny_assets, tmp_path / "resumed", *settings, module=module)
    run(monkeypatch, tiny_assets, tmp_path / "resumed", *settings, "resume_from_checkpoint=True")
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    for step in range(5, 9):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5, abs=1e-7), step
    full_model, _ = adapted_model(RAO_LORA, tmp_path / "full", tiny_assets)
    resumed_model, _ = adapted_model(RAO_LORA, tmp_path / "resumed", tiny_assets)
    for name, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", BASELINES)
def test_every_loss_trains_with_lora_and_no_reference_model(monkeypatch, tmp_path, tiny_assets, name):
    """Each baseline config with the LoRA model: one model built, the policy moves (log-ratios leave 0)."""
    built = run(monkeypatch, tiny_assets, tmp_path, "epochs=1", "max_steps_per_epoch=3", "monitor_with_reference=True",
                *LORA_MODEL, config_path=REPO_ROOT / "configs" / f"{name}.yaml")
    assert len(built) == 1
    steps = read_metrics(tmp_path)
    assert all(math.isfinite(steps[s]["loss"]) for s in (1, 2, 3))
    assert abs(steps[1]["logratio_best"]) < 1e-5 < abs(steps[3]["logratio_best"])


def test_reward_model_lora_trains_adapters_and_head_and_exports_for_peft(monkeypatch, tmp_path, tiny_assets):
    run_dir = tmp_path / "rm"
    run(monkeypatch, tiny_assets, run_dir, "epochs=1", "max_steps_per_epoch=6", config_path=RM_LORA,
        recipe="reward_model_distributed")
    model, trained = adapted_model(RM_LORA, run_dir, tiny_assets)
    assert "output.weight" in trained and all(".lora_" in n for n in trained - {"output.weight"})
    transformers = pytest.importorskip("transformers")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(run_dir / "epoch_0")).eval()
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tiny_assets["checkpoint_dir"]), num_labels=1, pad_token_id=514).eval()
    tokens = torch.randint(0, 500, (3, 20), generator=torch.Generator().manual_seed(0))  # no pad id (514)
    with torch.no_grad():
        scores = model(tokens)[:, -1, 0]
        torch.testing.assert_close(merged(tokens).logits[:, 0], scores, atol=2e-5, rtol=1e-5)
        with_adapter = peft_model(base, run_dir / "epoch_0" / "adapter", monkeypatch)
        torch.testing.assert_close(with_adapter(tokens).logits[:, 0], scores, atol=2e-5, rtol=1e-5)


def test_sft_lora_trains_and_exports_an_adapter(monkeypatch, tmp_path, tiny_assets):
    overrides = ["model._component_=torchtune.models.llama3.lora_llama3", "model.lora_attn_modules=[q_proj,v_proj]",
                 "model.lora_rank=4", "model.lora_alpha=8", "epochs=1", "max_steps_per_epoch=3"]
    run(monkeypatch, tiny_assets, tmp_path, *overrides, config_path=REPO_ROOT / "configs" / "tiny_sft.yaml",
        recipe="sft_distributed")
    assert all(math.isfinite(read_metrics(tmp_path)[step]["loss"]) for step in (1, 2, 3))
    assert (tmp_path / "epoch_0" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "epoch_0" / "model.safetensors.index.json").is_file()


def test_qlora_keeps_the_base_in_nf4_and_trains(monkeypatch, tmp_path, tiny_assets):
    """NF4 needs each weight's size to be a multiple of 64 x 256: a wider tiny model, random weights, bf16."""
    from torchao.dtypes.nf4tensor import NF4Tensor

    checkpoint_dir = tmp_path / "wide"
    build_llama3_checkpoint(checkpoint_dir, vocab_size=576, embed_dim=256, intermediate_dim=512)
    built = run(monkeypatch, tiny_assets, tmp_path / "run", "model.quantize_base=True", "model.vocab_size=576",
                "model.embed_dim=256", "model.intermediate_dim=512", f"checkpointer.checkpoint_dir={checkpoint_dir}",
                "dtype=bf16", "epochs=1", "max_steps_per_epoch=3")
    (policy,) = built
    assert isinstance(policy.layers[0].attn.q_proj.weight, NF4Tensor)
    assert isinstance(policy.layers[0].mlp.w1.weight, NF4Tensor)
    assert not policy.layers[0].attn.q_proj.weight.requires_grad
    steps = read_metrics(tmp_path / "run")
    assert all(math.isfinite(steps[step]["loss"]) for step in (1, 2, 3))
    assert abs(steps[3]["logratio_best"]) > 1e-4  # the adapters moved
    transformers = pytest.importorskip("transformers")
    transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "run" / "epoch_0"))  # the merged export loads
