"""Mistakes that would cost a user a GPU allocation are refused in seconds, with one line saying what is wrong,
before any model loads: each one is made through the real recipe on the tiny config."""

import json
import shutil

import pytest
import torch
from torchtune import training

from rao_tune.training import recipe_base
from rao_tune.training.checkpoint import complete_checkpoints
from rao_tune.training.metrics import METRICS_FILE, read_disk_log, read_metrics

from conftest import REPO_ROOT
from recipe_runner import StopAfterFirstEpoch, crash_after_first_checkpoint, load_recipe, run_recipe_in_process

CONFIG = REPO_ROOT / "configs" / "tiny_rao.yaml"
pytestmark = pytest.mark.slow


def count_model_loads(monkeypatch, recipe):
    """Count the checkpoint reads and FSDP model builds that ``recipe`` makes."""
    loads = []
    read = training.FullModelHFCheckpointer.load_checkpoint
    for module in (recipe, recipe_base):
        build = module.setup_fsdp_model
        monkeypatch.setattr(module, "setup_fsdp_model",
                            lambda *a, _build=build, **k: loads.append("model") or _build(*a, **k))
    monkeypatch.setattr(training.FullModelHFCheckpointer, "load_checkpoint",
                        lambda self, *a, **k: loads.append("checkpoint") or read(self, *a, **k))
    return loads


def run(monkeypatch, tiny_assets, output_dir, *overrides, config=CONFIG):
    """Run the RAO recipe; returns the list of model loads it made."""
    recipe = load_recipe("rao_distributed")
    loads = count_model_loads(monkeypatch, recipe)
    run_recipe_in_process(monkeypatch, recipe, config, f"assets_dir={tiny_assets['out_dir']}",
                          f"output_dir={output_dir}", *overrides)
    return loads


def refused(monkeypatch, tiny_assets, tmp_path, message, *overrides, config=CONFIG):
    recipe = load_recipe("rao_distributed")
    loads = count_model_loads(monkeypatch, recipe)
    with pytest.raises(ValueError, match=message) as error:
        run_recipe_in_process(monkeypatch, recipe, config, f"assets_dir={tiny_assets['out_dir']}",
                              f"output_dir={tmp_path / 'run'}", *overrides)
    assert "\n" not in str(error.value)
    assert loads == [], f"a model was loaded before the mistake was found: {loads}"


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("overrides, message", [
    (["max_step_per_epoch=1"],
     r"RAORecipeDistributed does not read the key 'max_step_per_epoch'; did you mean 'max_steps_per_epoch'\?"),
    (["loss.bta=0.5"], r"loss\._component_=rao_tune\.losses\.RAOLoss takes no argument 'bta'; did you mean 'beta'\?"),
    (["loss.beta=0"], r"RAOLoss: beta must be > 0, got 0"),
    (["gradient_accumulation_steps=0"], r"gradient_accumulation_steps must be an integer >= 1, got 0"),
    (["save_every_n_steps=0"], r"save_every_n_steps must be null or an integer >= 1, got 0"),
    (["checkpointer.model_type=QWEN2"],
     r"checkpointer\.model_type=QWEN2 but .*config\.json is a 'llama' model \(LlamaForCausalLM\); use model_type=LLAMA3"),
    (["model.num_layers=3"], r"config\.json has num_hidden_layers=2 but the configured model has 3"),
    (["resume_from_checkpoint=True"], r"resume_from_checkpoint=True but .*checkpoints holds no complete checkpoint"),
])
def test_config_mistakes_are_refused_before_any_model_loads(monkeypatch, tmp_path, tiny_assets, overrides, message):
    refused(monkeypatch, tiny_assets, tmp_path, message, *overrides)


def test_a_pairwise_loss_beta_below_zero_is_refused(monkeypatch, tmp_path, tiny_assets):
    refused(monkeypatch, tiny_assets, tmp_path, r"DPOLoss: beta must be > 0, got -0.1", "loss.beta=-0.1",
            config=REPO_ROOT / "configs" / "tiny_dpo.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_a_cuda_device_without_a_gpu_is_refused(monkeypatch, tmp_path, tiny_assets):
    refused(monkeypatch, tiny_assets, tmp_path, r"device=cuda but no CUDA GPU is visible", "device=cuda")


@pytest.mark.parametrize("rows_of", ["one_response", "tied_rewards"])
def test_a_pairwise_loss_refuses_data_without_a_pair(monkeypatch, tmp_path, tiny_assets, rows_of):
    rows = [json.loads(line) for line in tiny_assets["train_data_path"].read_text().splitlines()]
    if rows_of == "one_response":
        rows = [{**row, "responses": row["responses"][:1], "rewards": row["rewards"][:1]} for row in rows]
    else:
        rows = [{**row, "rewards": [0.5] * len(row["rewards"])} for row in rows]
    data = write_rows(tmp_path / "data.jsonl", rows)
    refused(monkeypatch, tiny_assets, tmp_path, r"DPOLoss: none of the 64 training prompts has two responses with "
            r"different rewards .*use data with several scored responses per prompt, or a point-wise loss",
            f"dataset.data_files={data}", config=REPO_ROOT / "configs" / "tiny_dpo.yaml")


@pytest.mark.parametrize("content, message", [
    (b"", r"data\.jsonl: the file is empty \(no rows\)"),
    (b'{"prompt": "a", "responses": ["b"], "rewards": [1.0]}\n{"prompt": "a", \n', r"data\.jsonl, line 2, field 'line': not valid JSON"),
    (b'{"prompt": "a", "responses": ["b"], "rewards": [1.0]}\n{"prompt": "\xff"}\n', r"data\.jsonl, line 2: not valid UTF-8"),
    (b'{"prompt": "a", "responses": ["b"], "rewards": [1e309]}\n', r"data\.jsonl, line 1, field 'rewards\[0\]': reward inf is not finite"),
])
def test_unreadable_data_files_are_named_with_their_line(monkeypatch, tmp_path, tiny_assets, content, message):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    refused(monkeypatch, tiny_assets, tmp_path, message, f"dataset.data_files={data}")


def test_token_ids_beyond_the_model_vocabulary_are_refused(monkeypatch, tmp_path, tiny_assets):
    # A checkpoint (and model) with a 300-token vocabulary under the tiny tokenizer, whose special tokens sit
    # above 512: the first embedding lookup of such an id would be an IndexError mid-step.
    checkpoint_dir = tmp_path / "small_vocab"
    shutil.copytree(tiny_assets["checkpoint_dir"], checkpoint_dir)
    hf_config = json.loads((checkpoint_dir / "config.json").read_text())
    (checkpoint_dir / "config.json").write_text(json.dumps({**hf_config, "vocab_size": 300}))
    refused(monkeypatch, tiny_assets, tmp_path,
            r"train\.jsonl: the tokenizer produced token id \d{3} but the model's vocabulary has 300 entries",
            f"checkpointer.checkpoint_dir={checkpoint_dir}", "model.vocab_size=300")


def test_a_run_folder_is_never_clobbered(monkeypatch, tmp_path, tiny_assets, capsys):
    short = ["epochs=1", "max_steps_per_epoch=2"]
    output_dir = tmp_path / "run"
    assert "model" in run(monkeypatch, tiny_assets, output_dir, *short)

    # Another run into the same folder is refused; overwrite=True replaces the run (logs, metrics.jsonl, exports,
    # checkpoints).
    refused(monkeypatch, tiny_assets, tmp_path, r"output_dir .*run already holds a run \(checkpoints, epoch_0, "
            r"logs, metrics\.jsonl\): resume it with resume_from_checkpoint=True, replace it with overwrite=True",
            *short, "loss.beta=0.5")
    run(monkeypatch, tiny_assets, output_dir, *short, "loss.beta=0.5", "overwrite=True")
    # The first run's log is gone, not appended to (both starts may fall in the same second and so share a name):
    # one calibration line (step 0) and two steps.
    [log_file] = (output_dir / "logs").iterdir()
    assert [line.split(" | ")[0] for line in log_file.read_text().splitlines()] == ["Step 0", "Step 1", "Step 2"]
    logged_steps = [line for line in (output_dir / METRICS_FILE).read_text().splitlines() if '"loss"' in line]
    assert len(logged_steps) == 2  # the second run's steps only
    assert [p.name for p in complete_checkpoints(output_dir)] == ["step_00000002"]

    # Resuming a finished run says so, loads nothing and exits normally.
    capsys.readouterr()
    assert run(monkeypatch, tiny_assets, output_dir, *short, "loss.beta=0.5", "resume_from_checkpoint=True") == []
    assert "the run already finished its 1 epochs (step_00000002); nothing to do" in capsys.readouterr().out


def test_a_resume_with_other_run_settings_is_refused_before_loading(monkeypatch, tmp_path, tiny_assets):
    output_dir = tmp_path / "run"
    settings = ["epochs=2", "max_steps_per_epoch=2"]
    recipe = load_recipe("rao_distributed")
    crash_after_first_checkpoint(monkeypatch, recipe.RAORecipeDistributed)
    with pytest.raises(StopAfterFirstEpoch):
        run_recipe_in_process(monkeypatch, recipe, CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                              f"output_dir={output_dir}", *settings)
    refused(monkeypatch, tiny_assets, tmp_path, r"step_00000002 was written with other settings global batch "
            r"\(processes x batch_size x gradient_accumulation_steps\) = 1 x 4 x 1 \(now 1 x 2 x 1\); resume with the "
            r"original ones", *settings, "batch_size=2", "resume_from_checkpoint=True")


def test_resume_auto_starts_fresh_or_resumes(monkeypatch, tmp_path, tiny_assets):
    """``resume_from_checkpoint=auto`` (a job a scheduler may requeue): fresh in an empty folder, resumed once a
    checkpoint exists."""
    output_dir = tmp_path / "run"
    settings = ["epochs=2", "max_steps_per_epoch=2", "resume_from_checkpoint=auto"]
    recipe = load_recipe("rao_distributed")
    crash_after_first_checkpoint(monkeypatch, recipe.RAORecipeDistributed)
    with pytest.raises(StopAfterFirstEpoch):
        run_recipe_in_process(monkeypatch, recipe, CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                              f"output_dir={output_dir}", *settings)
    run(monkeypatch, tiny_assets, output_dir, *settings)
    steps = read_disk_log(output_dir / "logs")
    assert sorted(s for s in steps if s > 0) == [1, 2, 3, 4]
    assert len(list((output_dir / "logs").glob("log_*.txt"))) == 2  # the second run logged steps 3 and 4 only
    assert read_metrics(output_dir) == steps  # the resumed run appended to the first one's metrics.jsonl


def test_overwrite_leaves_a_log_folder_outside_the_run_alone(monkeypatch, tmp_path, tiny_assets):
    shared_logs = tmp_path / "all_logs"
    short = ["epochs=1", "max_steps_per_epoch=1", f"metric_logger.log_dir={shared_logs}"]
    run(monkeypatch, tiny_assets, tmp_path / "run", *short)
    (shared_logs / "another_run.txt").write_text("Step 1 | loss:1.0\n")
    run(monkeypatch, tiny_assets, tmp_path / "run", *short, "overwrite=True")
    assert (shared_logs / "another_run.txt").exists() and len(list(shared_logs.glob("log_*.txt"))) == 2
