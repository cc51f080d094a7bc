"""Fine-tune a sequence classifier with LoRA + a core method on one GLUE task.

    python train/glue.py --task_name rte --model_name_or_path microsoft/deberta-v3-base \
        --data_dir ../shared/data/glue --method reflora --output_dir runs/rte --preset paper
    accelerate launch train/glue.py ...          # same flags; plus any transformers TrainingArguments flag

Writes <output_dir>/results.json (metrics per evaluation), events.jsonl, status.json, config.json and the adapter.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from reflora_diffusion.llm.glue import parse_args, run  # noqa: E402
from reflora_diffusion.llm.trainer import run_command  # noqa: E402


def main(argv=None):
    run_command(lambda: run(*parse_args(argv)))


if __name__ == "__main__":
    main()
