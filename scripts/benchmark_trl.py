"""Wall-clock time of trl's ``DPOTrainer`` optimizer steps on a fixed workload, as a peer in side-by-side benchmarks.

Step i trains on micro-batch i of the workload, with exactly its token ids and its grouping (the prompts of one
micro-batch, each with its chosen and rejected response): one optimizer step per micro-batch, sigmoid loss, beta 0.1,
fp32 on CPU, the reference model a second copy of the checkpoint (trl's default), reference log-probs computed in
each step (trl's default). Each step is timed from trl's ``on_step_begin`` to ``on_step_end`` callback (forward of
policy and reference, backward, clipping, optimizer, scheduler); the first ``--warmup`` steps are left out.

    python scripts/benchmark_trl.py --workload WORKLOAD.json --checkpoint HF_DIR --steps N --warmup W [--threads T]

``--steps`` counts all steps, warm-up included, and must not exceed the workload's micro-batches. Prints one JSON line
on stdout, ``{"step_times": [...], "peak_memory_gib": ... (resident high-water mark during the steps),
"memory_after_setup_gib": ..., "lifetime_peak_memory_gib": ..., "useful_tokens_per_step": [...],
"processed_tokens_per_step": [...]}``; everything else goes to stderr. Needs ``trl`` (``pip install trl==1.16.0``), an optional benchmark dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Nothing may reach the network: the checkpoint is local and trl's telemetry honours these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rao_tune.data import useful_tokens  # noqa: E402
from scripts.benchmark_efficiency import current_memory_gib, peak_memory_gib, reset_peak_memory  # noqa: E402

CPU = torch.device("cpu")


def load_workload(workload_path: str | Path) -> tuple[int, list[list[dict]]]:
    workload = json.loads(Path(workload_path).read_text())
    micro_batches = workload["micro_batches"]
    prompts_per_batch = {len(micro_batch) for micro_batch in micro_batches}
    if len(prompts_per_batch) != 1:
        raise ValueError(f"micro-batches hold different numbers of prompts: {sorted(prompts_per_batch)}")
    for micro_batch in micro_batches:
        for sample in micro_batch:
            if len(sample["response_tokens"]) != 2:
                raise ValueError("trl's DPO needs exactly 2 responses per prompt (chosen first, then rejected)")
    return workload["vocab_size"], micro_batches


def pretokenized_rows(micro_batches: list[list[dict]]) -> dict[str, list[list[int]]]:
    """Columns of trl's tokenized preference data, one row per prompt, in micro-batch order."""
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for micro_batch in micro_batches:
        for sample in micro_batch:
            chosen, rejected = sample["response_tokens"]
            rows["prompt_ids"].append(list(sample["prompt_tokens"]))
            rows["chosen_ids"].append(list(chosen))
            rows["rejected_ids"].append(list(rejected))
    return rows


def placeholder_tokenizer(vocab_size: int, bos_id: int, eos_id: int):
    """A tokenizer with one made-up word per id, so trl has a processing class without anything downloaded.

    trl only reads its pad token id (for padding, masked out by the attention mask); it never tokenizes text here.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    word_of = [f"<id{token_id}>" for token_id in range(vocab_size)]
    backend = Tokenizer(WordLevel({word: token_id for token_id, word in enumerate(word_of)}, unk_token=word_of[0]))
    # pad = eos is what trl falls back to for a tokenizer without a pad token.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=word_of[bos_id], eos_token=word_of[eos_id], pad_token=word_of[eos_id]
    )


def run_trl_dpo(
    workload_path: str | Path, checkpoint_dir: str | Path, steps: int, warmup: int, *, threads: int | None = None,
    precompute_ref_log_probs: bool = False, activation_checkpointing: bool = False,
) -> dict:
    """Train trl's DPO for ``steps`` steps on the workload's first micro-batches; time all but the first ``warmup``.

    ``precompute_ref_log_probs``: trl's option to score the reference once before training (not timed, as our
    precomputed modes). trl 1.16's other savings do not apply on CPU: ``padding_free`` "warns and falls back to
    standard padding" since its DPO refactor, Liger kernels need Triton, ``activation_offloading`` a CUDA stream."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if threads is not None:
        torch.set_num_threads(threads)
    vocab_size, micro_batches = load_workload(workload_path)
    if not 0 <= warmup < steps <= len(micro_batches):
        raise ValueError(f"need 0 <= warmup < steps <= {len(micro_batches)} micro-batches, got {warmup=} {steps=}")
    micro_batches = micro_batches[:steps]
    prompts_per_batch = len(micro_batches[0])
    first_sample = micro_batches[0][0]
    tokenizer = placeholder_tokenizer(
        vocab_size, bos_id=first_sample["prompt_tokens"][0], eos_id=first_sample["response_tokens"][0][-1]
    )

    class PretokenizedDPOTrainer(DPOTrainer):
        # trl 1.16 always renders and tokenizes text columns (and appends EOS) before training; the workload is
        # already the token ids that step would produce, so it is kept as is. Collation, forwards and loss are trl's.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_times: list[float] = []
            self._started = 0.0
            self.memory_after_setup_gib = self.setup_peak_gib = float("nan")

        def on_train_begin(self, args, state, control, **kwargs):
            self.memory_after_setup_gib = current_memory_gib(CPU)
            self.setup_peak_gib = peak_memory_gib(CPU)
            reset_peak_memory(CPU)  # the peak in steps, as the other modes report it

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_times.append(time.perf_counter() - self._started)

    class RecordingCollator:
        """trl's own collator, keeping what each step received so the tokens can be checked after training."""

        def __init__(self, collator):
            self.collator = collator
            self.batches: list[dict[str, torch.Tensor]] = []

        def __call__(self, examples):
            batch = self.collator(examples)
            self.batches.append({key: batch[key].clone() for key in ("input_ids", "attention_mask", "completion_mask")})
            return batch

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="trl_bench_") as scratch:
        config = DPOConfig(
            output_dir=scratch,
            per_device_train_batch_size=prompts_per_batch,
            gradient_accumulation_steps=1,
            max_steps=steps,
            train_sampling_strategy="sequential",  # step i must see micro-batch i
            loss_type=["sigmoid"],
            beta=0.1,
            max_length=None,  # nothing truncated
            precompute_ref_log_probs=precompute_ref_log_probs,
            padding_free=False,
            use_liger_kernel=False,
            # trl defaults to bf16 autocast and gradient checkpointing; the peers run fp32, checkpointing as asked.
            bf16=False,
            fp16=False,
            activation_checkpointing=activation_checkpointing,  # transformers 5's name for gradient_checkpointing
            use_cpu=True,
            dataloader_num_workers=0,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
        )
        trainer = PretokenizedDPOTrainer(
            model=str(checkpoint_dir),
            ref_model=None,  # trl loads a second copy of the checkpoint as the reference
            args=config,
            train_dataset=Dataset.from_dict(pretokenized_rows(micro_batches)),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        recorder = RecordingCollator(trainer.data_collator)
        trainer.data_collator = recorder
        trainer.train()

    check_tokens_match(recorder.batches, micro_batches)
    if len(timer.step_times) != steps:
        raise RuntimeError(f"trl ran {len(timer.step_times)} steps, expected {steps}")
    return {
        "step_times": timer.step_times[warmup:],
        "peak_memory_gib": peak_memory_gib(CPU),
        "memory_after_setup_gib": timer.memory_after_setup_gib,
        "lifetime_peak_memory_gib": max(timer.setup_peak_gib, peak_memory_gib(CPU)),
        "useful_tokens_per_step": [useful_tokens(micro_batch) for micro_batch in micro_batches[warmup:]],
        # padded chosen + rejected rows, as trl's collator built them
        "processed_tokens_per_step": [batch["input_ids"].numel() for batch in recorder.batches[warmup:steps]],
    }


def check_tokens_match(batches: list[dict[str, torch.Tensor]], micro_batches: list[list[dict]]) -> None:
    """Each step's unpadded sequences must be the workload's prompt+chosen (first half) and prompt+rejected rows."""
    if len(batches) < len(micro_batches):
        raise RuntimeError(f"trl collated {len(batches)} batches for {len(micro_batches)} steps")
    for step, (batch, micro_batch) in enumerate(zip(batches, micro_batches)):
        expected = [s["prompt_tokens"] + s["response_tokens"][0] for s in micro_batch]
        expected += [s["prompt_tokens"] + s["response_tokens"][1] for s in micro_batch]
        prompt_lengths = [len(s["prompt_tokens"]) for s in micro_batch] * 2
        got = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        completion_starts = [int(mask.nonzero()[0]) for mask in batch["completion_mask"]]
        if got != expected or completion_starts != prompt_lengths:
            raise RuntimeError(f"step {step}: trl's batch differs from micro-batch {step} of the workload")
    print(f"checked: the {len(micro_batches)} steps saw exactly the workload's tokens, in order", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", required=True, type=Path, help="JSON with vocab_size and micro_batches")
    parser.add_argument("--checkpoint", required=True, type=Path, help="HF LlamaForCausalLM folder")
    parser.add_argument("--steps", required=True, type=int, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", required=True, type=int, help="first steps left out of the timings")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--precompute-ref-log-probs", action="store_true", help="trl's precompute_ref_log_probs=True")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    # Libraries print progress and notices to stdout; keep stdout for the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_trl_dpo(args.workload, args.checkpoint, args.steps, args.warmup, threads=args.threads,
                             precompute_ref_log_probs=args.precompute_ref_log_probs,
                             activation_checkpointing=args.activation_checkpointing)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
