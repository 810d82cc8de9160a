"""The verifiable-instruction task of the real-model pipeline: every constraint kind is read back from the prompt
it was written into and checked against answers that do and do not satisfy it; the splits share no topic and no
prompt; the checker is a rule-based reward for annotation; the pipeline's paired bootstrap."""

import json
import random
import statistics

import pytest

from rao_tune.real.instructions import (
    CONSTRAINTS,
    TOPICS,
    constraint_results,
    instruction_prompts,
    instruction_reward,
    make_prompt,
    parse_constraints,
    split_topics,
)
from rao_tune.real.pipeline import paired_bootstrap, score

# For each kind: parameters, an answer that satisfies the constraint and one that does not.
EXAMPLES = {
    "word_count": ({"low": 3, "high": 5}, "one two three four", "one two"),
    "bullets": ({"n": 2}, "Intro\n- a\n- b", "- a\n- b\n- c"),
    "numbered": ({"n": 3}, "1. a\n2. b\n3) c", "1. a\n2. b"),
    "include": ({"word": "blue"}, "The sky is Blue.", "The sky is bluest."),
    "exclude": ({"word": "blue"}, "The sky is bluest.", "A blue sky."),
    "lowercase": ({}, "all lowercase here.", "Not lowercase."),
    "ends_with": ({"phrase": "That is all."}, "Done. That is all.", "That is all. Done."),
    "starts_with": ({"word": "Today"}, "today, we rest.", "We rest today."),
    "no_commas": ({}, "No commas here.", "One, two."),
    "json": ({"keys": '"mood" and "title"'}, '```json\n{"title": "x", "mood": "y"}\n```', '{"title": "x"}'),
    "sentences": ({"n": 2}, "It rains. We stay in!", "It rains. We stay in. The end."),
    "paragraphs": ({"n": 2}, "First part.\n\nSecond part.", "Only one part."),
}


def test_every_kind_has_examples():
    assert set(EXAMPLES) == set(CONSTRAINTS)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_constraint_is_read_back_and_checked(kind):
    params, good, bad = EXAMPLES[kind]
    prompt = f"Describe tea. {CONSTRAINTS[kind].sentence(params)}"
    (constraint, parsed), = parse_constraints(prompt)
    assert constraint.kind == kind and {k: str(v) for k, v in params.items()} == parsed
    assert constraint_results(prompt, good) == [True]
    assert constraint_results(prompt, bad) == [False]


def test_reward_is_the_fraction_of_constraints_met():
    prompt = ("Describe tea. Do not use any commas. Use exactly 2 bullet points starting with '- '. "
              "Use the word 'green'.")
    assert [c.kind for c, _ in parse_constraints(prompt)] == ["no_commas", "bullets", "include"]
    assert instruction_reward(prompt, "- hot\n- green") == 1.0
    assert instruction_reward(prompt, "- hot, green\n- cold") == pytest.approx(2 / 3)
    assert instruction_reward(prompt, "hot, black") == 0.0
    assert instruction_reward([{"role": "user", "content": prompt}], "- hot\n- green") == 1.0  # a chat prompt
    with pytest.raises(ValueError, match="no verifiable constraint"):
        instruction_reward("Describe tea.", "hot")


def test_generated_prompts_parse_back_to_what_was_drawn():
    rng = random.Random(0)
    for _ in range(300):
        prompt = make_prompt(rng, rng.choice(TOPICS))
        kinds = [c.kind for c, _ in parse_constraints(prompt)]
        assert 1 <= len(kinds) <= 3 and len(set(kinds)) == len(kinds), prompt
        # The prompt is its request followed by exactly the parsed constraints' sentences.
        sentences = " ".join(c.sentence(p) for c, p in parse_constraints(prompt))
        assert prompt.endswith(sentences), prompt


def test_splits_are_disjoint_by_topic_and_prompt():
    prompts = instruction_prompts({"train": 200, "validation": 50, "test": 100}, seed=3)
    topics = split_topics(seed=3)
    assert not (set(topics["train"]) & set(topics["validation"])) and not (set(topics["train"]) & set(topics["test"]))
    assert not set(topics["validation"]) & set(topics["test"])
    for split, split_prompts in prompts.items():
        assert len(split_prompts) == len(set(split_prompts))
        others = [t for s, ts in topics.items() if s != split for t in ts]
        assert all(any(t in p for t in topics[split]) for p in split_prompts)
        assert not any(f" {t}." in p or f" {t} " in p for p in split_prompts for t in others)
    all_prompts = [p for ps in prompts.values() for p in ps]
    assert len(all_prompts) == len(set(all_prompts))
    assert instruction_prompts({"train": 20}, seed=3)["train"] == prompts["train"][:20]  # a seed fixes the draw


def test_the_checker_annotates_through_the_recipe(tmp_path, monkeypatch):
    from recipe_runner import load_recipe, run_recipe_in_process

    from conftest import REPO_ROOT

    prompt = "Describe tea. Do not use any commas."
    (tmp_path / "samples.jsonl").write_text(json.dumps({"prompt": prompt, "responses": ["hot tea", "hot, tea"]}) + "\n")
    run_recipe_in_process(monkeypatch, load_recipe("annotate_rewards"), REPO_ROOT / "configs" / "smollm2_135m_checker.yaml",
                          f"data_dir={tmp_path}", f"output_dir={tmp_path / 'out'}")
    row = json.loads((tmp_path / "out" / "checked.jsonl").read_text())
    assert row["rewards"] == [1.0, 0.0]


def test_score_and_paired_bootstrap():
    prompts = ["Describe tea. Do not use any commas.", "Describe tea. Write only in lowercase letters."]
    assert score(prompts, ["a, b", "abc"]) == {"reward": [0.0, 1.0], "all_met": [0.0, 1.0]}
    start = [0.0] * 50 + [1.0] * 50
    better = [1.0] * 80 + [0.0] * 20  # differences: +1 x 50, 0 x 30, -1 x 20: mean +0.3
    result = paired_bootstrap(start, better, seed=0)
    assert result["mean"] == pytest.approx(statistics.fmean(b - s for s, b in zip(start, better)))
    # The 95% interval of a mean of 100 differences with sd ~0.78: about +-1.96 * 0.078.
    assert result["low"] == pytest.approx(0.3 - 0.153, abs=0.04) and result["high"] == pytest.approx(0.3 + 0.153, abs=0.04)
    assert paired_bootstrap(start, start)["low"] == paired_bootstrap(start, start)["high"] == 0.0


@pytest.mark.slow
def test_pipeline_runs_end_to_end_on_smollm2_and_refuses_other_settings(tmp_path, smollm2_dir):
    """The real-model pipeline at its smallest (oracle annotations only: no reward model): every stage runs, the report compares the aligned model with the
    start model on the test prompts, a re-run reuses every stage, and other settings in the same folder are refused."""
    from omegaconf import OmegaConf

    from conftest import REPO_ROOT
    from rao_tune.real.pipeline import run

    cfg = OmegaConf.load(REPO_ROOT / "configs" / "real" / "smollm2_pipeline.yaml")
    cfg.out, cfg.model_dir, cfg.annotations = str(tmp_path / "run"), str(smollm2_dir), ["checker"]
    cfg.scale.update(train_prompts=8, validation_prompts=2, test_prompts=2, samples_per_prompt=2, max_new_tokens=16,
                     sample_batch_size=8, align_batch_size=2)
    cfg.methods = {"RAO": {**cfg.methods.RAO, "grid": {"optimizer.lr": [5e-4], "epochs": [1]}}}
    report = run(cfg, log=lambda message: None)
    assert list(report["methods"]) == ["RAO (checker)"]
    row = report["methods"]["RAO (checker)"]
    assert row["setting"] == {"optimizer.lr": 5e-4, "epochs": 1} and "_epochs-1_" in row["chosen"]
    assert row["vs_start_reward"]["mean"] == pytest.approx(row["test_reward"] - report["start"]["test_reward"])
    assert "| RAO (checker) |" in (tmp_path / "run" / "report.md").read_text()
    seen = []
    run(cfg, log=seen.append)  # everything reused
    assert seen and all("reused" in line for line in seen)
    cfg.scale.train_prompts = 9
    with pytest.raises(ValueError, match="other scale"):
        run(cfg, log=lambda message: None)
