"""What a cluster does to a job, done to real `tune run` processes: a preemption signal (SIGTERM to the launcher,
which torchrun forwards to its workers) saves the step in progress and stops; the run resumes to the same result,
also on another number of processes (2 -> 1, 1 -> 2: DCP reshards, the global batch stays, gradient accumulation
absorbs the change); a second job on the same run folder is turned away; a refusal is one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rao_tune.training.checkpoint import complete_checkpoints, read_trainer_state
from rao_tune.training.cluster import PREEMPTED_FILE, RunLock
from rao_tune.training.metrics import read_disk_log

from conftest import REPO_ROOT
from test_long_runs import final_weights_of, last_logged_step, seeded_rng

CONFIG = REPO_ROOT / "configs" / "tiny_rao.yaml"
# 2 epochs of 8 steps, global batch 4 prompts; no periodic saves: only the epoch ends and the signal save.
SETTINGS = ["epochs=2", "max_steps_per_epoch=8", "save_every_n_steps=null", "keep_last_n=2", "batch_size=2"]
TOTAL_STEPS = 16
# Every run at one thread per process (torchrun's default for N > 1), so 1- and 2-process runs differ only in
# how the global batch is split and summed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Tolerance between runs on different process counts: the same global batches and updates, summed in another
# order (and packed into other rows). Losses agree to ~1e-7 relative; weights after 16 AdamW steps at lr 3e-3 to
# ~4e-6 absolute at worst: Adam divides by the gradient's root mean square, so where a gradient is near zero a
# rounding difference becomes a difference of a sizeable fraction of lr. A skipped or repeated batch moves weights
# by ~1e-3, far outside.
ACROSS_PROCESS_COUNTS = dict(loss_rtol=1e-4, rtol=1e-3, atol=1e-5)
SAME_COMPUTATION = dict(loss_rtol=1e-5, rtol=1e-5, atol=1e-6)
pytestmark = pytest.mark.slow


def accumulation(nproc):
    return 4 // (2 * nproc)  # global batch 4 = processes x batch_size 2 x accumulation


def tune_run(tiny_assets, output_dir, nproc, *overrides, launcher=True):
    """A real run: ``tune run --nproc_per_node N`` (torchrun) or, with ``launcher=False``, ``tune run`` alone."""
    command = [sys.executable, "-m", "torchtune._cli.tune", "run"]
    command += ["--nproc_per_node", str(nproc)] if launcher else []
    command += ["recipes/rao_distributed.py", "--config", str(CONFIG), f"assets_dir={tiny_assets['out_dir']}",
                f"output_dir={output_dir}", *SETTINGS, f"gradient_accumulation_steps={accumulation(nproc)}", *overrides]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def complete_run(tiny_assets, output_dir, nproc, *overrides):
    code, out, err = finish(tune_run(tiny_assets, output_dir, nproc, *overrides))
    assert code == 0, err[-3000:]
    return output_dir


def preempt(tiny_assets, output_dir, nproc, after_step):
    """Start a run and SIGTERM its launcher once ``after_step`` is logged; returns (seconds from the signal to
    the launcher's exit, the launcher's stderr)."""
    process = tune_run(tiny_assets, output_dir, nproc)
    deadline = time.monotonic() + 600
    while last_logged_step(output_dir) < after_step:
        assert process.poll() is None, f"the run ended before step {after_step}: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    elapsed = time.monotonic() - signalled
    assert code != 0
    return elapsed, err


def assert_nothing_lost(output_dir):
    """The stop note names the last step trained, and a complete step checkpoint holds it."""
    note = json.loads((output_dir / PREEMPTED_FILE).read_text())
    logged = max(read_disk_log(output_dir / "logs"))
    assert note["signal"] == "SIGTERM" and note["step"] == logged
    newest = complete_checkpoints(output_dir)[-1]
    assert str(newest) == note["checkpoint"]
    assert read_trainer_state(newest)["progress"]["global_step"] == logged
    return note


def assert_same_result(run_dir, reference_dir, tiny_assets, tmp_path, tolerance):
    reference, run = read_disk_log(reference_dir / "logs"), read_disk_log(run_dir / "logs")
    assert sorted(s for s in run if s > 0) == list(range(1, TOTAL_STEPS + 1))
    for step in range(1, TOTAL_STEPS + 1):
        assert run[step]["loss"] == pytest.approx(reference[step]["loss"], rel=tolerance["loss_rtol"], abs=1e-7), step
        assert run[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-12), step
    expected = final_weights_of(reference_dir / "epoch_1", tiny_assets, tmp_path)
    got = final_weights_of(run_dir / "epoch_1", tiny_assets, tmp_path)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=tolerance["rtol"], atol=tolerance["atol"],
                                   msg=lambda detail, name=name: f"{name}: {detail}")


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tmp_path_factory):
    """The uninterrupted run on 1 and on 2 processes (same global batches)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    return {nproc: complete_run(tiny_assets, root / f"run{nproc}", nproc) for nproc in (1, 2)}


def test_one_and_two_processes_train_alike(uninterrupted, tiny_assets, tmp_path):
    """The premise of an elastic resume: the same global batches give the same run on 1 and 2 processes."""
    assert_same_result(uninterrupted[1], uninterrupted[2], tiny_assets, tmp_path, ACROSS_PROCESS_COUNTS)


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 2), (1, 1), (2, 1), (1, 2)])
def test_sigterm_saves_the_step_then_resume_continues_the_run(saved_on, resumed_on, uninterrupted, tiny_assets,
                                                              tmp_path):
    after = seeded_rng().randint(2, TOTAL_STEPS - 4)
    output_dir = tmp_path / "run"
    seconds, err = preempt(tiny_assets, output_dir, saved_on, after)
    print(f"{saved_on} process(es): SIGTERM after step {after}, launcher exited {seconds:.2f} s later")
    assert "stopped by SIGTERM after step" in err
    note = assert_nothing_lost(output_dir)
    assert note["step"] >= after

    code, _, err = finish(tune_run(tiny_assets, output_dir, resumed_on, "resume_from_checkpoint=auto"))
    assert code == 0, err[-3000:]
    assert not (output_dir / PREEMPTED_FILE).exists()
    if saved_on == resumed_on:  # the same computation as the uninterrupted run on that many processes
        assert_same_result(output_dir, uninterrupted[resumed_on], tiny_assets, tmp_path, SAME_COMPUTATION)
    else:
        assert f"Resumed on {resumed_on} processes a checkpoint written by {saved_on}" in err
        for reference in uninterrupted.values():
            assert_same_result(output_dir, reference, tiny_assets, tmp_path, ACROSS_PROCESS_COUNTS)


def test_resume_on_another_process_count_adapts_gradient_accumulation(tiny_assets, tmp_path, uninterrupted):
    """A checkpoint of 2 processes x batch 2 resumed by a command still saying accumulation 1 on 1 process: the
    accumulation becomes 2 (logged), and a global batch no process count can keep is refused before loading."""
    output_dir = tmp_path / "run"
    preempt(tiny_assets, output_dir, 2, 3)
    code, _, err = finish(tune_run(tiny_assets, output_dir, 1, "resume_from_checkpoint=True",
                                   "gradient_accumulation_steps=1", "batch_size=3"))
    assert code != 0
    assert ("global batch (processes x batch_size x gradient_accumulation_steps) = 2 x 2 x 1 (now 1 x 3 x 1)"
            in err)
    code, _, err = finish(tune_run(tiny_assets, output_dir, 1, "resume_from_checkpoint=True",
                                   "gradient_accumulation_steps=1"))
    assert code == 0, err[-3000:]
    assert "1 processes instead of 2; gradient_accumulation_steps 1 -> 2 keeps the global batch of 4 prompts" in err
    assert_same_result(output_dir, uninterrupted[2], tiny_assets, tmp_path, ACROSS_PROCESS_COUNTS)


def test_a_second_job_on_a_run_folder_is_turned_away(tiny_assets, tmp_path):
    output_dir = tmp_path / "run"
    with RunLock(output_dir):  # a live job holds the folder
        code, out, err = finish(tune_run(tiny_assets, output_dir, 1, "overwrite=True", launcher=False))
    assert code == 2
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"rao_tune error: output_dir {output_dir} is in use by another job (pid {os.getpid()} "
                                "on host "), last_line
    assert "Traceback" not in err
    # The holder is gone: its lock file stays behind but blocks nothing.
    assert (output_dir / ".run.lock").exists()
    code, _, err = finish(tune_run(tiny_assets, output_dir, 1, "epochs=1", "max_steps_per_epoch=2", launcher=False))
    assert code == 0, err[-3000:]


def test_a_refusal_under_torchrun_is_named_as_the_root_cause(tiny_assets, tmp_path):
    code, _, err = finish(tune_run(tiny_assets, tmp_path / "run", 1, "loss.bta=0.5"))
    assert code != 0
    message = ("config: loss._component_=rao_tune.losses.RAOLoss takes no argument 'bta'; did you mean 'beta'?")
    assert f"rao_tune error: {message}" in err
    # torchrun's summary, printed after, names it as the root cause instead of "<N/A>"
    assert message in err[err.index("Root Cause"):]


@pytest.mark.parametrize("preempted", [True, False])
def test_the_slurm_script_requeues_a_preempted_job(tmp_path, preempted):
    """scripts/slurm_multinode.sh with stand-ins for srun, tune and scontrol on PATH: a run that leaves
    preempted.json is requeued (exit 0); any other failure keeps its exit code and is not requeued."""
    bin_dir, output_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    output_dir.mkdir()
    stand_ins = {
        "srun": 'while [[ $1 == --* ]]; do shift; done; exec "$@"',
        "tune": (f'echo "$@" > {tmp_path}/tune_args; '
                 + (f'echo \'{{"signal": "SIGTERM", "step": 7}}\' > {output_dir}/preempted.json; ' if preempted else "")
                 + "exit 1"),
        "scontrol": f'if [[ $1 == show ]]; then echo node1; else echo "$@" > {tmp_path}/scontrol_args; fi',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    if not preempted:  # a note left by an earlier stop must not requeue a job that failed for another reason
        (output_dir / "preempted.json").write_text('{"signal": "SIGTERM", "step": 3}\n')
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NUM_NODES": "1"}
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "slurm_multinode.sh"), "recipes/rao_distributed.py",
                           str(CONFIG), f"output_dir={output_dir}"], env=env, capture_output=True, text=True)
    assert "resume_from_checkpoint=auto" in (tmp_path / "tune_args").read_text()
    if preempted:
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "scontrol_args").read_text().split() == ["requeue", "42"]
    else:
        assert done.returncode == 1 and not (tmp_path / "scontrol_args").exists()


def test_damaged_cache_and_changed_resume_through_tune_run(tiny_assets, tmp_path):
    """Items 4 and 5 through real `tune run` processes: a truncated reference table is reported and rebuilt; a
    resume with another beta ends with the list of differences as its last line, exit code 2."""
    output_dir = tmp_path / "run"
    short = ["epochs=1", "max_steps_per_epoch=2"]
    code, _, err = finish(tune_run(tiny_assets, output_dir, 1, *short, launcher=False))
    assert code == 0, err[-3000:]
    [table] = (output_dir / "reference_logps").glob("*.pt")
    table.write_bytes(table.read_bytes()[:100])
    code, _, err = finish(tune_run(tiny_assets, output_dir, 1, *short, "overwrite=True", launcher=False))
    assert code == 0, err[-3000:]
    assert f"Reference log-probs {table} are damaged (unreadable: " in err
    code, _, err = finish(tune_run(tiny_assets, output_dir, 1, *short, "loss.beta=0.5", "resume_from_checkpoint=True",
                                   launcher=False))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"rao_tune error: resume_from_checkpoint: {complete_checkpoints(output_dir)[-1]} was written with other "
        "settings (loss.beta: 0.1 -> 0.5); resume with the original ones, or name the changes you mean in "
        "resume_allow_changes=[loss.beta]")
