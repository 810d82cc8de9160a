"""recipes/generate_answers.py on the tiny checkpoint (CPU, greedy): AlpacaEval's model_outputs.json and
MT-Bench's answer lines checked field by field, answers checked against generate_tokens + decode on prompts
rendered here independently, turn 2 checked to see turn 1, reruns checked to be identical, bad prompt files
checked to fail naming file, row and field, weights found in a checkpoint folder (single file or index + shards),
progress bars shown. The vllm backend needs a GPU: only its calls into vllm are checked here, on a stand-in."""

import json
import shutil
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torchtune.data import Message

from rao_tune.eval.generation import (
    GenerationBackend,
    SamplingSettings,
    TorchtuneBackend,
    VLLMBackend,
    generate_tokens,
    load_for_inference,
    resolve_backend,
    stop_token_ids,
    vllm_available,
)
from rao_tune.eval.judges import (
    TINY_ALPACA_EVAL,
    TINY_MT_BENCH,
    PromptFileError,
    answer_alpaca_eval,
    answer_mt_bench,
    build_tiny_eval_prompts,
    default_generator_name,
    read_alpaca_eval_prompts,
    read_mt_bench_questions,
)
from rao_tune.models.checkpoint_files import find_checkpoint_files

from conftest import REPO_ROOT
from recipe_runner import load_recipe, run_recipe_in_process

TINY_CONFIG = REPO_ROOT / "configs" / "tiny_generate.yaml"
SETTINGS = OmegaConf.load(TINY_CONFIG)
GENERATOR = SETTINGS.generator
ALPACA_NEW_TOKENS = SETTINGS.alpaca_eval.max_new_tokens
MT_BENCH_NEW_TOKENS = SETTINGS.mt_bench.max_new_tokens
ANSWER_FIELDS = {"question_id", "answer_id", "model_id", "choices", "tstamp"}


def run_generation(tmp_path_factory, tiny_assets, name, *overrides, config=TINY_CONFIG):
    out = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_recipe_in_process(monkeypatch, load_recipe("generate_answers"), config,
                              f"assets_dir={tiny_assets['out_dir']}", f"output_dir={out}", *overrides)
    return out


@pytest.fixture(scope="module")
def prompt_files(tiny_assets):
    return build_tiny_eval_prompts(tiny_assets["out_dir"])  # where the tiny config looks for them


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_assets, prompt_files):
    """The tiny config as shipped, run twice."""
    return [run_generation(tmp_path_factory, tiny_assets, f"run{i}") for i in range(2)]


def alpaca_outputs(run_dir):
    return json.loads((run_dir / "alpaca_eval" / GENERATOR / "model_outputs.json").read_text())


def mt_bench_answers(run_dir):
    lines = (run_dir / "mt_bench" / "model_answer" / f"{GENERATOR}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def inference(tiny_assets):
    cfg = OmegaConf.merge(SETTINGS, {"assets_dir": str(tiny_assets["out_dir"]), "output_dir": "/tmp/unused"})
    model, tokenizer, device, dtype = load_for_inference(cfg.model, cfg.checkpointer, cfg.tokenizer,
                                                         device="cpu", dtype="fp32")
    return model, tokenizer, device, dtype


def render_here(tokenizer, conversation):
    """The prompt as the chat format gives it: the messages and an open assistant header (no end tokens)."""
    messages = [Message(role=role, content=text, masked=True) for role, text in conversation]
    tokens, _ = tokenizer.tokenize_messages(messages + [Message(role="assistant", content="")], add_end_tokens=False)
    return tokens


def reference_answers(inference, prompts, max_new_tokens):
    model, tokenizer, device, dtype = inference
    new = generate_tokens(model, prompts, max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
                          stop_tokens=stop_token_ids(tokenizer), device=device, dtype=dtype,
                          batch_size=SETTINGS.batch_size)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]


def test_alpaca_eval_model_outputs_field_by_field(runs, inference):
    records = alpaca_outputs(runs[0])
    assert isinstance(records, list) and len(records) == len(TINY_ALPACA_EVAL)
    for record, prompt in zip(records, TINY_ALPACA_EVAL):  # input order
        assert set(record) == {"instruction", "output", "generator", "dataset"}
        assert all(isinstance(value, str) for value in record.values())
        assert record["instruction"] == prompt["instruction"]
        assert record["dataset"] == prompt["dataset"]
        assert record["generator"] == GENERATOR
    assert sorted(r["instruction"] for r in records) == sorted(p["instruction"] for p in TINY_ALPACA_EVAL)

    tokenizer = inference[1]
    rendered = [render_here(tokenizer, [("user", p["instruction"])]) for p in TINY_ALPACA_EVAL]
    assert all(tokens[-1] != tokenizer.eot_id for tokens in rendered)  # ends with the open assistant header
    expected = reference_answers(inference, rendered, ALPACA_NEW_TOKENS)
    assert [r["output"] for r in records] == expected
    assert any(expected)


def test_mt_bench_answers_field_by_field(runs, inference):
    records = mt_bench_answers(runs[0])
    assert [r["question_id"] for r in records] == [q["question_id"] for q in TINY_MT_BENCH]  # order, each once
    for record in records:
        assert set(record) == ANSWER_FIELDS
        assert isinstance(record["question_id"], int)
        assert isinstance(record["answer_id"], str) and len(record["answer_id"]) == 22
        assert record["model_id"] == GENERATOR
        assert isinstance(record["tstamp"], float)
        assert isinstance(record["choices"], list) and len(record["choices"]) == 1
        choice = record["choices"][0]
        assert set(choice) == {"index", "turns"} and choice["index"] == 0
        assert len(choice["turns"]) == 2 and all(isinstance(turn, str) for turn in choice["turns"])
    assert len({r["answer_id"] for r in records}) == len(records)

    # Turn 1: the first question alone; turn 2: first question, the model's own first answer, second question.
    tokenizer = inference[1]
    first = [render_here(tokenizer, [("user", q["turns"][0])]) for q in TINY_MT_BENCH]
    assert [r["choices"][0]["turns"][0] for r in records] == reference_answers(inference, first, MT_BENCH_NEW_TOKENS)
    second = [
        render_here(tokenizer, [("user", q["turns"][0]), ("assistant", r["choices"][0]["turns"][0]),
                                ("user", q["turns"][1])])
        for q, r in zip(TINY_MT_BENCH, records)
    ]
    assert [r["choices"][0]["turns"][1] for r in records] == reference_answers(inference, second, MT_BENCH_NEW_TOKENS)


def test_greedy_reruns_are_identical(runs):
    assert alpaca_outputs(runs[0]) == alpaca_outputs(runs[1])
    strip_time = lambda records: [{k: v for k, v in r.items() if k != "tstamp"} for r in records]  # noqa: E731
    assert strip_time(mt_bench_answers(runs[0])) == strip_time(mt_bench_answers(runs[1]))


class RecordingBackend(GenerationBackend):
    """Answers call c, prompt i with the tokens of ``"answer c.i"`` and keeps every prompt and label it saw."""

    name = "recording"

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.descs = tokenizer, [], []

    def generate(self, prompts, *, max_new_tokens, desc=None):
        self.calls.append([list(p) for p in prompts])
        self.descs.append(desc)
        call = len(self.calls) - 1
        return [self.tokenizer.encode(f"answer {call}.{i}", add_bos=False, add_eos=False) for i in range(len(prompts))]


def test_turn_two_prompt_holds_turn_one_answer(tokenizer, prompt_files):
    questions = read_mt_bench_questions(prompt_files["mt_bench_path"])
    backend = RecordingBackend(tokenizer)
    answers = answer_mt_bench(backend, tokenizer, questions, max_new_tokens=8)

    assert answers == [[f"answer 0.{i}", f"answer 1.{i}"] for i in range(len(questions))]
    assert len(backend.calls) == 2  # all first turns in one batch, then all second turns
    assert backend.descs == ["MT-Bench turn 1/2", "MT-Bench turn 2/2"]  # the progress bars' labels
    for i, question in enumerate(questions):
        assert backend.calls[0][i] == render_here(tokenizer, [("user", question.turns[0])])
        assert backend.calls[1][i] == render_here(
            tokenizer, [("user", question.turns[0]), ("assistant", f"answer 0.{i}"), ("user", question.turns[1])]
        )
        answer_tokens = tokenizer.encode(f"answer 0.{i}", add_bos=False, add_eos=False)
        prompt = backend.calls[1][i]
        assert any(prompt[k:k + len(answer_tokens)] == answer_tokens for k in range(len(prompt)))
        # The first answer is closed with end-of-turn before the second question, as in training data.
        assert tokenizer.eot_id in prompt[:-1]


def test_system_prompt_comes_first(tokenizer, prompt_files):
    prompts = read_alpaca_eval_prompts(prompt_files["alpaca_eval_path"])
    backend = RecordingBackend(tokenizer)
    answer_alpaca_eval(backend, tokenizer, prompts[:1], max_new_tokens=8, system_prompt="be brief")
    assert backend.calls[0][0] == render_here(tokenizer, [("system", "be brief"), ("user", prompts[0].instruction)])


def test_seeded_sampling_repeats(inference, prompt_files):
    model, tokenizer, device, dtype = inference
    prompts = read_alpaca_eval_prompts(prompt_files["alpaca_eval_path"])
    sampling = SamplingSettings(temperature=1.0, top_k=50, seed=3)
    answers = [answer_alpaca_eval(TorchtuneBackend(model, tokenizer, device=device, dtype=dtype, sampling=sampling),
                                  tokenizer, prompts, max_new_tokens=8) for _ in range(2)]
    assert answers[0] == answers[1]


def test_paper_config_runs_on_tiny_checkpoint(tmp_path_factory, tiny_assets, prompt_files):
    """configs/llama3_8b_generate.yaml as shipped but for what cannot exist here: the tiny model, tokenizer and
    checkpoint (in the RAO output's shard naming and folder), local prompt files, torchtune on CPU."""
    epoch_dir = tmp_path_factory.mktemp("rao") / "llama3_8b_rao" / "epoch_2"
    epoch_dir.mkdir(parents=True)
    shutil.copy(tiny_assets["checkpoint_dir"] / "config.json", epoch_dir / "config.json")
    shutil.copy(tiny_assets["checkpoint_dir"] / "model.safetensors", epoch_dir / "model-00001-of-00001.safetensors")
    sizes = [f"model.{key}={value}" for key, value in SETTINGS.model.items() if key != "_component_"]
    out = run_generation(
        tmp_path_factory, tiny_assets, "paper", f"checkpoint_dir={epoch_dir}", "model=torchtune.models.llama3.llama3",
        *sizes, "checkpointer.checkpoint_files.max_filename=00001", f"tokenizer.path={tiny_assets['tokenizer_path']}",
        f"tokenizer.special_tokens_path={tiny_assets['special_tokens_path']}",
        f"alpaca_eval.prompts={prompt_files['alpaca_eval_path']}", f"mt_bench.questions={prompt_files['mt_bench_path']}",
        "alpaca_eval.max_new_tokens=8", "mt_bench.max_new_tokens=8", "backend=torchtune", "device=cpu", "dtype=fp32",
        config=REPO_ROOT / "configs" / "llama3_8b_generate.yaml",
    )
    name = "llama3_8b_rao_epoch_2"  # generator: null names the model after its checkpoint folder
    records = json.loads((out / "alpaca_eval" / name / "model_outputs.json").read_text())
    assert [r["generator"] for r in records] == [name] * len(TINY_ALPACA_EVAL)
    answers = [json.loads(line) for line in (out / "mt_bench" / "model_answer" / f"{name}.jsonl").read_text().splitlines()]
    assert [a["model_id"] for a in answers] == [name] * len(TINY_MT_BENCH)


def write_sharded_copy(checkpoint_dir, folder):
    """The tiny checkpoint as an ``epoch_N`` folder of our recipes: two shards and the index json naming them."""
    folder.mkdir(parents=True)
    shutil.copy(checkpoint_dir / "config.json", folder / "config.json")
    weights = load_file(checkpoint_dir / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file_name, keys in shards.items():
        save_file({key: weights[key] for key in keys}, folder / file_name)
    weight_map = {key: file_name for file_name, keys in shards.items() for key in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_checkpoint_folder_without_files_named(tmp_path_factory, tiny_assets, prompt_files, runs, capsys):
    """checkpoint_dir=<an epoch_N folder> alone, as the tiny config's header suggests: the shards its index names
    are read (the same answers as from the single-file checkpoint of the shipped runs), with progress bars."""
    assert SETTINGS.checkpointer.checkpoint_files is None  # the shipped runs found assets/tiny/model's single file
    capsys.readouterr()
    epoch_dir = tmp_path_factory.mktemp("rao") / "tiny_rao" / "epoch_0"
    write_sharded_copy(tiny_assets["checkpoint_dir"], epoch_dir)
    out = run_generation(tmp_path_factory, tiny_assets, "sharded", f"checkpoint_dir={epoch_dir}", "generator=null")
    name = "tiny_rao_epoch_0"
    records = json.loads((out / "alpaca_eval" / name / "model_outputs.json").read_text())
    assert [r["output"] for r in records] == [r["output"] for r in alpaca_outputs(runs[0])]
    answers_file = out / "mt_bench" / "model_answer" / f"{name}.jsonl"
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [a["choices"] for a in answers] == [a["choices"] for a in mt_bench_answers(runs[0])]

    progress = capsys.readouterr().err  # tqdm's bars, one per benchmark (per turn for MT-Bench), at their end
    for desc, total in (("AlpacaEval", len(TINY_ALPACA_EVAL)), ("MT-Bench turn 1/2", len(TINY_MT_BENCH)),
                        ("MT-Bench turn 2/2", len(TINY_MT_BENCH))):
        assert f"{desc}: 100%" in progress and f"{total}/{total}" in progress


def test_checkpoint_files_found_in_a_folder(tmp_path):
    """An index names the shards (safetensors' before torch's), else the single file; nothing else is guessed."""
    def folder(name, *files, index=None):
        path = tmp_path / name
        path.mkdir()
        for file_name in files:
            (path / file_name).touch()
        if index:
            (path / index).write_text(json.dumps({"weight_map": {"a": "w-2.bin", "b": "w-1.bin", "c": "w-2.bin"}}))
        return path

    single = folder("single", "model.safetensors", "adapter_model.safetensors")
    assert find_checkpoint_files(single) == ["model.safetensors"]
    assert find_checkpoint_files(folder("bin", "pytorch_model.bin")) == ["pytorch_model.bin"]
    assert find_checkpoint_files(folder("torch_index", "model.safetensors", index="pytorch_model.bin.index.json")) \
        == ["w-1.bin", "w-2.bin"]
    both = folder("both", index="pytorch_model.bin.index.json")
    (both / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s-1.safetensors"}}))
    assert find_checkpoint_files(both) == ["s-1.safetensors"]


def test_checkpoint_folder_without_weights_is_named(monkeypatch, tmp_path, tiny_assets, prompt_files):
    empty = tmp_path / "epoch_0"
    empty.mkdir()
    (empty / "adapter_model.safetensors").touch()
    with pytest.raises(FileNotFoundError) as error:
        run_recipe_in_process(monkeypatch, load_recipe("generate_answers"), TINY_CONFIG,
                              f"assets_dir={tiny_assets['out_dir']}", f"output_dir={tmp_path / 'run'}",
                              f"checkpoint_dir={empty}", "backend=torchtune")
    message = str(error.value)
    assert message.startswith(f"{empty}: no HF weights found")
    assert all(name in message for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json",
                                            "model.safetensors,", "pytorch_model.bin", "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        find_checkpoint_files(tmp_path / "missing")


def test_one_benchmark_may_be_skipped(tmp_path_factory, tiny_assets, prompt_files):
    out = run_generation(tmp_path_factory, tiny_assets, "alpaca_only", "mt_bench=null", "alpaca_eval.max_new_tokens=4")
    assert (out / "alpaca_eval" / GENERATOR / "model_outputs.json").exists()
    assert not (out / "mt_bench").exists()


BAD_FILES = [
    ("alpaca", '[{"instruction": "hi"}, {"dataset": "koala"}]', "row 1, field 'instruction': missing"),
    ("alpaca", '[{"instruction": 3}]', "row 0, field 'instruction': expected a string"),
    ("alpaca", '{"instruction": "hi"}\n\n{"instruction": "  "}\n', "row 1 (line 3), field 'instruction': empty"),
    ("alpaca", '{"instruction": "hi"}\n{"instruction": \n', "row 1 (line 2): not valid JSON"),
    ("alpaca", '[{"instruction": "hi"}, ["hi"]]', "row 1: expected a JSON object"),
    ("alpaca", "\n", "no rows"),
    ("mt_bench", '{"question_id": 1, "category": "math", "turns": "what"}', "row 0 (line 1), field 'turns'"),
    ("mt_bench", '{"question_id": 1, "category": "math", "turns": ["a", ""]}', "field 'turns[1]'"),
    ("mt_bench", '{"category": "math", "turns": ["a", "b"]}', "row 0 (line 1), field 'question_id': missing"),
    ("mt_bench", '{"question_id": 1, "turns": ["a", "b"]}', "field 'category': missing"),
    ("mt_bench", '{"question_id": 1, "category": "m", "turns": ["a"]}\n{"question_id": 1, "category": "m", "turns": ["b"]}',
     "row 1 (line 2), field 'question_id': 1 repeats the one in row 0 (line 1)"),
]


@pytest.mark.parametrize("kind,text,message", BAD_FILES)
def test_bad_prompt_file_names_file_row_and_field(tmp_path, kind, text, message):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(text)
    reader = read_alpaca_eval_prompts if kind == "alpaca" else read_mt_bench_questions
    with pytest.raises(PromptFileError) as error:
        reader(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_recipe_checks_prompt_files_before_loading_the_model(monkeypatch, tmp_path, tiny_assets, prompt_files):
    bad = tmp_path / "questions.jsonl"
    bad.write_text('{"question_id": 81, "category": "writing", "turns": ["a", "b"]}\n{"question_id": 82}\n')
    recipe = load_recipe("generate_answers")
    monkeypatch.setattr(recipe, "build_backend", lambda *args: pytest.fail("the model loaded before the check"))
    with pytest.raises(PromptFileError, match=r"questions.jsonl, row 1 \(line 2\), field 'category': missing"):
        run_recipe_in_process(monkeypatch, recipe, TINY_CONFIG, f"assets_dir={tiny_assets['out_dir']}",
                              f"output_dir={tmp_path / 'run'}", f"mt_bench.questions={bad}")


def test_backend_choice():
    assert resolve_backend("torchtune", "cuda") == "torchtune"
    assert resolve_backend("auto", "cpu") == "torchtune"
    assert resolve_backend("auto", "cuda") == ("vllm" if vllm_available() else "torchtune")
    with pytest.raises(ValueError, match="GPUs only"):
        resolve_backend("vllm", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("hf", "cpu")


def test_vllm_backend_shows_vllms_progress_bar(monkeypatch, tokenizer):
    """vllm gets token ids and use_tqdm (its own progress bar); its new tokens come back cut at the stop token."""
    calls = []

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def generate(self, prompts, params, **kwargs):
            calls.append((prompts, params, kwargs))
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 6, tokenizer.eot_id, 7])]) for _ in prompts]

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=LLM, SamplingParams=dict))
    backend = VLLMBackend("/checkpoint", tokenizer, sampling=SamplingSettings())
    assert backend.generate([[1, 2], [3]], max_new_tokens=4, desc="AlpacaEval") == [[5, 6], [5, 6]]
    ((prompts, params, kwargs),) = calls
    assert prompts == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
    assert params["max_tokens"] == 4 and kwargs == {"use_tqdm": True}


@pytest.mark.skipif(vllm_available(), reason="vllm is installed")
def test_vllm_backend_without_vllm_says_how_to_install(tokenizer):
    with pytest.raises(ImportError, match=r"rao-tune\[vllm\]"):
        VLLMBackend("/nonexistent", tokenizer, sampling=SamplingSettings())


def test_sampling_settings_are_checked(inference):
    model, tokenizer, device, dtype = inference
    with pytest.raises(ValueError, match="top_p"):
        TorchtuneBackend(model, tokenizer, device=device, dtype=dtype, sampling=SamplingSettings(temperature=0.7, top_p=0.9))
    TorchtuneBackend(model, tokenizer, device=device, dtype=dtype, sampling=SamplingSettings(top_p=0.9))  # greedy: moot
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": 0}):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)


def test_prompt_too_long_for_the_model_is_refused(inference):
    model, tokenizer, device, dtype = inference
    backend = TorchtuneBackend(model, tokenizer, device=device, dtype=dtype, sampling=SamplingSettings())
    with pytest.raises(ValueError, match="max_seq_len is 256"):
        backend.generate([[tokenizer.bos_id] * 256], max_new_tokens=4)
    short, near_end = [tokenizer.bos_id] * 8, [tokenizer.bos_id] * 253
    outputs = backend.generate([short, near_end], max_new_tokens=8)  # the long one gets at most 3 new tokens
    assert len(outputs[1]) <= 3 and len(outputs[0]) <= 8


@pytest.mark.parametrize("folder,name", [
    ("/tmp/rao_tune/llama3_8b_rao/epoch_2", "llama3_8b_rao_epoch_2"),
    ("/tmp/rao_tune/llama3_8b_rao/epoch_2/", "llama3_8b_rao_epoch_2"),
    ("runs/my model", "my-model"),
    ("assets/tiny/model", "model"),
])
def test_default_generator_name(folder, name):
    assert default_generator_name(folder) == name
