"""More than one node: two `tune run --nnodes 2 --nproc_per_node 1` launches meeting through torchrun's c10d
rendezvous (as scripts/slurm_multinode.sh starts them on two machines) train exactly like one node with two
processes."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from rao_tune.training.metrics import read_disk_log

from conftest import REPO_ROOT
from recipe_runner import TORCHRUN_THREADS
from test_rao_recipe import load_tune_model

pytestmark = pytest.mark.slow
SETTINGS = ["epochs=1", "max_steps_per_epoch=4", "batch_size=2", "save_every_n_steps=2"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tune_run(launch, tiny_assets, output_dir):
    return [
        sys.executable, "-m", "torchtune._cli.tune", "run", *launch, "recipes/rao_distributed.py",
        "--config", "configs/tiny_rao.yaml", f"assets_dir={tiny_assets['out_dir']}", f"output_dir={output_dir}",
        *SETTINGS,
    ]


def test_two_nodes_of_one_process_match_one_node_of_two(tmp_path, tiny_assets):
    one_node = subprocess.run(tune_run(["--nproc_per_node", "2"], tiny_assets, tmp_path / "one_node"),
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert one_node.returncode == 0, one_node.stderr[-4000:]

    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "test_two_nodes"]
    # A one-process launch keeps every core; the one-node run's two processes got one thread each from torchrun.
    # Same threads, same rows per rank, same gloo sums of two terms: the same computation, hence the tight bounds.
    nodes = [subprocess.Popen(tune_run(rendezvous, tiny_assets, tmp_path / "two_nodes"), cwd=REPO_ROOT,
                              env={**os.environ, **TORCHRUN_THREADS}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    assert "2 processes" in "".join(outputs)

    one, two = read_disk_log(tmp_path / "one_node" / "logs"), read_disk_log(tmp_path / "two_nodes" / "logs")
    assert sorted(s for s in two if s > 0) == [1, 2, 3, 4]
    for step in range(1, 5):
        for key in ("loss", "grad_norm", "implicit_reward"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-6, abs=1e-8), (step, key)
    one_weights = load_tune_model(tmp_path / "one_node" / "epoch_0", tiny_assets, tmp_path).state_dict()
    two_weights = load_tune_model(tmp_path / "two_nodes" / "epoch_0", tiny_assets, tmp_path).state_dict()
    for name, value in one_weights.items():
        torch.testing.assert_close(two_weights[name], value, atol=1e-7, rtol=1e-6, msg=name)
    assert sorted(p.name for p in (tmp_path / "two_nodes" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
