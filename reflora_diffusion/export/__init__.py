"""Export LoRA adapters as safetensors that diffusers, A1111 and ComfyUI load.

    export_diffusers(folder, unet, text_encoder, refactorer=ref)   # pytorch_lora_weights.safetensors
    export_kohya(folder, unet, text_encoder, refactorer=ref)       # lora_unet_... keys with .alpha
    export_run("runs/dog", format="kohya", output="exports/dog")  # from a run or checkpoint folder

CLI: python -m reflora_diffusion.export <run or checkpoint> --format diffusers|kohya --output <folder>
"""

from .diffusers_format import export_diffusers, lora_config, write_diffusers
from .factors import WEIGHT_NAME, ExportError, Factor, LoraFactors, collect_factors, read_diffusers
from .kohya import export_kohya, kohya_name, sgm_unet_name, write_kohya
from .run import export_run, load_run, write_model_card

__all__ = ["WEIGHT_NAME", "ExportError", "Factor", "LoraFactors", "collect_factors", "export_diffusers",
           "export_kohya", "export_run", "kohya_name", "load_run", "lora_config", "read_diffusers", "sgm_unet_name",
           "write_diffusers", "write_kohya", "write_model_card"]
