"""Sample k responses per prompt from a checkpoint: the on-policy responses a reward model then scores.

    tune run --nproc_per_node 1 recipes/sample_responses.py --config configs/tiny_sample.yaml

Reads prompts (``{"prompt": str or chat messages}`` per JSON line), renders each in the model's chat format as
our training prompts are (messages + an open assistant header), samples ``num_samples`` continuations with
torchtune's KV-cache generation (seeded: the same file for the same seed; a progress bar over the samples, the
generated tokens/s logged at the end), and writes rows
``{"prompt", "responses"}`` that ``recipes/annotate_rewards.py`` scores.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig
from torchtune import config, utils
from torchtune.data import Message
from tqdm.auto import tqdm

from rao_tune.data.reward_dataset import tokenize_prompt
from rao_tune.eval.generation import decode_text, generate_tokens, load_for_inference, stop_token_ids
from rao_tune.files import write_atomically
from rao_tune.training.errors import run_main

log = utils.get_logger("INFO")


def prompt_messages(prompt) -> list[Message]:
    if isinstance(prompt, str):
        return [Message(role="user", content=prompt, masked=True)]
    return [Message(role=m["role"], content=m["content"], masked=True) for m in prompt]


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="sample_responses", cfg=cfg)
    model, tokenizer, device, dtype = load_for_inference(
        cfg.model, cfg.checkpointer, cfg.tokenizer, device=cfg.device, dtype=cfg.dtype
    )
    prompts = [json.loads(line)["prompt"] for line in Path(cfg.prompts).read_text().splitlines() if line.strip()]
    rendered = [tokenize_prompt(tokenizer, prompt_messages(prompt)) for prompt in prompts]
    k = cfg.num_samples
    started = time.perf_counter()
    with tqdm(total=len(rendered) * k, desc=f"sampling (temperature {cfg.temperature})", unit="sample") as bar:
        new_tokens = generate_tokens(
            model, [tokens for tokens in rendered for _ in range(k)], max_new_tokens=cfg.max_new_tokens,
            pad_id=tokenizer.pad_id, stop_tokens=stop_token_ids(tokenizer), device=device, dtype=dtype,
            temperature=cfg.temperature, top_k=cfg.get("top_k"), batch_size=cfg.batch_size, seed=cfg.seed,
            progress=bar.update,
        )
    seconds = time.perf_counter() - started
    generated = sum(len(tokens) for tokens in new_tokens)
    log.info(f"generated {generated} tokens in {seconds:.1f} s ({generated / seconds:.1f} tokens/s, "
             f"batch {cfg.batch_size}, temperature {cfg.temperature})")
    rows = []
    for index, prompt in enumerate(prompts):
        responses = [decode_text(tokenizer, tokens) for tokens in new_tokens[index * k : (index + 1) * k]]
        # An empty sample cannot be scored or trained on: keep the non-empty ones (at least one is needed).
        responses = [text for text in responses if text] or ["<empty>"]
        rows.append({"prompt": prompt, "responses": responses})
    output = Path(cfg.output_path)
    write_atomically(output, "".join(json.dumps(row) + "\n" for row in rows))  # annotation reads it next
    log.info(f"{len(rows)} prompts x {k} samples -> {output}")


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
