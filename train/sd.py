"""Train a Stable Diffusion / SDXL / SD3.5 / FLUX.1 LoRA with any reflora_diffusion.core method (the model
family is read from the base model's model_index.json).

    accelerate launch train/sd.py --pretrained_model_name_or_path tiny \\
        --instance_data_dir ../shared/data/dreambooth/dog --instance_prompt "a photo of sks dog" \\
        --method reflora --rank 8 --max_train_steps 400 --output_dir runs/dog-reflora

Also runs as `python train/sd.py ...`; every flag can come from `--config job.yaml` (see docs/sd.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reflora_diffusion.sd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
