"""Long runs survive a kill at any moment: a `tune run` training process killed with SIGKILL (mid-step, or while
a step checkpoint is being written) resumes from its newest complete checkpoint, and the resumed run's losses and
final weights equal the uninterrupted run's."""

import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from rao_tune.training.checkpoint import CHECKPOINTS_DIR, complete_checkpoints
from rao_tune.training.metrics import read_disk_log

from conftest import REPO_ROOT
from recipe_runner import StopAfterFirstEpoch, crash_after_first_checkpoint, load_recipe, run_recipe_in_process
from test_rao_recipe import load_tune_model

CONFIG = REPO_ROOT / "configs" / "tiny_rao.yaml"
# 2 epochs of 8 steps, a step checkpoint every 3 steps (and at each epoch end): a kill loses at most 2 steps.
SETTINGS = ["epochs=2", "max_steps_per_epoch=8", "save_every_n_steps=3", "keep_last_n=2"]
TOTAL_STEPS = 16
pytestmark = pytest.mark.slow


def tune_run_command(tiny_assets, output_dir, *overrides):
    return [
        sys.executable, "-m", "torchtune._cli.tune", "run", "--nproc_per_node", "1", "recipes/rao_distributed.py",
        "--config", str(CONFIG), f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}", *SETTINGS,
        *overrides,
    ]


def last_logged_step(output_dir):
    try:
        return max(read_disk_log(output_dir / "logs"), default=0)
    except (FileNotFoundError, ValueError):  # no log yet, or a line half written
        return 0


def seeded_rng():
    """Random kill points, reproducible: the seed is printed and ``KILL_SEED=...`` replays it."""
    seed = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(2**32)))
    print(f"KILL_SEED={seed}")
    return random.Random(seed)


def kill_when(process, condition, delay=0.0, timeout=300):
    """SIGKILL the training process (torchrun's worker) and its launcher ``delay`` seconds after ``condition()``
    first holds; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if condition():
            time.sleep(delay)
            launcher = psutil.Process(process.pid)
            for worker in launcher.children(recursive=True):  # torchrun starts workers in their own session
                worker.send_signal(signal.SIGKILL)
            launcher.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    process.kill()
    raise TimeoutError("the run neither reached the kill point nor ended")


def final_weights_of(checkpoint_dir, tiny_assets, tmp_path):
    return load_tune_model(checkpoint_dir, tiny_assets, tmp_path).state_dict()


def assert_same_run(resumed_dir, full_dir, tiny_assets, tmp_path):
    full, resumed = read_disk_log(full_dir / "logs"), read_disk_log(resumed_dir / "logs")
    assert sorted(s for s in resumed if s > 0) == list(range(1, TOTAL_STEPS + 1))
    for step in range(1, TOTAL_STEPS + 1):  # steps logged twice (after the last checkpoint) keep the resumed value
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5, abs=1e-7), step
        assert resumed[step]["lr"] == pytest.approx(full[step]["lr"]), step
    full_weights = final_weights_of(full_dir / "epoch_1", tiny_assets, tmp_path)
    resumed_weights = final_weights_of(resumed_dir / "epoch_1", tiny_assets, tmp_path)
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_assets, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_recipe_in_process(monkeypatch, load_recipe("rao_distributed"), CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                              f"output_dir={output_dir}", *SETTINGS)
    return output_dir


def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(
    monkeypatch, tmp_path, tiny_assets, uninterrupted_run
):
    kill_after = seeded_rng().randint(2, TOTAL_STEPS - 3)
    print(f"killing after step {kill_after}")
    output_dir = tmp_path / "run"
    process = subprocess.Popen(tune_run_command(tiny_assets, output_dir), cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(process, lambda: last_logged_step(output_dir) >= kill_after), "the run ended before the kill"
    assert not (output_dir / "epoch_1").exists()
    saved = complete_checkpoints(output_dir)
    assert len(saved) <= 2  # keep_last_n

    # Resuming reads the newest complete checkpoint (a kill before the first one leaves nothing to resume: start
    # again, with overwrite=True since the folder holds the killed run's logs).
    resume = ["resume_from_checkpoint=True"] if saved else ["overwrite=True"]
    run_recipe_in_process(monkeypatch, load_recipe("rao_distributed"), CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                          f"output_dir={output_dir}", *SETTINGS, *resume)
    assert_same_run(output_dir, uninterrupted_run, tiny_assets, tmp_path)
    assert [p.name for p in complete_checkpoints(output_dir)] == ["step_00000015", "step_00000016"]  # keep_last_n=2


def test_sigkill_while_a_checkpoint_is_written_then_resume_equals_the_uninterrupted_run(
    monkeypatch, tmp_path, tiny_assets, uninterrupted_run
):
    # A save of the tiny model takes tens of milliseconds: poll for the .partial folder of a save after a random
    # step and kill inside it. Should the saves slip between two polls, the run is started again.
    rng = seeded_rng()  # its own: the in-process runs seed the global one
    kill_from = rng.randint(2, TOTAL_STEPS - 2)
    print(f"killing in a save after step {kill_from}")
    for attempt in range(5):
        output_dir = tmp_path / f"run{attempt}"
        checkpoints = output_dir / CHECKPOINTS_DIR
        process = subprocess.Popen(tune_run_command(tiny_assets, output_dir, "save_every_n_steps=1"), cwd=REPO_ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        writing = lambda: checkpoints.is_dir() and any(
            p.suffix == ".partial" and int(p.stem.split("_")[1]) >= kill_from for p in checkpoints.iterdir())
        delay = rng.uniform(0, 0.05)  # into the save: folder made, shards, RNG and trainer state written
        if kill_when(process, writing, delay) and any(p.suffix == ".partial" for p in checkpoints.iterdir()):
            break
    else:
        pytest.fail("no kill landed while a checkpoint was being written in 5 tries")
    (partial,) = [p for p in checkpoints.iterdir() if p.suffix == ".partial"]
    print(f"killed {delay:.3f} s into writing {partial.name}: {sorted(p.name for p in partial.iterdir())}")

    run_recipe_in_process(monkeypatch, load_recipe("rao_distributed"), CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                          f"output_dir={output_dir}", *SETTINGS, "save_every_n_steps=1",
                          "resume_from_checkpoint=True" if complete_checkpoints(output_dir) else "overwrite=True")
    assert not any(p.suffix == ".partial" for p in checkpoints.iterdir())
    assert_same_run(output_dir, uninterrupted_run, tiny_assets, tmp_path)


def test_asynchronous_checkpoints_resume_like_synchronous_ones(monkeypatch, tmp_path, tiny_assets, uninterrupted_run):
    """``async_checkpoint=True`` writes the shards in the background (on a GPU, while the next steps run). A
    crash while the epoch-end save is in flight leaves it ``.partial`` (a failed process does not wait for the
    others to commit); the resume takes the checkpoint before it and equals the uninterrupted run."""
    output_dir = tmp_path / "run"
    recipe = load_recipe("rao_distributed")
    crash_after_first_checkpoint(monkeypatch, recipe.RAORecipeDistributed)
    with pytest.raises(StopAfterFirstEpoch):
        run_recipe_in_process(monkeypatch, recipe, CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                              f"output_dir={output_dir}", *SETTINGS, "async_checkpoint=True")
    assert [p.name for p in complete_checkpoints(output_dir)] == ["step_00000003", "step_00000006"]
    assert (output_dir / "checkpoints" / "step_00000008.partial").is_dir()
    run_recipe_in_process(monkeypatch, load_recipe("rao_distributed"), CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                          f"output_dir={output_dir}", *SETTINGS, "async_checkpoint=True", "resume_from_checkpoint=True")
    assert_same_run(output_dir, uninterrupted_run, tiny_assets, tmp_path)
    assert not list((output_dir / "checkpoints").glob("*.partial"))  # swept by the first save


def test_any_step_checkpoint_exports_to_hf_format(monkeypatch, tmp_path, tiny_assets, uninterrupted_run):
    """The export command turns the last step checkpoint into exactly the final epoch export, and any other kept
    step into a loadable HF checkpoint of that step."""
    export = load_recipe("export_checkpoint")
    common = [f"assets_dir={tiny_assets['out_dir']}", f"output_dir={uninterrupted_run}"]
    final = uninterrupted_run / "epoch_1"
    run_recipe_in_process(monkeypatch, export, CONFIG, *common, f"export_dir={tmp_path / 'newest'}")  # step 16
    assert sorted(p.name for p in (tmp_path / "newest").iterdir()) == sorted(p.name for p in final.iterdir())
    newest = final_weights_of(tmp_path / "newest", tiny_assets, tmp_path)
    for name, value in final_weights_of(final, tiny_assets, tmp_path).items():
        torch.testing.assert_close(newest[name], value, atol=0, rtol=0, msg=name)

    run_recipe_in_process(monkeypatch, export, CONFIG, *common, "step=15")  # default place: output_dir/step_N_hf
    step_15 = final_weights_of(uninterrupted_run / "step_00000015_hf", tiny_assets, tmp_path)
    assert not torch.equal(step_15["output.weight"], newest["output.weight"])
    with pytest.raises(ValueError, match=r"no complete checkpoint for step 7 in .*checkpoints; there are steps \[15, 16\]"):
        run_recipe_in_process(monkeypatch, export, CONFIG, *common, "step=7")
