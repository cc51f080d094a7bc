"""Commonsense reasoning (LLM-Adapters format): prompts, label masking, answer extraction, accuracy, data errors,
partial results and resume. Uses the real SmolLM2 tokenizer and real test files; models here are tiny and random."""

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reflora_diffusion.llm import commonsense as cs  # noqa: E402
from reflora_diffusion.llm.answers import DATASETS, accuracy, extract_answer  # noqa: E402
from reflora_diffusion.llm.models import load_tokenizer, smollm2_gguf_path  # noqa: E402
from reflora_diffusion.llm.prompts import eval_prompt, tokenize_example, train_prompt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data", "commonsense")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "commonsense")
IN_SHARED = ["boolq", "piqa", "social_i_qa", "ARC-Easy", "ARC-Challenge", "openbookqa"]
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data/commonsense not present")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_gguf_path())


def test_templates_are_llm_adapters_text():
    # finetune.py's template ends where the response starts; the evaluation one differs only in whitespace.
    assert train_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.  \n\n                ### Instruction:\n                Q?\n                \n"
        "                ### Response:\n                ")
    assert eval_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request. \n\n                ### Instruction:\n                Q?\n\n"
        "                ### Response:\n                ")
    assert "### Input:\n                ctx\n" in eval_prompt("Q?", "ctx")
    assert "paired with an input" in train_prompt("Q?", "ctx") and "paired" not in train_prompt("Q?", "")


def test_labels_are_exactly_the_tokenized_response(tokenizer):
    ex = {"instruction": "Please answer the following question with true or false, question: is water wet?"
                         "\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true",
          "answer": "true"}
    feat = tokenize_example(tokenizer, ex, max_length=256)
    prompt_ids = tokenizer(train_prompt(ex["instruction"]))["input_ids"]
    response_ids = tokenizer(ex["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(prompt_ids)
    assert feat["input_ids"] == prompt_ids + response_ids
    assert feat["labels"] == [-100] * n + response_ids
    assert tokenizer.decode([t for t in feat["labels"] if t != -100]) == ex["output"] + tokenizer.eos_token
    assert feat["attention_mask"] == [1] * len(feat["input_ids"]) and not feat["truncated"]
    # train_on_inputs: LLM-Adapters' default, every token is a target
    assert tokenize_example(tokenizer, ex, 256, train_on_inputs=True)["labels"] == feat["input_ids"]


def test_long_prompt_is_cut_from_the_left_response_kept(tokenizer):
    ex = {"instruction": "word " * 300, "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
    feat = tokenize_example(tokenizer, ex, max_length=64)
    response_ids = tokenizer(ex["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(feat["input_ids"]) == 64 and feat["truncated"]
    assert feat["input_ids"][-len(response_ids):] == response_ids
    assert feat["labels"] == [-100] * (64 - len(response_ids)) + response_ids
    with pytest.raises(ValueError, match="cutoff_len"):
        tokenize_example(tokenizer, ex, max_length=len(response_ids))


def test_loss_counts_response_tokens_only(tokenizer):
    """The model's loss with these labels equals cross-entropy over the response tokens alone."""
    from transformers import DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    exs = [{"instruction": "Pick one.\n\nAnswer format: solution1/solution2", "input": "",
            "output": "the correct answer is solution2", "answer": "solution2"},
           {"instruction": "Pick a longer one, please, from the list of answers below.", "input": "some context",
            "output": "the correct answer is answer1", "answer": "answer1"}]
    tokenizer.padding_side = "right"
    features = [{k: v for k, v in tokenize_example(tokenizer, e).items() if k != "truncated"} for e in exs]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True)(features)
    loss = model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets, preds = [], []
    for b, e in enumerate(exs):
        response = tokenizer(e["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n_prompt = len(tokenizer(train_prompt(e["instruction"], e["input"]))["input_ids"])
        for j, tok in enumerate(response):  # token at position p is predicted by the logits at p - 1
            preds.append(logits[b, n_prompt + j - 1])
            targets.append(tok)
    manual = torch.nn.functional.cross_entropy(torch.stack(preds), torch.tensor(targets))
    assert torch.allclose(loss, manual, atol=1e-5)
    assert (batch["labels"] != -100).sum().item() == len(targets)


@needs_shared
@pytest.mark.parametrize("dataset", IN_SHARED)
def test_extraction_recovers_gold_answers_on_real_files(dataset):
    records = cs.load_records(cs.find_test_file(SHARED, dataset), max_samples=200)
    assert {extract_answer(dataset, r["output"]) for r in records} <= set(DATASETS[dataset])
    assert all(extract_answer(dataset, r["output"]) == r["answer"] for r in records)


@pytest.mark.parametrize("dataset", ["hellaswag", "winogrande"])
def test_extraction_on_fixtures_in_llm_adapters_format(dataset):
    records = cs.load_records(cs.find_test_file(FIXTURES, dataset))
    assert all(extract_answer(dataset, r["output"]) == r["answer"] for r in records)
    assert all(f"Answer format: {'/'.join(DATASETS[dataset][:4])}" in r["instruction"] for r in records)


@pytest.mark.parametrize("dataset,text,expected", [
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "The correct answer is False", ""),           # case-sensitive, as LLM-Adapters
    ("boolq", "it is true, not false", "true"),              # first match wins
    ("piqa", "solution2 is better than solution1", "solution2"),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("ARC-Challenge", "answer5", "answer5"),
    ("ARC-Easy", "the correct answer is answer4\n\nanswer1", "answer4"),
    ("openbookqa", "the correct answer is Answer2", ""),
    ("hellaswag", "the correct answer is ending3", "ending3"),
    ("hellaswag", "the correct answer is answer3", ""),      # another dataset's word does not count
    ("winogrande", "option2", "option2"),
    ("winogrande", "", ""),                                   # empty prediction
    ("piqa", None, ""),
])
def test_extract_answer(dataset, text, expected):
    assert extract_answer(dataset, text) == expected


def test_accuracy_counts_unparsed_as_wrong():
    m = accuracy(["true", "", "false", "false"], ["true", "false", "true", "false"])
    assert m == {"accuracy": 0.5, "correct": 2, "total": 4, "unparsed": 1}
    assert accuracy([], [])["accuracy"] == 0.0
    with pytest.raises(ValueError):
        accuracy(["true"], [])
    assert cs.average_accuracy({"a": {"accuracy": 0.5, "complete": True}, "b": {"accuracy": 1.0, "complete": True},
                                "c": {"accuracy": 0.0, "complete": False}}) == 0.75


def test_unknown_dataset_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'arc-easy'"):
        extract_answer("arc-easy", "answer1")
    with pytest.raises(ValueError, match="unknown dataset"):
        cs.resolve_datasets("boolq,siqa", FIXTURES)
    with pytest.raises(FileNotFoundError, match=r"no test file for boolq.*--data_dir"):
        cs.find_test_file(str(tmp_path), "boolq")
    with pytest.raises(FileNotFoundError, match="no test set found"):
        cs.resolve_datasets("all", str(tmp_path))
    assert set(cs.resolve_datasets("all", FIXTURES)) == {"hellaswag", "winogrande"}
    # LLM-Adapters' own layout: <repo>/dataset/<name>/test.json
    (tmp_path / "dataset" / "piqa").mkdir(parents=True)
    (tmp_path / "dataset" / "piqa" / "test.json").write_text(json.dumps(
        [{"instruction": "q", "input": "", "output": "the correct answer is solution1", "answer": "solution1"}]))
    assert cs.find_test_file(str(tmp_path), "piqa").endswith(os.path.join("dataset", "piqa", "test.json"))


def test_bad_data_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json not found"):
        cs.load_records(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "input": ""}]))
    with pytest.raises(ValueError, match="record 0 lacks output, answer"):
        cs.load_records(str(bad))
    bad.write_text("[]")
    with pytest.raises(ValueError, match="holds no records"):
        cs.load_records(str(bad))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"instruction": f"q{i}", "input": "", "output": "o", "answer": "true"})
                               for i in range(3)))
    assert [r["instruction"] for r in cs.load_records(str(jsonl), max_samples=2)] == ["q0", "q1"]


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cs_cli", os.path.join(ROOT, "train", "commonsense.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cases = [
        (["eval", "--model_name_or_path", "x", "--dataset", "boolq", "--data_dir", str(tmp_path),
          "--output_dir", str(tmp_path / "o")], "no test file for boolq"),
        (["eval", "--model_name_or_path", "x", "--dataset", "Boolq", "--data_dir", FIXTURES,
          "--output_dir", str(tmp_path / "o")], "unknown dataset 'Boolq'"),
        (["eval", "--model_name_or_path", str(tmp_path / "nomodel"), "--dataset", "winogrande", "--data_dir",
          FIXTURES, "--output_dir", str(tmp_path / "o")], "model folder"),
        (["eval", "--model_name_or_path", "x", "--dataset", "winogrande", "--adapter", str(tmp_path),
          "--output_dir", str(tmp_path / "o")], "has no adapter_config.json"),
        (["train", "--model_name_or_path", "x", "--train_file", str(tmp_path / "t.json"),
          "--output_dir", str(tmp_path / "o")], "t.json not found"),
        (["train", "--model_name_or_path", "x", "--train_file", "t.json", "--method", "relora",
          "--output_dir", str(tmp_path / "o")], "--method 'relora' is unknown"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert message in str(exc.value) and "\n" not in str(exc.value), (argv, exc.value)
    with pytest.raises(SystemExit, match="usage"):
        cli.main(["fit"])
    # a failed training run says so in its run folder
    status = json.loads((tmp_path / "o" / "status.json").read_text())
    assert status["state"] == "failed" and "t.json not found" in status["error"]


def _tiny_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_batched_left_padded_generation_matches_one_by_one(tokenizer):
    model = _tiny_lm(tokenizer)
    records = cs.load_records(cs.find_test_file(FIXTURES, "hellaswag"))
    prompts = [eval_prompt(r["instruction"]) for r in records]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # the batch really needs padding
    batched = cs.generate(model, tokenizer, prompts, max_new_tokens=6)
    single = [cs.generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single and tokenizer.padding_side == "left"


def test_partial_results_survive_a_crash_and_resume(tokenizer, tmp_path, monkeypatch):
    model = _tiny_lm(tokenizer)
    records = cs.load_records(cs.find_test_file(FIXTURES, "winogrande"))
    pred_path = str(tmp_path / "predictions" / "winogrande.jsonl")
    real_generate, calls = cs.generate, []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(cs, "generate", crash_on_second_batch)
    partial = []
    with pytest.raises(RuntimeError):
        cs.evaluate_dataset(model, tokenizer, records, "winogrande", pred_path, batch_size=2, max_new_tokens=4,
                            on_batch=partial.append)
    saved = [json.loads(line) for line in open(pred_path)]
    assert len(saved) == 2 and partial[-1]["total"] == 2 and partial[-1]["complete"] is False
    with open(pred_path, "a") as f:
        f.write('{"index": 2, "instr')  # a line cut by the crash is redone, not trusted
    calls.clear()
    metrics = cs.evaluate_dataset(model, tokenizer, records, "winogrande", pred_path, batch_size=2,
                                  max_new_tokens=4, resume=True)
    assert calls == [1]  # only the missing example was generated
    rows = [json.loads(line) for line in open(pred_path)]
    assert sorted(r["index"] for r in rows) == [0, 1, 2]
    assert metrics["total"] == 3 and metrics["complete"] is True
    assert metrics["correct"] == sum(r["pred"] == r["answer"] for r in rows)
    assert metrics["unparsed"] == sum(r["pred"] == "" for r in rows)
    assert all(r["pred"] == extract_answer("winogrande", r["output_pred"]) for r in rows)


def test_cli_help_exits_0_and_lists_the_subcommands():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train", "commonsense.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: python train/commonsense.py {train,eval}" in result.stdout and "results.json" in result.stdout
