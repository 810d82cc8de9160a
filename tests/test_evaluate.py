"""The lm-eval wrapper against log-probs computed directly from the model, and recipes/evaluate.py on local tasks."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torchtune.data import Message

from torchtune.models.llama3 import llama3
from torchtune.training import FullModelHFCheckpointer

from rao_tune.data import tokenize_conversation
from rao_tune.eval.lm_eval_model import TorchtuneLM

from conftest import REPO_ROOT
from recipe_runner import load_recipe, run_recipe_in_process

CONFIG = REPO_ROOT / "configs" / "tiny_eval.yaml"


@pytest.fixture(scope="module")
def model(tiny_assets):
    torch.manual_seed(0)
    return llama3(**tiny_assets["model_kwargs"]).eval()


def request(*args):
    return SimpleNamespace(args=args)


def direct_logp(model, tokens, start):
    """log p(tokens[start:] | tokens[:start]) and whether each is the argmax, from one plain forward pass."""
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([tokens]))[0].double(), dim=-1)
    picked = [logps[i - 1, tokens[i]].item() for i in range(start, len(tokens))]
    greedy = all(logps[i - 1].argmax().item() == tokens[i] for i in range(start, len(tokens)))
    return sum(picked), greedy


def test_loglikelihood_equals_direct_log_probs(model, tokenizer):
    lm = TorchtuneLM(model, tokenizer, device=torch.device("cpu"), dtype=torch.float32, batch_size=2)
    pairs = [("count to 3:", " 1 2 3"), ("reverse: cat dog", " dog cat"), ("repeat the word sun", " sun sun sun sun")]
    got = lm.loglikelihood([request(c, x) for c, x in pairs], disable_tqdm=True)
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        context_tokens = tokenizer.encode(context, add_bos=True, add_eos=False)
        whole = tokenizer.encode(context + continuation, add_bos=True, add_eos=False)
        assert whole[: len(context_tokens)] == context_tokens
        expected, expected_greedy = direct_logp(model, whole, len(context_tokens))
        assert logp == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_chat_format_scores_the_answer_as_the_assistant_turn(model, tokenizer):
    lm = TorchtuneLM(model, tokenizer, device=torch.device("cpu"), dtype=torch.float32, chat_format=True)
    (logp, _), = lm.loglikelihood([request("count to 3", " 1 2 3")], disable_tqdm=True)
    prompt, _ = tokenize_conversation(
        tokenizer, [Message(role="user", content="count to 3", masked=True), Message(role="assistant", content="")],
        add_end_tokens=False,
    )
    answer = tokenizer.encode("1 2 3", add_bos=False, add_eos=False)
    assert logp == pytest.approx(direct_logp(model, prompt + answer, len(prompt))[0], abs=1e-4)


def test_rolling_loglikelihood_covers_every_token_once(model, tokenizer):
    text = "apple banana cat dog egg fish grape hat ink jam " * 12
    tokens = tokenizer.encode(text, add_bos=False, add_eos=False)
    for max_seq_len in (256, 40):  # one window, then several disjoint ones
        lm = TorchtuneLM(model, tokenizer, device=torch.device("cpu"), dtype=torch.float32, max_seq_len=max_seq_len)
        (got,) = lm.loglikelihood_rolling([request(text)], disable_tqdm=True)
        if max_seq_len == 256:
            assert got == pytest.approx(direct_logp(model, [tokenizer.bos_id] + tokens, 1)[0], abs=1e-3)
        else:
            assert got < 0 and math.isfinite(got)
    assert len(tokens) > 40


def test_generate_until_is_greedy_and_stops_at_the_stop_string(model, tokenizer):
    lm = TorchtuneLM(model, tokenizer, device=torch.device("cpu"), dtype=torch.float32, batch_size=2)
    contexts = ["count to 5:", "reverse: cat dog egg"]
    outputs = lm.generate_until([request(c, {"until": ["\n"], "max_gen_toks": 12}) for c in contexts], disable_tqdm=True)
    for context, output in zip(contexts, outputs):
        tokens = tokenizer.encode(context, add_bos=True, add_eos=False)
        generated = []
        with torch.no_grad():
            for _ in range(12):
                next_token = int(model(torch.tensor([tokens + generated]))[0, -1].argmax())
                if next_token in tokenizer.stop_tokens:
                    break
                generated.append(next_token)
        assert output == tokenizer.decode(generated).split("\n")[0]


def test_evaluate_two_checkpoints_on_local_tasks(monkeypatch, tmp_path, tiny_assets, tokenizer):
    # A second checkpoint: the tiny SFT model, so the two rows differ.
    run_recipe_in_process(monkeypatch, load_recipe("sft_distributed"), REPO_ROOT / "configs" / "tiny_sft.yaml",
                          f"assets_dir={tiny_assets['out_dir']}", f"output_dir={tmp_path / 'sft'}", "epochs=1")
    checkpoints = f"[{{name: base, checkpoint_dir: {tiny_assets['checkpoint_dir']}}}, {{name: sft, checkpoint_dir: {tmp_path / 'sft' / 'epoch_0'}}}]"
    run_recipe_in_process(monkeypatch, load_recipe("evaluate"), CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                          f"output_dir={tmp_path / 'eval'}", f"checkpoints={checkpoints}")
    table = (tmp_path / "eval" / "results.md").read_text().splitlines()
    assert table[0] == "| checkpoint | tiny_choice | tiny_answer | average |"
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in table[2:]}
    assert set(rows) == {"base", "sft"}

    questions = [json.loads(line) for line in (tiny_assets["eval_tasks_dir"] / "tiny_questions.jsonl").read_text().splitlines()]
    cfg = OmegaConf.load(CONFIG)
    for name, checkpoint_dir in (("base", tiny_assets["checkpoint_dir"]), ("sft", tmp_path / "sft" / "epoch_0")):
        (results_file,) = (tmp_path / "eval" / name).glob("results_*.json")  # lm-eval's layout for model <name>
        assert not list((tmp_path / "eval" / name).glob("samples_*"))  # log_samples: False as shipped
        results = json.loads(results_file.read_text())["results"]
        accuracy = results["tiny_choice"]["acc,none"]
        assert rows[name][0] == f"{100 * accuracy:.1f}"
        assert rows[name][1] == f"{100 * results['tiny_answer']['exact_match,none']:.1f}"
        # The multiple-choice accuracy, recomputed directly: the choice with the highest log-prob as the answer.
        model = llama3(**{k: v for k, v in cfg.model.items() if k != "_component_"})
        files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
        model.load_state_dict(FullModelHFCheckpointer(str(checkpoint_dir), files, "LLAMA3", str(tmp_path / "x"))
                              .load_checkpoint()["model"])
        model.eval()
        correct = 0
        for question in questions:
            prompt, _ = tokenize_conversation(tokenizer, [Message(role="user", content=question["question"], masked=True),
                                                          Message(role="assistant", content="")], add_end_tokens=False)
            scores = [direct_logp(model, prompt + tokenizer.encode(c, add_bos=False, add_eos=False), len(prompt))[0]
                      for c in question["choices"]]
            correct += max(range(3), key=scores.__getitem__) == question["answer"]
        assert accuracy == pytest.approx(correct / len(questions))
    assert re.fullmatch(r"\d+\.\d", rows["base"][2])


def test_log_samples_writes_lm_evals_results_and_samples(monkeypatch, tmp_path, tiny_assets):
    """log_samples=True: lm-eval's tracker writes <output_dir>/<name>/results_<date>.json and, per task, a
    samples_<task>_<date>.jsonl with one row per document (its doc, responses, filtered responses, metrics)."""
    run_recipe_in_process(monkeypatch, load_recipe("evaluate"), CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                          f"output_dir={tmp_path}", "log_samples=True")
    assert (tmp_path / "results.md").exists()
    (results_file,) = (tmp_path / "base").glob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["model_name"] == "base"  # the tracker's own fields, beside simple_evaluate's results
    assert results["config"]["model_args"]["checkpoint_dir"] == str(tiny_assets["checkpoint_dir"])
    assert "samples" not in results and set(results["task_hashes"]) == {"tiny_choice", "tiny_answer"}

    date = results_file.stem.removeprefix("results_")
    assert sorted(path.name for path in (tmp_path / "base").glob("samples_*")) == [
        f"samples_tiny_answer_{date}.jsonl", f"samples_tiny_choice_{date}.jsonl"]
    questions_file = tiny_assets["eval_tasks_dir"] / "tiny_questions.jsonl"
    questions = [json.loads(line) for line in questions_file.read_text().splitlines()]
    for task, metric in (("tiny_choice", "acc"), ("tiny_answer", "exact_match")):
        samples_file = tmp_path / "base" / f"samples_{task}_{date}.jsonl"
        rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
        assert sorted(row["doc_id"] for row in rows) == list(range(len(questions)))
        for row in rows:
            assert row["doc"] == questions[row["doc_id"]]
            # One request per choice (a log-prob and an is-greedy flag each), or one generation.
            expected_requests = len(row["doc"]["choices"]) if task == "tiny_choice" else 1
            assert len(row["resps"]) == len(row["filtered_resps"]) == expected_requests
        accuracy = sum(row[metric] for row in rows) / len(rows)
        assert accuracy == pytest.approx(results["results"][task][f"{metric},none"])
