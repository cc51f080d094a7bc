"""Commonsense reasoning (LLM-Adapters format): LoRA fine-tuning with a core method, and evaluation.

    python train/commonsense.py train --model_name_or_path <id|folder> [--gguf_file F] \
        --train_file ../shared/data/commonsense/boolq/train.json --method reflora --output_dir runs/cs \
        [--max_steps 100] [--eval_datasets all --eval_max_samples 50]      # + any TrainingArguments flag
    python train/commonsense.py eval --model_name_or_path <id|folder> [--gguf_file F] [--adapter runs/cs] \
        --dataset boolq --data_dir ../shared/data/commonsense --max_samples 20 --output_dir runs/eval

Each run writes <output_dir>/results.json (accuracy per dataset and their average; training figures).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


USAGE = "usage: python train/commonsense.py {train,eval} [flags]   (--help after the subcommand lists the flags)"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    if not argv or argv[0] not in ("train", "eval"):
        sys.exit(USAGE)
    from reflora_diffusion.llm.commonsense_run import parse_eval_args, parse_train_args, run_eval, run_train
    from reflora_diffusion.llm.trainer import run_command

    command, rest = argv[0], argv[1:]
    run_command(lambda: run_train(*parse_train_args(rest)) if command == "train" else run_eval(parse_eval_args(rest)))


if __name__ == "__main__":
    main()
