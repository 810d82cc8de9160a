"""Export a run's step checkpoint (``output_dir/checkpoints/step_N``) to HF format, with the run's own config.

    tune run --nproc_per_node 1 recipes/export_checkpoint.py --config configs/llama3_8b_rao.yaml step=1200
    tune run --nproc_per_node 1 recipes/export_checkpoint.py --config configs/tiny_rao.yaml export_dir=/tmp/hf

``step`` picks the checkpoint (default: the newest complete one); the export goes to ``export_dir`` (default
``output_dir/step_N_hf``), written through a staging folder and renamed when complete, like the epoch exports.
One process, on CPU: the sharded checkpoint is read back whole, so no GPU and no process group are needed.
A LoRA run's export is the merged model plus its adapter in PEFT format (``export_dir/adapter``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import config, training, utils

from rao_tune.training.checkpoint import STAGING_DIR, complete_checkpoints, read_trainer_state, write_hf_export
from rao_tune.training.errors import run_main
from rao_tune.training.lora import AdapterExport, freeze_all_but_adapters, initial_adapter_state, lora_settings

log = utils.get_logger("INFO")


def export_step_checkpoint(cfg: DictConfig) -> Path:
    output_dir = Path(cfg.output_dir)
    checkpoints = {int(path.name.split("_")[1]): path for path in complete_checkpoints(output_dir)}
    if not checkpoints:
        raise ValueError(f"{output_dir / 'checkpoints'} holds no complete step checkpoint")
    step = cfg.get("step", None)
    if step is not None and step not in checkpoints:
        raise ValueError(f"no complete checkpoint for step {step} in {output_dir / 'checkpoints'}; "
                         f"there are steps {sorted(checkpoints)}")
    checkpoint = checkpoints[step if step is not None else max(checkpoints)]
    export_dir = Path(cfg.get("export_dir", None) or output_dir / f"{checkpoint.name}_hf")

    # The configured starting checkpoint gives the file layout and HF config the export follows. A staging folder
    # of its own: the run may still be training (and staging its epoch exports) beside this export.
    staging = output_dir / f"{STAGING_DIR}-export-{os.getpid()}"
    checkpointer = config.instantiate(cfg.checkpointer, output_dir=str(staging), should_load_recipe_state=False)
    starting_state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    with training.set_default_dtype(training.get_dtype(cfg.dtype, device=torch.device("cpu"))):
        model = config.instantiate(cfg.model)
    if lora_settings(model) is not None:  # the step checkpoint holds what trained: adapters (and a new head)
        starting_state.update(initial_adapter_state(model, seed=0))
        freeze_all_but_adapters(model)
    model.load_state_dict(starting_state)
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    state = {"model": {name: tensor for name, tensor in model.state_dict().items() if name in trained}}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)  # reshards into whole tensors
    model.load_state_dict(state["model"], strict=False)
    whole = {name: tensor.get_original_weight() if isinstance(tensor, NF4Tensor) else tensor
             for name, tensor in model.state_dict().items()}

    global_step = read_trainer_state(checkpoint)["progress"]["global_step"]
    write_hf_export(checkpointer, whole, staging_dir=staging, staging_epoch=global_step, export_dir=export_dir,
                    adapters=AdapterExport.for_model(model, cfg.checkpointer))
    shutil.rmtree(staging, ignore_errors=True)
    log.info(f"Exported {checkpoint} (step {global_step}) to {export_dir}")
    return export_dir


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    export_step_checkpoint(cfg)


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
