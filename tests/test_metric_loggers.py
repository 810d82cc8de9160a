"""Every training recipe writes ``output_dir/metrics.jsonl`` beside the metric logger its config names, and our tools
read a run's metrics from it: the tiny RAO run logs the same numbers with torchtune's DiskLogger, TensorBoardLogger
and WandBLogger (offline), and scripts/compare_runs.py compares the three runs."""

import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torchtune.training.metric_logging import DiskLogger

from rao_tune.training.metrics import (METRICS_FILE, MetricsFileLogger, instantiate_metric_logger, read_disk_log,
                                       read_metrics)
from rao_tune.training.preflight import check_output_dir

from conftest import REPO_ROOT
from recipe_runner import load_recipe, run_recipe_in_process

CONFIG = REPO_ROOT / "configs" / "tiny_rao.yaml"
LOGGERS = "torchtune.training.metric_logging"


def train(monkeypatch, tiny_assets, output_dir, *overrides):
    """Three steps of the tiny RAO run (its metric logger writes into ``output_dir/logs``); returns its metrics."""
    run_recipe_in_process(monkeypatch, load_recipe("rao_distributed"), CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                          f"output_dir={output_dir}", "epochs=1", "max_steps_per_epoch=3", *overrides)
    return read_metrics(output_dir)


def losses(steps):
    return {step: metrics["loss"] for step, metrics in steps.items() if "loss" in metrics}


def tensorboard_losses(log_dir):
    """``{step: loss}`` from the TensorBoard event files under ``log_dir``."""
    found = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag == "loss":
                    found[event.step] = value.tensor.float_val[0] if value.HasField("tensor") else value.simple_value
    return found


@pytest.mark.slow
def test_every_metric_logger_leaves_the_same_metrics_and_compare_runs_reads_them(monkeypatch, tmp_path, tiny_assets):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    runs = {name: tmp_path / name for name in ("disk", "tensorboard", "wandb")}
    disk = train(monkeypatch, tiny_assets, runs["disk"])
    tensorboard = train(monkeypatch, tiny_assets, runs["tensorboard"],
                        f"metric_logger._component_={LOGGERS}.TensorBoardLogger")
    wandb = train(monkeypatch, tiny_assets, runs["wandb"], f"metric_logger._component_={LOGGERS}.WandBLogger",
                  "metric_logger.project=rao_tune_tests")

    # Same seed, same numbers, whichever logger ran beside the file.
    assert sorted(losses(disk)) == [1, 2, 3]
    assert losses(disk) == losses(tensorboard) == losses(wandb)
    # The configured loggers were really used, and were given the same metrics as the file.
    assert disk == read_disk_log(runs["disk"] / "logs")
    assert tensorboard_losses(runs["tensorboard"] / "logs") == pytest.approx(losses(tensorboard), rel=1e-6)
    assert not list((runs["tensorboard"] / "logs").glob("log_*.txt"))
    wandb_runs = list((runs["wandb"] / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_runs) == 1 and wandb_runs[0].stat().st_size > 0

    result = subprocess.run([sys.executable, "scripts/compare_runs.py", *map(str, runs.values()), "--last", "2"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0] for row in rows[1:]] == ["| disk", "| tensorboard", "| wandb"]
    assert rows[1][1:] == rows[2][1:] == rows[3][1:]  # steps, first loss and every last-steps mean
    assert rows[1][1] == "3" and float(rows[1][2]) == pytest.approx(losses(disk)[1], rel=1e-3)


class Recorder:
    """A metric logger that records the calls it gets."""

    def __init__(self):
        self.calls = []

    def log(self, name, data, step):
        self.calls.append(("log", name, data, step))

    def log_dict(self, payload, step):
        self.calls.append(("log_dict", payload, step))

    def log_config(self, config):
        self.calls.append(("log_config", config))

    def close(self):
        self.calls.append(("close",))


def test_a_resumed_run_appends_and_the_latest_value_of_a_step_wins(tmp_path):
    path = tmp_path / METRICS_FILE
    first = Recorder()
    logger = MetricsFileLogger(first, path)
    config = OmegaConf.create({"seed": 0})
    logger.log_config(config)
    logger.log("calibrated/z0", torch.tensor(2.5), step=0)
    for step in (1, 2, 3):
        logger.log_dict({"loss": torch.tensor(float(step)), "lr": 0.1}, step=step)
    assert first.calls[:2] == [("log_config", config), ("log", "calibrated/z0", torch.tensor(2.5), 0)]
    assert first.calls[-1] == ("log_dict", {"loss": torch.tensor(3.0), "lr": 0.1}, 3)
    assert isinstance(first.calls[-1][1]["loss"], torch.Tensor)  # the configured logger gets what was logged
    # Killed mid-write after its last checkpoint (step 2): every line up to the torn one is on disk unclosed.
    assert read_metrics(tmp_path)[3] == {"loss": 3.0, "lr": 0.1}
    with path.open("a") as file:
        file.write('{"step": 4, "lo')

    resumed = MetricsFileLogger(Recorder(), path)
    for step in (3, 4):
        resumed.log_dict({"loss": 10.0 * step}, step=step)
    resumed.close()
    assert resumed.logger.calls[-1] == ("close",)
    assert read_metrics(tmp_path) == {0: {"calibrated/z0": 2.5}, 1: {"loss": 1.0, "lr": 0.1},
                                      2: {"loss": 2.0, "lr": 0.1}, 3: {"loss": 30.0, "lr": 0.1}, 4: {"loss": 40.0}}


def test_a_run_without_metrics_file_is_read_from_its_disk_logger_files(tmp_path):
    """A torchtune recipe's run (or one from before metrics.jsonl): its DiskLogger files, oldest first."""
    first, resumed = DiskLogger(str(tmp_path / "logs"), "log_100.txt"), DiskLogger(str(tmp_path / "logs"), "log_200.txt")
    first.log_dict({"loss": 0.5, "lr": 0.1}, step=1)
    first.log_dict({"loss": 0.4}, step=2)
    resumed.log_dict({"loss": 0.3}, step=2)
    first.close()
    resumed.close()
    assert read_metrics(tmp_path) == {1: {"loss": 0.5, "lr": 0.1}, 2: {"loss": 0.3}}

    with pytest.raises(FileNotFoundError, match=rf"no metrics in run folder {tmp_path / 'empty'}: neither metrics\.jsonl"
                                                r" .*nor torchtune DiskLogger files \(logs/log_\*\.txt\)"):
        read_metrics(tmp_path / "empty")


def test_the_metrics_file_belongs_to_the_run(tmp_path):
    """A folder that holds only a run's metrics.jsonl (its logs were elsewhere) holds a run: refused, or deleted
    with overwrite=True."""
    run = tmp_path / "run"
    cfg = OmegaConf.create({"output_dir": str(run), "metric_logger": {"log_dir": str(tmp_path / "logs")}})
    run.mkdir()
    (run / METRICS_FILE).write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"already holds a run \(metrics\.jsonl\)"):
        check_output_dir(cfg)
    cfg.overwrite = True
    assert check_output_dir(cfg) is None
    assert not (run / METRICS_FILE).exists()


def test_every_start_in_the_same_second_gets_its_own_disk_log(monkeypatch, tmp_path):
    """torchtune names a DiskLogger file by the second it started and appends to it, so a requeued job or an
    overwrite within one second (what a fast machine does) would share a file; ours add ``_1``, ``_2``, and are
    read back in start order."""
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.7)
    cfg = OmegaConf.create({"_component_": f"{LOGGERS}.DiskLogger", "log_dir": str(tmp_path / "logs")})
    for step, loss in enumerate((0.5, 0.4, 0.3), start=1):
        logger = instantiate_metric_logger(cfg)
        logger.log_dict({"loss": loss}, step=step if step < 3 else 2)  # the third start logs step 2 again
        logger.close()
    assert sorted(path.name for path in (tmp_path / "logs").iterdir()) == [
        "log_1800000000.txt", "log_1800000000_1.txt", "log_1800000000_2.txt"]
    assert read_disk_log(tmp_path / "logs") == {1: {"loss": 0.5}, 2: {"loss": 0.3}}
    # A configured filename is kept as it is (torchtune appends to it).
    named = instantiate_metric_logger(OmegaConf.merge(cfg, {"filename": "mine.txt"}))
    named.close()
    assert (tmp_path / "logs" / "mine.txt").exists()
