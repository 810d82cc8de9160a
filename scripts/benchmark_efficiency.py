"""Side by side, in one run: what an alignment step costs the plain way and with each of rao-tune's savings.

Modes (the same model, workload and optimizer; each mode runs in its own process, so peak memory is its own):

    torchtune      torchtune 0.6.1's DPO recipe step itself: its ``concatenated_forward`` (full fp32 logits of
                   the padded chosen + rejected rows, ``rlhf.get_batch_log_probs``), ``padded_collate_dpo`` and
                   ``rlhf.loss.DPOLoss``, reference model run at every step (k = 2 only)
    padded         the same way for any loss and any k: one padded row per response, full logits, online reference
    fused          padded + log-probs straight from the hidden states (``rao_tune.training.logprobs``)
    precomputed    padded + reference log-probs computed before training (no reference forward, no second model)
    packed         padded -> packed prefix-shared rows (each prompt once, no padding but the row's tail)
    all            packed + fused + precomputed: what the recipes do by default
    all_dense_mask all, but packed rows attended through SDPA with a dense boolean mask over the whole row (as
                   before the CPU attention over the allowed blocks only; on CUDA flex attention is used by both)
    sft_torchtune  an SFT step over the same responses as torchtune's SFT recipe does it (padded prompt+response
                   rows, ``CEWithChunkedOutputLoss``): the floor a preference step is compared with
    sft_fused      an SFT step on rao-tune's path (packed + fused), over the same responses
    trl            trl's ``DPOTrainer`` on the same HF checkpoint and token ids (k = 2, when trl is installed;
                   ``scripts/benchmark_trl.py``), its defaults but fp32 and checkpointing as the other modes
    trl_precomputed  the same with ``precompute_ref_log_probs=True``, trl's saving that runs on CPU

The workload has UltraFeedback-like lengths (prompts 20-500 tokens, responses 50-800, long-tailed), ``--prompts``
prompts with ``--k`` responses each per step, sequences of at most ``--max-tokens``. Every mode runs the same
micro-batches in the same order; rounds interleave the modes (rotating their order) and the figures are medians /
sums over every timed step of every round. Useful tokens count each prompt once and each response, without
padding: the work a user asked for. Collation happens before timing, for every mode.

    python scripts/benchmark_efficiency.py --vocab 128256 --k 2 --rounds 3
    python scripts/benchmark_efficiency.py --vocab 32000 --k 4 --modes padded all sft_fused

``--optimizers`` runs each mode with each optimizer, interleaved too (rows ``mode [optimizer]``): ``adamw`` (torch's,
the default), ``adamw8bit`` (torchao's 8-bit states), each optionally ``+in_bwd`` (stepped inside backward,
``optimizer_in_bwd=True``: no gradient clipping there). ``--lr`` sets their learning rate; each row's ``losses``
in the JSON are its per-step losses on the same batches, the optimizers' effect on the loss curve.

    python scripts/benchmark_efficiency.py --modes all --optimizers adamw adamw+in_bwd adamw8bit adamw8bit+in_bwd

Peak memory in steps is the process's resident high-water mark from the end of set-up to the last step on CPU
(everything: Python, the model, optimizer state, activations), the allocator's peak on CUDA; ``growth`` is how far
it rose above its level after set-up; the lifetime peak includes set-up (loading, the reference precomputation).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MODES = ("torchtune", "padded", "fused", "precomputed", "packed", "all", "all_dense_mask", "sft_torchtune",
         "sft_fused", "trl", "trl_precomputed")
OPTIMIZERS = ("adamw", "adamw+in_bwd", "adamw8bit", "adamw8bit+in_bwd")
TRL_MODES = ("trl", "trl_precomputed")
PAIRWISE_ONLY = ("torchtune", *TRL_MODES)  # chosen/rejected: k = 2 and the DPO loss
BOS, EOS = 1, 2


# ------------------------------------------------------------------------------------------------ workload
def ultrafeedback_like_length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, rng.lognormvariate(math.log(median), sigma))))


def make_workload(*, vocab: int, k: int, prompts: int, steps: int, max_tokens: int, seed: int) -> list[list[dict]]:
    """``steps`` micro-batches of ``prompts`` prompts with ``k`` responses each: random token ids (t0 = BOS first,
    EOS last in each response), lengths drawn like UltraFeedback's, distinct rewards in decreasing order."""
    rng = random.Random(seed)
    batches = []
    for _ in range(steps):
        batch = []
        for _ in range(prompts):
            prompt_length = ultrafeedback_like_length(rng, 120, 0.8, 20, 500)
            prompt = [BOS] + [rng.randrange(3, vocab) for _ in range(prompt_length - 1)]
            responses = []
            for _ in range(k):
                length = min(ultrafeedback_like_length(rng, 250, 0.6, 50, 800), max_tokens - prompt_length)
                responses.append([rng.randrange(3, vocab) for _ in range(length - 1)] + [EOS])
            # Distinct, best first: torchtune's and trl's steps take the first response as the chosen one, so
            # every mode trains on the same preference (and their losses can be compared).
            rewards = sorted(rng.sample(range(1, 11), k), reverse=True)
            batch.append({"prompt_tokens": prompt, "response_tokens": responses, "rewards": [float(r) for r in rewards]})
        batches.append(batch)
    return batches


# ------------------------------------------------------------------------------------------------ one worker
def reset_peak_memory(device) -> None:
    """Start a new peak: the CUDA allocator's, or on Linux the process's high-water mark of resident memory
    (which ``getrusage``'s ``ru_maxrss`` follows too)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device) -> float:
    """Peak since :func:`reset_peak_memory`: allocated CUDA memory, or resident memory (VmHWM) on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return _proc_status_kib("VmHWM") / 2**20


def current_memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return _proc_status_kib("VmRSS") / 2**20


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def torchtune_dpo_recipe_class():
    """torchtune's own ``recipes/full_dpo_distributed.py`` from its wheel (our ``recipes/`` shadows the name)."""
    import torchtune

    path = Path(torchtune.__file__).resolve().parents[1] / "recipes" / "full_dpo_distributed.py"
    spec = importlib.util.spec_from_file_location("torchtune_full_dpo_distributed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FullDPORecipeDistributed


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Set up one mode, run its steps, return timings and memory. Runs in its own process."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import training
    from torchtune.rlhf.loss import DPOLoss as TorchtuneDPOLoss
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_dpo, padded_collate_sft
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from rao_tune.data import collate_reward_batch, longest_sequence, useful_tokens
    from rao_tune.losses import DPOLoss, RAOLoss, ResponseLogProbs
    from rao_tune.models.checkpoint_files import find_checkpoint_files
    from rao_tune.models.hf_model import hf_model_type
    from rao_tune.training.attention import model_inputs, packed_collator
    from rao_tune.training.distributed import init_distributed
    from rao_tune.training.logprobs import segment_sums, sequence_logps
    from rao_tune.training.model import setup_fsdp_model
    from rao_tune.training.optim_in_backward import OptimizerInBackward

    mode = args.worker
    dense_mask = mode == "all_dense_mask"  # the same step as all, with the dense-mask attention
    mode = "all" if dense_mask else mode
    device = torch.device(args.device)
    dtype = training.get_dtype(args.dtype, device=device)
    init_distributed(device)
    workload = json.loads(Path(args.workload).read_text())
    batches = workload["micro_batches"][: args.warmup + args.steps]
    torch.manual_seed(0)

    real = workload["model_kwargs"] is None  # an HF Llama/Qwen2 folder as it is (--checkpoint-dir)
    checkpointer = training.FullModelHFCheckpointer(
        checkpoint_dir=args.checkpoint, model_type=hf_model_type(args.checkpoint) if real else "LLAMA3",
        checkpoint_files=find_checkpoint_files(args.checkpoint), output_dir=tempfile.mkdtemp(prefix="bench_unused_"),
    )
    state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
    if real:
        cfg_model = OmegaConf.create({"_component_": "rao_tune.models.hf_model", "checkpoint_dir": args.checkpoint,
                                      "max_seq_len": args.max_seq_len})
    else:
        cfg_model = OmegaConf.create({"_component_": "torchtune.models.llama3.llama3", **workload["model_kwargs"]})
    if args.lora_rank:  # adapters on every projection, as configs/*_lora.yaml; QLoRA: NF4 base weights
        cfg_model = OmegaConf.merge(cfg_model, {
            "_component_": "rao_tune.models.lora_hf_model" if real else "torchtune.models.llama3.lora_llama3",
            "lora_rank": args.lora_rank,
            "lora_alpha": 2 * args.lora_rank, "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
            "apply_lora_to_mlp": True, "quantize_base": args.qlora})
    options = dict(device=device, dtype=dtype)
    model = setup_fsdp_model(cfg_model, state_dict, activation_checkpointing=args.activation_checkpointing,
                             compile=args.compile, **options)
    if args.float8:  # torchao's float8 training on every linear layer but the output projection
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=lambda module, name: name != "output")
    needs_reference = mode in ("torchtune", "padded", "fused", "precomputed", "packed", "all")
    # A LoRA policy is its own reference with the adapters off (as the recipes do); the benchmark keeps the
    # second model for every mode alike, so the ratios compare the steps, not the set-ups.
    reference = setup_fsdp_model(cfg_model, state_dict, trainable=False, compile=args.compile, **options) \
        if needs_reference else None
    del state_dict
    for net in (model, reference):
        if dense_mask and net is not None:
            net.prefix_shared_attention = False  # model_inputs then builds the dense boolean mask
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_name, _, in_backward = args.optimizer.partition("+")
    if optimizer_name == "adamw8bit":
        from torchao.optim import AdamW8bit as optimizer_class
    else:
        optimizer_class = functools.partial(torch.optim.AdamW, fused=False)
    if in_backward:  # as optimizer_in_bwd=True: each parameter steps in backward, its gradient freed
        optimizer = OptimizerInBackward([{"params": trainable}], lambda groups: optimizer_class(groups, lr=args.lr))
    else:
        optimizer = optimizer_class(trainable, lr=args.lr)
    loss_fn = RAOLoss(beta=0.1, z0=0.0) if args.loss == "rao" else DPOLoss(beta=0.1, pairs="best_vs_worst")

    def to_device(batch: dict) -> dict:
        return {key: value.to(device) for key, value in batch.items()}

    # --- how each mode turns a micro-batch into per-sequence log-probs
    def full_logits_logps(net, batch: dict) -> tuple:
        """The plain way: the model's full fp32 logits, log-softmax over the whole vocabulary, then gather."""
        net.set_num_output_chunks(0)
        logits = net(batch["tokens"], **model_inputs(batch))
        token_logps = torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
        token_logps = token_logps[batch["logit_positions"]].gather(-1, batch["target_tokens"][:, None]).squeeze(-1)
        return segment_sums(token_logps, batch)

    fused_logps = partial(sequence_logps, chunk_tokens=args.chunk_tokens)
    packed_collate = packed_collator(  # as the recipes set it up
        pad_id=0, device=device, model_max_seq_len=model.max_seq_len, max_row_tokens=args.max_row_tokens,
        longest=max(longest_sequence(samples) for samples in batches))
    layout = {"padded": collate_reward_batch, "fused": collate_reward_batch, "precomputed": collate_reward_batch,
              "packed": packed_collate, "all": packed_collate, "sft_fused": packed_collate}.get(mode)
    logps_fn = fused_logps if mode in ("fused", "all", "sft_fused") else full_logits_logps

    def preference_step(batch: dict) -> torch.Tensor:
        policy_logps, policy_prompt_logps = logps_fn(model, batch)
        if "reference_logps" in batch:
            reference_logps, reference_prompt_logps = batch["reference_logps"], batch["reference_prompt_logps"]
        else:
            with torch.no_grad():
                reference_logps, reference_prompt_logps = logps_fn(reference, batch)
        return loss_fn(ResponseLogProbs(
            policy_logps=policy_logps, policy_prompt_logps=policy_prompt_logps, reference_logps=reference_logps,
            reference_prompt_logps=reference_prompt_logps, rewards=batch["rewards"], prompt_ids=batch["prompt_ids"],
            response_lengths=batch["response_lengths"])).loss

    if mode in ("padded", "fused", "precomputed", "packed", "all"):
        prepared = [to_device(layout(samples)) for samples in batches]
        processed = [batch["tokens"].numel() for batch in prepared]
        if mode in ("precomputed", "all"):  # what the recipe does before training, untimed
            with torch.no_grad():
                for batch in prepared:
                    batch["reference_logps"], batch["reference_prompt_logps"] = logps_fn(reference, batch)
            reference = None
            gc.collect()
        step_loss: Callable[[dict], torch.Tensor] = preference_step
    elif mode == "torchtune":
        recipe = SimpleNamespace(_device=device)
        forward = partial(torchtune_dpo_recipe_class().concatenated_forward, recipe, activations_handling=False)
        dpo_loss = TorchtuneDPOLoss(beta=0.1)

        def as_dpo_example(sample: dict) -> dict:
            prompt, (chosen, rejected) = sample["prompt_tokens"], sample["response_tokens"]
            masked = [CROSS_ENTROPY_IGNORE_IDX] * len(prompt)
            return {"chosen_input_ids": prompt + chosen, "chosen_labels": masked + chosen,
                    "rejected_input_ids": prompt + rejected, "rejected_labels": masked + rejected}

        prepared = [tuple(t.to(device) for t in padded_collate_dpo([as_dpo_example(s) for s in samples]))
                    for samples in batches]
        processed = [input_ids.numel() for input_ids, _ in prepared]

        def step_loss(batch) -> torch.Tensor:  # the body of torchtune's DPO train loop
            policy_chosen, policy_rejected, chosen_logits, rejected_logits = forward(model, batch)
            _ = chosen_logits.detach().mean(), rejected_logits.detach().mean()  # logged by the recipe
            del chosen_logits, rejected_logits
            with torch.no_grad():
                reference_chosen, reference_rejected, ref_chosen_logits, ref_rejected_logits = forward(reference, batch)
            del ref_chosen_logits, ref_rejected_logits
            losses, _, _ = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
            return losses.mean()
    elif mode == "sft_torchtune":
        ce_loss = CEWithChunkedOutputLoss()
        model.set_num_output_chunks(ce_loss.num_output_chunks)

        def as_sft_example(prompt: list[int], response: list[int]) -> dict:
            return {"tokens": prompt + response, "labels": [CROSS_ENTROPY_IGNORE_IDX] * len(prompt) + response}

        prepared = [
            to_device(padded_collate_sft([as_sft_example(s["prompt_tokens"], r) for s in samples
                                          for r in s["response_tokens"]], padding_idx=0))
            for samples in batches
        ]
        processed = [batch["tokens"].numel() for batch in prepared]

        def step_loss(batch) -> torch.Tensor:  # torchtune's SFT recipe: shift labels, chunked cross-entropy
            labels = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], CROSS_ENTROPY_IGNORE_IDX)], 1)
            return ce_loss(model(batch["tokens"]), labels)
    elif mode == "sft_fused":
        prepared = [to_device(layout(samples)) for samples in batches]
        processed = [batch["tokens"].numel() for batch in prepared]

        def step_loss(batch) -> torch.Tensor:  # the same token-mean NLL over response tokens
            response_logps, _ = fused_logps(model, batch)
            return -response_logps.sum() / batch["response_lengths"].sum()
    else:
        raise ValueError(f"unknown mode {mode!r}")

    gc.collect()
    memory_after_setup = current_memory_gib(device)
    setup_peak = peak_memory_gib(device)
    reset_peak_memory(device)
    step_times, losses = [], []
    def train_step(batch: dict) -> float:
        with torch.profiler.record_function("phase: forward"):
            loss = step_loss(batch)
        with torch.profiler.record_function("phase: backward"):
            loss.backward()
        with torch.profiler.record_function("phase: optimizer"):
            if not in_backward:  # (a step in backward cannot clip: the recipes refuse clip_grad_norm with it)
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as the recipes (and trl) do
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.item()

    for batch in prepared:
        started = time.perf_counter()
        losses.append(train_step(batch))
        step_times.append(time.perf_counter() - started)
    peak_in_steps = peak_memory_gib(device)  # before the profiled step and the profiler's own memory
    profile = profile_step(lambda: train_step(prepared[args.warmup]), model, optimizer) if args.profile else None
    return {
        "profile": profile,
        "step_times": step_times[args.warmup:],
        "useful_tokens_per_step": [useful_tokens(samples) for samples in batches][args.warmup:],
        "processed_tokens_per_step": processed[args.warmup:],
        "peak_memory_gib": peak_in_steps,
        "memory_after_setup_gib": memory_after_setup,
        "lifetime_peak_memory_gib": max(setup_peak, peak_in_steps),
        "first_loss": losses[0],
        "losses": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# ------------------------------------------------------------------------------------------------ the driver
# Op families of a step's profile, by the first matching substring of an op's name (self time; the rest: "other").
OP_FAMILIES = (
    ("attention (SDPA kernels)", ("scaled_dot_product", "flash_attention", "_efficient_attention", "flex_attention")),
    ("matrix products (projections, MLP, output)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                                    "aten::_weight_int", "aten::matmul", "aten::linear")),
    ("softmax / log-softmax", ("softmax",)),
    ("copies, casts, layout", ("aten::copy_", "aten::to", "aten::contiguous", "aten::clone", "aten::cat",
                               "aten::index", "aten::gather", "aten::scatter", "aten::masked", "aten::where",
                               "aten::fill_", "aten::zero_", "aten::empty")),
    ("element-wise (norms, activations, rotary, AdamW math)", ("aten::mul", "aten::add", "aten::sub", "aten::div",
                                                              "aten::pow", "aten::rsqrt", "aten::sqrt", "aten::mean",
                                                              "aten::silu", "aten::sigmoid", "aten::exp", "aten::neg",
                                                              "aten::lerp", "aten::sum", "_foreach", "aten::addc")),
)


def profile_step(step: Callable[[], float], model, optimizer) -> dict[str, Any]:
    """One more step under torch.profiler: wall time of forward / backward / optimizer (``record_function``
    phases; activation checkpointing's recomputation falls in backward), self time by op family, and the bytes
    of each kind of training state (weights, gradients as large as the trained weights, optimizer state)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from rao_tune.training.optim_in_backward import checkpointed_optimizers  # (one per parameter in backward)

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.key_averages()
    # On a GPU the kernels' time (the host only queues them), on CPU the ops' own.
    total, own = ("device_time_total", "self_device_time_total") if cuda else ("cpu_time_total", "self_cpu_time_total")
    phases = {event.key.removeprefix("phase: "): getattr(event, total) / 1e6 for event in events
              if event.key.startswith("phase: ")}
    families: dict[str, float] = {}
    others: dict[str, float] = {}
    for event in events:
        if event.key.startswith("phase: "):
            continue
        family = next((name for name, needles in OP_FAMILIES if any(n in event.key for n in needles)), "other")
        families[family] = families.get(family, 0.0) + getattr(event, own) / 1e6
        if family == "other":
            others[event.key] = getattr(event, own) / 1e6
    states = [each.state for each in checkpointed_optimizers(optimizer)]
    state_bytes = sum(_tensor_bytes(value) for state in states for per_param in state.values()
                      for value in per_param.values())
    trained = [p for p in model.parameters() if p.requires_grad]
    return {
        "phases_s": phases,
        "op_families_self_s": dict(sorted(families.items(), key=lambda item: -item[1])),
        "largest_other_ops_self_s": dict(sorted(others.items(), key=lambda item: -item[1])[:6]),
        "state_gib": {"weights": sum(_tensor_bytes(p) for p in model.parameters()) / 2**30,
                      "gradients (trained weights' size)": sum(_tensor_bytes(p) for p in trained) / 2**30,
                      "optimizer state": state_bytes / 2**30},
    }


def _tensor_bytes(value) -> int:
    """Bytes a tensor holds: its local shard for a DTensor, the packed storage of a quantized subclass."""
    import torch

    if not isinstance(value, torch.Tensor):
        return 0
    local = value.to_local() if hasattr(value, "to_local") else value
    if hasattr(local, "__tensor_flatten__") and type(local) is not torch.Tensor:
        names, _ = local.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(local, name)) for name in names)
    return local.numel() * local.element_size()


def summarise(runs: list[dict], peak_tflops: float | None = None) -> dict[str, float]:
    """Medians and sums over every timed step of every round. ``useful_mfu`` (with the device's ``peak_tflops``)
    counts 6 x parameters FLOPs per useful token (forward and backward of a dense decoder, attention's own
    FLOPs and the reference's forward left out; with LoRA the same count, though the frozen weights get no
    gradient): the share of the peak spent on the work a user asked for."""
    step_times = [t for run in runs for t in run["step_times"]]
    useful = sum(n for run in runs for n in run["useful_tokens_per_step"])
    processed = sum(n for run in runs for n in run["processed_tokens_per_step"])
    parameters = runs[0].get("parameters")
    return {
        "useful_mfu": 6 * parameters * useful / sum(step_times) / (peak_tflops * 1e12)
        if peak_tflops and parameters else None,
        "median_step_s": statistics.median(step_times),
        "useful_tokens_per_s": useful / sum(step_times),
        "processed_per_useful": processed / useful,
        "peak_memory_gib": statistics.median(run["peak_memory_gib"] for run in runs),
        "growth_gib": statistics.median(run["peak_memory_gib"] - run["memory_after_setup_gib"] for run in runs),
        "lifetime_peak_memory_gib": statistics.median(run["lifetime_peak_memory_gib"] for run in runs),
        "timed_steps": len(step_times),
        # The same batches in every row: the mean over every step (warm-up included) compares optimizers' curves.
        "mean_loss": statistics.mean(loss for run in runs for loss in run["losses"]) if "losses" in runs[0] else None,
    }


def markdown_table(summaries: dict[str, dict], base: str) -> str:
    lines = [
        f"| mode | median step (s) | useful tokens/s | tokens processed per useful token | peak memory in steps (GiB) | "
        f"growth in steps (GiB) | peak incl. set-up (GiB) | step time / {base} | tokens/s / {base} | "
        f"peak memory in steps / {base} | mean loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = summaries.get(base)
    for mode, s in summaries.items():
        ratios = ["", "", ""]
        if reference:
            ratios = [f"{s['median_step_s'] / reference['median_step_s']:.2f}",
                      f"{s['useful_tokens_per_s'] / reference['useful_tokens_per_s']:.2f}",
                      f"{s['peak_memory_gib'] / reference['peak_memory_gib']:.2f}"]
        mfu = f" (MFU {s['useful_mfu']:.1%})" if s.get("useful_mfu") is not None else ""
        mean_loss = f"{s['mean_loss']:.4f}" if s.get("mean_loss") is not None else ""
        lines.append(f"| {mode} | {s['median_step_s']:.3f} | {s['useful_tokens_per_s']:.0f}{mfu} | "
                     f"{s['processed_per_useful']:.2f} | {s['peak_memory_gib']:.2f} | {s['growth_gib']:.2f} | "
                     f"{s['lifetime_peak_memory_gib']:.2f} | " + " | ".join(ratios) + f" | {mean_loss} |")
    return "\n".join(lines)


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="an HF Llama/Qwen2 folder (e.g. SmolLM2-135M-Instruct's): its shape and weights")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--k", type=int, default=2, help="responses per prompt")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (micro-batch)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="longest prompt + response")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--max-seq-len", type=int, default=8192, help="the model's, and the packed rows' default budget")
    parser.add_argument("--max-row-tokens", type=int, default=None, help="packed row budget (default: the recipes')")
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="scored tokens per fused chunk")
    parser.add_argument("--loss", choices=("dpo", "rao"), default="dpo")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (torchtune's way)")
    parser.add_argument("--float8", action="store_true", help="torchao float8 training of the linear layers (CUDA, sm89+)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0: full training)")
    parser.add_argument("--qlora", action="store_true", help="with --lora-rank: NF4-quantized base weights")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak (H100 SXM bf16: 989) for the useful-MFU column")
    parser.add_argument("--optimizers", nargs="+", default=["adamw"], choices=OPTIMIZERS,
                        help="run each mode with each (rows 'mode [optimizer]' when more than one)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--release-freed-memory", action="store_true",
                        help="CPU: glibc returns every freed block of 64 KiB or more at once (MALLOC_MMAP_THRESHOLD_), "
                             "so the resident peak follows live tensors (slower steps: time with it off)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step per mode (last round): time by phase and op family, state sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the summaries and raw runs as JSON")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    modes = [m for m in args.modes if not (m in PAIRWISE_ONLY and (args.k != 2 or args.loss != "dpo"))]
    trl_modes = [mode for mode in modes if mode in TRL_MODES]
    if trl_modes and not trl_available():
        print("trl is not installed (pip install trl==1.16.0): its modes are skipped", file=sys.stderr)
    elif trl_modes and ((args.device, args.dtype) != ("cpu", "fp32") or args.compile or args.float8 or args.lora_rank):
        print("the trl modes run CPU fp32 full training only: skipped", file=sys.stderr)
    else:
        trl_modes = []
    modes = [mode for mode in modes if mode not in trl_modes]
    skipped = sorted(set(args.modes) - set(modes))
    from rao_tune.toy.assets import build_llama3_checkpoint

    if args.checkpoint_dir:  # the folder's shape and weights; the shape flags are ignored
        from rao_tune.models.hf_model import read_hf_config

        config = read_hf_config(args.checkpoint_dir)
        args.vocab, args.layers, args.dim = config["vocab_size"], config["num_hidden_layers"], config["hidden_size"]
        args.heads, args.intermediate = config["num_attention_heads"], config["intermediate_size"]
        args.kv_heads = config.get("num_key_value_heads", args.heads)
    with tempfile.TemporaryDirectory(prefix="rao_bench_") as scratch:
        checkpoint = Path(scratch) / "model"
        if args.checkpoint_dir:
            checkpoint, model_kwargs = args.checkpoint_dir.resolve(), None
        else:
            model_kwargs = build_llama3_checkpoint(
                checkpoint, args.vocab, seed=args.seed, num_layers=args.layers, embed_dim=args.dim,
                num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_dim=args.intermediate,
                max_seq_len=args.max_seq_len, bos_token_id=BOS, eos_token_id=EOS,
            )
        batches = make_workload(vocab=args.vocab, k=args.k, prompts=args.prompts, steps=args.warmup + args.steps,
                                max_tokens=args.max_tokens, seed=args.seed)
        workload = Path(scratch) / "workload.json"
        workload.write_text(json.dumps({"vocab_size": args.vocab, "model_kwargs": model_kwargs, "micro_batches": batches}))

        common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--workload", str(workload),
                  "--checkpoint", str(checkpoint)]
        variants = [(mode, optimizer) for mode in modes for optimizer in args.optimizers
                    if mode not in TRL_MODES or optimizer == "adamw"]  # trl runs its own AdamW
        if any(mode in TRL_MODES for mode in modes) and "adamw" not in args.optimizers:
            print("the trl modes run trl's AdamW only: skipped (add adamw to --optimizers)", file=sys.stderr)
        name = {variant: variant[0] if len(args.optimizers) == 1 else f"{variant[0]} [{variant[1]}]"
                for variant in variants}
        runs: dict[str, list[dict]] = {name[variant]: [] for variant in variants}
        for round_index in range(args.rounds):
            order = variants[round_index % len(variants):] + variants[: round_index % len(variants)]
            for mode, optimizer in order:
                if mode in TRL_MODES:  # its --steps counts the warm-up steps too
                    command = [sys.executable, str(REPO_ROOT / "scripts" / "benchmark_trl.py"), *common,
                               "--steps", str(args.warmup + args.steps),
                               *(["--precompute-ref-log-probs"] if mode == "trl_precomputed" else []),
                               *(["--activation-checkpointing"] if args.activation_checkpointing else [])]
                else:
                    command = [
                        sys.executable, __file__, "--worker", mode, *common, "--loss", args.loss,
                        "--device", args.device, "--dtype", args.dtype, "--chunk-tokens", str(args.chunk_tokens),
                        "--max-seq-len", str(args.max_seq_len),
                        *(["--max-row-tokens", str(args.max_row_tokens)] if args.max_row_tokens else []),
                        *(["--activation-checkpointing"] if args.activation_checkpointing else []),
                        *(["--compile"] if args.compile else []), *(["--float8"] if args.float8 else []),
                        *(["--lora-rank", str(args.lora_rank)] if args.lora_rank else []),
                        *(["--qlora"] if args.qlora else []), "--optimizer", optimizer, "--lr", str(args.lr),
                        *(["--profile"] if args.profile and round_index == args.rounds - 1 else []),
                    ]
                started = time.perf_counter()
                # glibc keeps freed blocks below its adaptive mmap threshold in the heap, so the resident peak
                # stays high after tensors are freed (e.g. gradients freed in backward); a fixed threshold unmaps them.
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if args.release_freed_memory else None
                result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
                if result.returncode != 0:
                    sys.exit(f"mode {mode} failed:\n{result.stderr[-4000:]}")
                run = json.loads(result.stdout.strip().splitlines()[-1])
                runs[name[mode, optimizer]].append(run)
                print(f"round {round_index + 1}/{args.rounds} {name[mode, optimizer]}: median step "
                      f"{statistics.median(run['step_times']):.3f} s ({time.perf_counter() - started:.0f} s)",
                      file=sys.stderr)

    summaries = {mode: summarise(mode_runs, args.peak_tflops) for mode, mode_runs in runs.items()}
    settings = (f"vocab {args.vocab}, k = {args.k}, {args.prompts} prompts per step, max {args.max_tokens} tokens, "
                f"{args.layers} layers, dim {args.dim}, {args.dtype} on {args.device}, loss {args.loss}, "
                f"{'activation checkpointing, ' if args.activation_checkpointing else ''}"
                f"{'compiled, ' if args.compile else ''}{'float8, ' if args.float8 else ''}"
                f"{'freed memory released (MALLOC_MMAP_THRESHOLD_=65536), ' if args.release_freed_memory else ''}"
                f"{f'LoRA rank {args.lora_rank}, ' if args.lora_rank else ''}{'NF4 base, ' if args.qlora else ''}"
                f"{'optimizers ' + ', '.join(args.optimizers) + f' at lr {args.lr}, ' if len(args.optimizers) > 1 else ''}"
                f"{args.rounds} rounds x {args.steps} timed steps per mode")
    print(f"\n{settings}" + (f"; skipped: {', '.join(skipped)}" if skipped else "") + "\n")
    base = name.get(("padded", args.optimizers[0]), next(iter(summaries)))
    print(markdown_table(summaries, base=base))
    for variant, mode_runs in runs.items():
        if mode_runs[-1].get("profile"):
            print(f"\nprofile of {variant}: {json.dumps(mode_runs[-1]['profile'], indent=1)}")
    if args.out:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "summaries": summaries,
                                        "runs": runs}, indent=2, default=str))


if __name__ == "__main__":
    main()
