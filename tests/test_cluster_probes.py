"""The probes of issue 26 ("Found"), each made through the real recipe: a resume that changes a setting, the data,
a LoRA rank or the shuffle is refused with the list of differences before anything loads (unless
``resume_allow_changes`` names them, and then the change takes effect); damaged caches are reported and rebuilt;
a run that fails before its first step or checkpoint does not block the next start; input mistakes are named."""

import json
import logging
import signal
import subprocess
import sys

import pytest
import torch

from rao_tune.data import reward_dataset
from rao_tune.files import tree_checksums
from rao_tune.training.checkpoint import complete_checkpoints
from rao_tune.training.errors import CheckpointWriteError
from rao_tune.training.metrics import read_disk_log

from conftest import REPO_ROOT
from recipe_runner import StopAfterFirstEpoch, crash_after_first_checkpoint, load_recipe, run_recipe_in_process
from test_preflight import CONFIG, count_model_loads, refused, run, write_rows

LORA_CONFIG = REPO_ROOT / "configs" / "tiny_rao_lora.yaml"
TWO_EPOCHS = ["epochs=2", "max_steps_per_epoch=2"]
pytestmark = pytest.mark.slow


def first_epoch_then_crash(monkeypatch, tiny_assets, output_dir, *overrides, config=CONFIG):
    """A run killed after its first epoch's step checkpoint (step 2)."""
    with monkeypatch.context() as patched:
        recipe = load_recipe("rao_distributed")
        crash_after_first_checkpoint(patched, recipe.RAORecipeDistributed)
        with pytest.raises(StopAfterFirstEpoch):
            run_recipe_in_process(patched, recipe, config, f"assets_dir={tiny_assets['out_dir']}",
                                  f"output_dir={output_dir}", *TWO_EPOCHS, *overrides)


def test_a_resume_lists_every_changed_setting_before_loading(monkeypatch, tmp_path, tiny_assets):
    first_epoch_then_crash(monkeypatch, tiny_assets, tmp_path / "run")
    refused(monkeypatch, tiny_assets, tmp_path,
            r"step_00000002 was written with other settings \(loss\.beta: 0\.1 -> 0\.5; optimizer\.lr: 0\.003 -> 0\.5; "
            r"shuffle: True -> False\); resume with the original ones, or name the changes you mean in "
            r"resume_allow_changes=\[loss\.beta, optimizer\.lr, shuffle\]",
            *TWO_EPOCHS, "loss.beta=0.5", "optimizer.lr=0.5", "shuffle=False", "resume_from_checkpoint=True")


def test_a_lora_resume_with_another_rank_is_refused_before_loading(monkeypatch, tmp_path, tiny_assets):
    first_epoch_then_crash(monkeypatch, tiny_assets, tmp_path / "run", config=LORA_CONFIG)
    refused(monkeypatch, tiny_assets, tmp_path, r"other settings \(model\.lora_rank: 8 -> 4\)",
            *TWO_EPOCHS, "model.lora_rank=4", "resume_from_checkpoint=True", config=LORA_CONFIG)


def test_an_allowed_learning_rate_change_takes_effect(monkeypatch, tmp_path, tiny_assets, caplog):
    full = tmp_path / "full"
    run(monkeypatch, tiny_assets, full, *TWO_EPOCHS)
    first_epoch_then_crash(monkeypatch, tiny_assets, tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        run(monkeypatch, tiny_assets, tmp_path / "run", *TWO_EPOCHS, "optimizer.lr=1e-3", "resume_from_checkpoint=True",
            "resume_allow_changes=[optimizer.lr]")
    assert "allowed change optimizer.lr: 0.003 -> 0.001" in caplog.text
    uninterrupted, resumed = read_disk_log(full / "logs"), read_disk_log(tmp_path / "run" / "logs")
    for step in (3, 4):  # the same point of the schedule, a third of the peak
        assert resumed[step]["lr"] == pytest.approx(uninterrupted[step]["lr"] / 3, rel=1e-9)
    assert resumed[2]["lr"] == uninterrupted[2]["lr"]


def test_a_resume_on_changed_data_is_refused(monkeypatch, tmp_path, tiny_assets):
    rows = [json.loads(line) for line in tiny_assets["train_data_path"].read_text().splitlines()]
    data = write_rows(tmp_path / "data.jsonl", rows)
    first_epoch_then_crash(monkeypatch, tiny_assets, tmp_path / "run", f"dataset.data_files={data}")
    rows[5]["rewards"][0] = 1.0 - rows[5]["rewards"][0]  # one reward re-annotated
    write_rows(data, rows)
    recipe = load_recipe("rao_distributed")
    loads = count_model_loads(monkeypatch, recipe)
    with pytest.raises(ValueError, match=r"other settings \(dataset: '.*' -> '.*'\); "
                                         r".*resume_allow_changes=\[dataset\]"):
        run_recipe_in_process(monkeypatch, recipe, CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                              f"output_dir={tmp_path / 'run'}", *TWO_EPOCHS, f"dataset.data_files={data}",
                              "resume_from_checkpoint=True")
    assert loads == []
    run(monkeypatch, tiny_assets, tmp_path / "run", *TWO_EPOCHS, f"dataset.data_files={data}",
        "resume_from_checkpoint=True", "resume_allow_changes=[dataset]")
    assert max(read_disk_log(tmp_path / "run" / "logs")) == 4


def damage(path):
    """Cut a file to half its length (a full disk, an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_caches_are_reported_and_rebuilt(monkeypatch, tmp_path, tiny_assets, caplog):
    cache = tmp_path / "cache"
    short = ["epochs=1", "max_steps_per_epoch=2", f"dataset.cache_dir={cache}"]
    run(monkeypatch, tiny_assets, tmp_path / "first", *short)
    first = read_disk_log(tmp_path / "first" / "logs")
    [table] = (tmp_path / "first" / "reference_logps").glob("*.pt")
    [arrow] = cache.glob("*/rows/*.arrow")
    damage(table)
    damage(arrow)
    with caplog.at_level(logging.WARNING):
        run(monkeypatch, tiny_assets, tmp_path / "first", *short, "overwrite=True")
    assert f"tokenized copy {arrow.parent.parent} is damaged (data-00000-of-00001.arrow does not match its checksum" in caplog.text
    assert f"Reference log-probs {table} are damaged (unreadable: " in caplog.text
    again = read_disk_log(tmp_path / "first" / "logs")
    assert [again[s]["loss"] for s in (1, 2)] == [first[s]["loss"] for s in (1, 2)]  # same computation, rebuilt
    meta = json.loads((arrow.parent.parent / "meta.json").read_text())
    assert meta["checksums"] == tree_checksums(arrow.parent)  # the rebuilt copy checks out
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # and is used as it is from now on
        run(monkeypatch, tiny_assets, tmp_path / "first", *short, "overwrite=True")
    assert "is damaged" not in caplog.text and "are damaged" not in caplog.text


def test_a_start_that_fails_before_its_first_step_leaves_the_folder_free(monkeypatch, tmp_path, tiny_assets):
    missing = tmp_path / "held_out.jsonl"
    refused(monkeypatch, tiny_assets, tmp_path, rf"config: eval_dataset: .*{missing.name}",
            "eval_dataset._component_=rao_tune.data.reward_dataset", "eval_dataset.source=json",
            f"eval_dataset.data_files={missing}")
    assert (tmp_path / "run").is_dir()
    run(monkeypatch, tiny_assets, tmp_path / "run", "epochs=1", "max_steps_per_epoch=1")  # no overwrite needed


def test_auto_restarts_a_run_that_died_before_its_first_checkpoint(monkeypatch, tmp_path, tiny_assets):
    output_dir = tmp_path / "run"
    recipe = load_recipe("rao_distributed")
    original = recipe.RAORecipeDistributed.finish_step

    def die_after_step_one(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt  # a kill before any checkpoint: logs and metrics of step 1 stay

    with monkeypatch.context() as patched:
        patched.setattr(recipe.RAORecipeDistributed, "finish_step", die_after_step_one)
        with pytest.raises(KeyboardInterrupt):
            run_recipe_in_process(patched, recipe, CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                                  f"output_dir={output_dir}", *TWO_EPOCHS)
    assert max(read_disk_log(output_dir / "logs")) == 1 and not complete_checkpoints(output_dir)
    refused(monkeypatch, tiny_assets, tmp_path, r"holds no complete checkpoint .* resume_from_checkpoint=auto starts "
            r"fresh in that case", *TWO_EPOCHS, "resume_from_checkpoint=True")
    run(monkeypatch, tiny_assets, output_dir, *TWO_EPOCHS, "resume_from_checkpoint=auto")
    steps = read_disk_log(output_dir / "logs")
    assert sorted(s for s in steps if s > 0) == [1, 2, 3, 4] and len(list((output_dir / "logs").iterdir())) == 1


def test_a_null_logprob_chunk_means_the_default(monkeypatch, tmp_path, tiny_assets):
    run(monkeypatch, tiny_assets, tmp_path / "run", "epochs=1", "max_steps_per_epoch=1", "logprob_chunk_tokens=null")
    assert max(read_disk_log(tmp_path / "run" / "logs")) == 1


def test_a_missing_reward_model_is_named_by_its_key_before_anything_loads(monkeypatch, tmp_path, tiny_assets):
    missing = tmp_path / "no_reward_model"
    recipe = load_recipe("ppo_distributed")
    loads = count_model_loads(monkeypatch, recipe)
    with pytest.raises(ValueError, match=r"config: reward_checkpointer\.checkpoint_dir \(= \$\{reward_model_dir\}\) is "
                                         rf".*{missing.name}, which is not a folder"):
        run_recipe_in_process(monkeypatch, recipe, REPO_ROOT / "configs" / "tiny_ppo.yaml",
                              f"assets_dir={tiny_assets['out_dir']}", f"output_dir={tmp_path / 'run'}",
                              f"reward_model_dir={missing}")
    assert loads == []


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "responses": ["b", "c"], "rewards": ["0.5", 1.0]},
     r"line 1, field 'rewards\[0\]': reward '0\.5' is a str, not a number"),
    ({"prompt": "a", "responses": ["b", "b", "b"], "rewards": [0.0, 0.5, 1.0]},
     r"line 1, field 'responses': responses 0 and 1 are the same text with rewards 0\.0 and 0\.5"),
])
def test_rewards_that_cannot_be_meant_are_refused(monkeypatch, tmp_path, tiny_assets, row, message):
    data = write_rows(tmp_path / "data.jsonl", [row])
    refused(monkeypatch, tiny_assets, tmp_path, message, f"dataset.data_files={data}")


def test_held_out_rewards_are_standardized_with_the_training_data_scale(tmp_path, tiny_assets, tokenizer):
    rows = [json.loads(line) for line in tiny_assets["train_data_path"].read_text().splitlines()]
    train = write_rows(tmp_path / "train.jsonl", rows[:40])
    held_out = write_rows(tmp_path / "held_out.jsonl", [{**row, "rewards": [r * 2 for r in row["rewards"]]}
                                                       for row in rows[40:]])
    build = lambda path: reward_dataset(tokenizer, source="json", data_files=str(path), max_seq_len=128,  # noqa: E731
                                        standardize_rewards=True)
    training, evaluation = build(train), build(held_out)
    raw = torch.tensor([r for row in rows[:40] for r in row["rewards"]], dtype=torch.float64)
    evaluation.standardize_like(training)
    expected = [(2 * r - raw.mean().item()) / raw.std().item() for r in rows[40]["rewards"]]
    assert evaluation[0]["rewards"] == pytest.approx(expected, rel=1e-12)


def test_a_full_disk_during_a_step_checkpoint_is_one_line_and_resumable(tmp_path, tiny_assets):
    """A file-size limit (RLIMIT_FSIZE, what a full disk or quota does to a writer: the write fails) makes the
    step checkpoint's shards fail to write: the run stops with one line naming the cause; resuming later works."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torchtune._cli.tune", "run", "recipes/rao_distributed.py", "--config",
               str(CONFIG), f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}", *TWO_EPOCHS,
               "save_every_n_steps=1"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, preexec_fn=small_files, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("rao_tune error: the step checkpoint step_00000001 could not be written in "), last
    assert "OSError: [Errno 27] File too large" in last and "the newest complete checkpoint is none yet" in last
    assert "Traceback" not in done.stderr and issubclass(CheckpointWriteError, OSError)
    done = subprocess.run(command + ["resume_from_checkpoint=auto"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(s for s in read_disk_log(output_dir / "logs") if s > 0) == [1, 2, 3, 4]


def test_a_shard_lost_by_a_writer_thread_fails_the_save(monkeypatch, tmp_path, tiny_assets):
    """DCP's extra writer threads can die without the save noticing (torch 2.13): the save must fail (one line,
    naming the OSError) instead of renaming a folder with a missing shard into a complete checkpoint."""
    import errno
    import threading

    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    write_item = dcp_filesystem._write_item

    def fail_off_the_main_thread(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_item(*args, **kwargs)

    monkeypatch.setattr(dcp_filesystem, "_write_item", fail_off_the_main_thread)
    output_dir = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match=r"the step checkpoint step_00000001 could not be written in .* "
                                                   r"\(OSError: \[Errno 28\] No space left on device; .* MiB free there\)"):
        run(monkeypatch, tiny_assets, output_dir, *TWO_EPOCHS, "save_every_n_steps=1")
    assert complete_checkpoints(output_dir) == []


def test_a_second_signal_stops_at_once():
    """The first SIGTERM/SIGUSR1 only asks for a save at the step's end; a second one acts as the signal would."""
    script = ("import os, signal, time\n"
              "from rao_tune.training.cluster import PreemptionWatch\n"
              "watch = PreemptionWatch([signal.SIGUSR1])\n"
              "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2)\n"
              "print('first:', watch.received.name, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(5)\n"
              "print('still running')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["first: SIGUSR1"]
    assert done.returncode == -signal.SIGUSR1
