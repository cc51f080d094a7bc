"""The GPU check: fp16/bf16/attention/export behaviour on CUDA (skipped without one), and benchmarks/gpu.py
end to end on the CPU (its tiny mode)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from reflora_diffusion.core import Refactorer, find_lora_pairs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
def needs_cuda(fn):
    """Registered marker ``gpu`` plus a clean skip where no CUDA device is present."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))
METHODS = ["lora", "reflora", "reflora-s"]


def test_gpu_benchmark_tiny_runs_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--out", str(tmp_path),
                    "--name", "tiny", "--reps", "2"], check=True, env=env, cwd=REPO, timeout=120)
    assert time.perf_counter() - start < 60
    res = json.loads((tmp_path / "tiny.json").read_text())
    assert res["device"] == "cpu" and res["mode"] == "tiny" and (tmp_path / "tiny.png").stat().st_size > 0
    # the UNets and LLaMA, and the image transformers of FLUX.2, Z-Image and Qwen-Image through their families' call
    assert {r["case"]["model"] for r in res["cases"]} == {"sd15", "sdxl", "llama", "flux1", "flux2", "zimage",
                                                         "qwenimage"}
    assert any(r["case"]["base"] == "int8" for r in res["cases"])  # a quantized base (torchao runs on the CPU)
    assert any(r["case"].get("offload") for r in res["cases"])  # the block swap (--offload_blocks -1)
    assert {r["case"]["precision"] for r in res["cases"]} == {"fp16", "bf16", "fp32"}
    for row in res["cases"]:
        assert row["layers"] > 0 and row["lora"]["its_ratio"] == 1.0
        for m in METHODS:
            assert row[m]["its"] > 0 and 0.2 < row[m]["its_ratio"] < 5 and row[m]["finite_loss"]
            assert row[m]["persistent_bytes"] <= 2**20 and row[m]["peak_mb"] is None
        assert row["reflora"]["refactored"] == row["layers"] == row["reflora-s"]["refactored"]
    prof = res["cases"][0]["hook_profile"]  # the first case's optimizer step, operator by operator
    assert set(prof) == {"reflora", "reflora-s"} and all(len(v) > 0 for v in prof.values())
    assert all(r["synced_its"] > 0 for row in res["cases"] for r in (row[m] for m in METHODS))
    core = res["core"]["4"]
    assert core["layers"] == 128 and all(v > 0 for v in core["ms"].values())
    t = res["targets"]
    assert t["applies"] is False and set(t["pass"]) == {"reflora_its", "reflora-s_its", "memory"}
    assert t["pass"]["memory"] is True and res["memory_note"]


# ---------------------------------------------------------------------------- CUDA only
class MLP(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 4 * d), nn.Linear(4 * d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def train_mlp(method, precision, steps=30, lr=1e-3, seed=0):
    """LoRA r 8 on a small MLP, factors full-rank from step 0; returns (losses, LoRA parameters)."""
    torch.manual_seed(seed)
    model = get_peft_model(MLP(), LoraConfig(r=8, lora_alpha=8, target_modules=["fc1", "fc2", "fc3"])).cuda()
    with torch.no_grad():
        for p in find_lora_pairs(model):
            p.B.normal_(0, 0.02)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    Refactorer(model, method=method).attach(opt)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(256, 64, device="cuda", generator=g)
    y = torch.randn(256, 64, device="cuda", generator=g)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=half, enabled=precision != "fp32"):
            loss = (model(x).float() - y).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach().float().clone() for p in params]


@needs_cuda
@pytest.mark.parametrize("method", ["reflora", "reflora-s"])
def test_fp16_with_grad_scaler_stays_finite_where_lora_does(method):
    lora, _ = train_mlp("lora", "fp16")
    ours, params = train_mlp(method, "fp16")
    assert all(map(math.isfinite, lora))  # the premise
    assert all(map(math.isfinite, ours)) and all(torch.isfinite(p).all() for p in params)
    assert ours[-1] < ours[0]


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_matches_fp32(method):
    ref, _ = train_mlp(method, "fp32", steps=10)
    bf16, _ = train_mlp(method, "bf16", steps=10)
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(ref), rtol=3e-2, atol=1e-3)


@needs_cuda
def test_xformers_and_sdpa_give_the_same_loss():
    pytest.importorskip("xformers")
    import gpu
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**gpu.TINY["sd15"]["config"]).cuda().half()
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 4, 16, 16, device="cuda", generator=g, dtype=torch.half)
    text = torch.randn(2, 8, 32, device="cuda", generator=g, dtype=torch.half)
    t = torch.tensor([10, 500], device="cuda")
    with torch.no_grad():
        sdpa = unet(x, t, encoder_hidden_states=text).sample.float()
        unet.enable_xformers_memory_efficient_attention()
        xf = unet(x, t, encoder_hidden_states=text).sample.float()
    torch.testing.assert_close(xf.pow(2).mean(), sdpa.pow(2).mean(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(xf, sdpa, rtol=2e-2, atol=2e-2)


@needs_cuda
def test_exported_adapter_is_the_same_across_precisions(tmp_path):
    import gpu
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from reflora_diffusion.export import export_diffusers
    exported = {}
    for precision in ("fp32", "bf16", "fp16"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**gpu.TINY["sd15"]["config"]).cuda()
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=gpu.ATTN_TARGETS))
        with torch.no_grad():
            for p in find_lora_pairs(unet):
                p.B.normal_(0, 0.02)
        half = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
        ref = Refactorer(unet, method="reflora")
        ref.attach(opt)
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        g = torch.Generator("cuda").manual_seed(0)
        x, text = torch.randn(1, 4, 8, 8, device="cuda", generator=g), torch.randn(1, 8, 32, device="cuda", generator=g)
        for _ in range(3):
            with torch.autocast("cuda", dtype=half, enabled=precision != "fp32"):
                loss = unet(x, torch.tensor([500], device="cuda"), encoder_hidden_states=text).sample.float().pow(2).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        path = export_diffusers(tmp_path / precision, unet, refactorer=ref)
        exported[precision] = load_file(str(path if path.is_file() else path / "pytorch_lora_weights.safetensors"))
    assert exported["fp32"].keys() == exported["bf16"].keys() == exported["fp16"].keys()
    for precision in ("bf16", "fp16"):
        for k, v in exported["fp32"].items():
            torch.testing.assert_close(exported[precision][k].float(), v.float(), rtol=1e-2, atol=1e-3, msg=k)
