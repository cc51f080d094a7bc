"""`train/commonsense.py train|eval`: arguments, the training run and the evaluation run, each writing a run folder.

    <output_dir>/config.json, status.json, results.json      always
    <output_dir>/predictions/<dataset>.jsonl                  one line per evaluated example
    <output_dir>/events.jsonl, adapter_model.safetensors,
                 adapter_config.json, README.md               training (PeftModel.from_pretrained loads the folder)
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from transformers import TrainingArguments

from reflora_diffusion.logs import get_logger
from reflora_diffusion.rundir import RunLog, start_fresh, write_json_atomic

from .answers import DATASETS
from .commonsense import evaluate_datasets, load_records, resolve_datasets, tokenize_records
from .models import QuantArguments, checkpointing, load_causal_lm, prepare_quantized, quantization
from .trainer import MethodArguments, RefactorTrainer, add_lora, parse_hf_args, save_adapter

__all__ = ["TrainArguments", "CommonsenseTrainingArguments", "EvalArguments", "parse_train_args",
           "parse_eval_args", "run_train", "run_eval", "save_adapter"]

PAPER_TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"
SCORE_HELP = ("also score each option's text by its log-likelihood given the question (option_accuracy in "
              "results.json, beside the generated answer's accuracy)")


@dataclass
class TrainArguments(MethodArguments, QuantArguments):
    model_name_or_path: str = field(metadata={"help": "causal LM hub id or local folder (or folder of --gguf_file)"})
    train_file: str = field(metadata={"help": "LLM-Adapters JSON: commonsense_170k.json or a <task>/train.json; "
                                              "several files comma-separated"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name in the folder, or a path"})
    cutoff_len: int = field(default=256, metadata={"help": "max tokens per example (prompt is cut first)"})
    train_on_inputs: bool = field(default=False, metadata={"help": "also train on prompt tokens (LLM-Adapters' "
                                                                    "default); default: loss on the response only"})
    max_train_samples: int | None = None
    eval_holdout: int = field(default=64, metadata={"help": "hold out this many training records (a fixed random "
                                                            "pick, the same for every method and seed; at most "
                                                            "a tenth of the file) and log their LM loss on the "
                                                            "answer at every logging step (eval_loss); 0: none"})
    lora_r: int = 32
    lora_alpha: float = 64
    lora_dropout: float = 0.05
    target_modules: str = field(default=PAPER_TARGETS, metadata={"help": "comma-separated module names"})
    lora_top_layers: int | None = field(default=None, metadata={"help": "LoRA on the last N decoder layers only "
                                                                        "(backward stops below them: for CPU "
                                                                        "budgets); default: all layers"})
    refactor_warmup_steps: int = field(default=200, kw_only=True,
                                       metadata={"help": "plain LoRA steps before refactoring "
                                                         "(the authors' commonsense script: 200)"})
    dtype: str | None = field(default=None, metadata={"help": "load the base model in this dtype "
                                                               "(bfloat16, float16); default: the checkpoint's"})
    eval_datasets: str | None = field(default=None, metadata={"help": "after training, evaluate on these test sets "
                                                                      "(comma-separated or 'all')"})
    data_dir: str = field(default="../shared/data/commonsense", metadata={"help": "folder of <dataset>/test.json"})
    eval_max_samples: int | None = None
    eval_batch_size: int = 8
    max_new_tokens: int = 32
    num_beams: int = field(default=1, metadata={"help": "1 = greedy (LLM-Adapters' scripts use 4)"})
    score_options: bool = field(default=True, metadata={"help": SCORE_HELP})

    def __post_init__(self):
        super().__post_init__()
        if self.cutoff_len < 16:
            raise ValueError(f"--cutoff_len {self.cutoff_len} is too short for a prompt and an answer; use >= 16")


@dataclass
class CommonsenseTrainingArguments(TrainingArguments):
    # The paper's setting (r=32 table: batch 16, 2 epochs, lr 2e-4, 100 warm-up steps) as defaults.
    learning_rate: float = 2e-4
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 16
    warmup_steps: float = 100
    logging_steps: float = 10
    save_steps: float = 1000
    save_total_limit: int | None = 3
    # The held-out loss (--eval_holdout) at every logging step; eval_steps defaults to logging_steps.
    eval_strategy: str = "steps"


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "causal LM hub id or local folder (or folder of --gguf_file)"})
    dataset: str = field(metadata={"help": f"one of {', '.join(DATASETS)}; several comma-separated; or 'all' "
                                           "(those present in --data_dir)"})
    output_dir: str = field(metadata={"help": "run folder: results.json and predictions/<dataset>.jsonl"})
    data_dir: str = field(default="../shared/data/commonsense", metadata={"help": "folder of <dataset>/test.json "
                                                                                  "(or LLM-Adapters' dataset/<name>/)"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name in the folder, or a path"})
    adapter: str | None = field(default=None, metadata={"help": "peft adapter folder (from train)"})
    max_samples: int | None = field(default=None, metadata={"help": "first N examples of each test set"})
    batch_size: int = 8
    max_new_tokens: int = 32
    num_beams: int = field(default=1, metadata={"help": "1 = greedy (LLM-Adapters' scripts use 4)"})
    score_options: bool = field(default=True, metadata={"help": SCORE_HELP})
    dtype: str | None = None
    resume: bool = field(default=True, metadata={"help": "keep predictions of an earlier, interrupted run with "
                                                         "the same settings in the same --output_dir"})

    def __post_init__(self):
        if self.batch_size < 1 or (self.max_samples is not None and self.max_samples < 1):
            raise ValueError("--batch_size and --max_samples must be >= 1")
        if self.adapter and not os.path.isfile(os.path.join(self.adapter, "adapter_config.json")):
            raise FileNotFoundError(f"--adapter {self.adapter} has no adapter_config.json; pass the --output_dir "
                                    "of a train run (or any peft adapter folder)")


def _parse(dataclass_types, argv):
    return parse_hf_args(dataclass_types, list(sys.argv[2:] if argv is None else argv))[0]


def parse_train_args(argv=None):
    """(TrainArguments, CommonsenseTrainingArguments) from flags or a single .json/.yaml file."""
    return _parse((TrainArguments, CommonsenseTrainingArguments), argv)


def parse_eval_args(argv=None) -> EvalArguments:
    return _parse((EvalArguments,), argv)[0]


def _model_card(args: TrainArguments, train_args, stats: dict) -> str:
    base = args.model_name_or_path + (f" (GGUF: {args.gguf_file})" if args.gguf_file else "")
    return (f"# LoRA adapter: commonsense reasoning\n\nBase model: {base}\nMethod: {args.method}; "
            f"rank {args.lora_r}, alpha {args.lora_alpha}, targets {args.target_modules}\n"
            f"Data: {args.train_file}; steps: {stats.get('steps')}; final loss: {stats.get('train_loss')}\n\n"
            "Load it with peft:\n\n```python\nfrom peft import PeftModel\n"
            "model = PeftModel.from_pretrained(base_model, \"<this folder>\")\n```\n"
            "Prompt: the LLM-Adapters template (`reflora_diffusion.llm.prompts.eval_prompt`).\n")


def split_holdout(records: list, n: int, seed: int = 0) -> tuple[list, list]:
    """(training records, held-out records): min(n, len // 10) records picked at random with a fixed seed (the same
    for every method and training seed), the rest in their order."""
    import random

    k = min(max(n, 0), len(records) // 10)
    picked = set(random.Random(seed).sample(range(len(records)), k))
    return [r for i, r in enumerate(records) if i not in picked], [records[i] for i in sorted(picked)]


def _last_eval_loss(trainer) -> float | None:
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return losses[-1] if losses else None


def run_train(args: TrainArguments, train_args) -> dict:
    """LoRA fine-tuning with a core method, then (optionally) evaluation; returns results.json's content."""
    from transformers import DataCollatorForSeq2Seq, set_seed

    out = train_args.output_dir
    is_main = train_args.process_index == 0
    results_path = os.path.join(out, "results.json")
    if is_main:
        start_fresh(out, keep_events=bool(train_args.resume_from_checkpoint))
        write_json_atomic(os.path.join(out, "config.json"), {**asdict(args), **train_args.to_dict()})
    log = RunLog(out, train_args.max_steps, enabled=is_main)
    log.set_status(state="running")
    with log.reporting():
        # Check every input before the (slow) model load.
        files = [f.strip() for f in args.train_file.split(",") if f.strip()]
        records = [r for f in files for r in load_records(f)]
        records, held_out = split_holdout(records, args.eval_holdout)
        records = records[:args.max_train_samples] if args.max_train_samples else records
        if not held_out:
            from transformers.trainer_utils import IntervalStrategy

            train_args.eval_strategy = IntervalStrategy.NO  # nothing to evaluate during training
        test_files = resolve_datasets(args.eval_datasets, args.data_dir) if args.eval_datasets else {}
        set_seed(train_args.seed)
        model, tokenizer = load_causal_lm(args.model_name_or_path, args.gguf_file, args.dtype, quantization(args))
        model = prepare_quantized(model, args, checkpointing(train_args))
        features, truncated = tokenize_records(tokenizer, records, args.cutoff_len, args.train_on_inputs)
        # The held-out loss is the loss the run trains (the answer's tokens, or all with --train_on_inputs).
        held_out_features = tokenize_records(tokenizer, held_out, args.cutoff_len, args.train_on_inputs)[0]
        if truncated:
            get_logger(__name__).warning(f"{truncated} of {len(features)} prompts were cut to fit --cutoff_len "
                                         f"{args.cutoff_len}")
        layers = {}
        if args.lora_top_layers:
            n = model.config.num_hidden_layers
            layers = {"layers_to_transform": list(range(max(n - args.lora_top_layers, 0), n))}
        model = add_lora(model, [t.strip() for t in args.target_modules.split(",")], r=args.lora_r,
                         alpha=args.lora_alpha, dropout=args.lora_dropout, task_type="CAUSAL_LM",
                         **layers)
        model.config.use_cache = False
        tokenizer.padding_side = "right"  # training: right padding keeps the positions of real tokens at 0..n-1
        trainer = RefactorTrainer(
            model=model, args=train_args, train_dataset=features, eval_dataset=held_out_features or None,
            data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, padding=True),
            method=args.method, method_options=args.method_options(),
            run_log=log)
        started = time.time()
        train_out = trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
        seconds = time.time() - started
        steps = trainer.state.global_step
        if held_out_features and not any("eval_loss" in h and h.get("step") == steps
                                         for h in trainer.state.log_history):
            trainer.evaluate()  # the held-out loss of the final weights (every rank: a collective under FSDP)
        results = {"model": args.model_name_or_path, "gguf_file": args.gguf_file, "method": args.method,
                   "train": {"train_loss": train_out.training_loss, "steps": steps, "train_seconds": seconds,
                             "it_per_s": steps / seconds if seconds else None, "examples": len(features),
                             "truncated": truncated, "refactor": trainer.refactorer.stats(),
                             "held_out": len(held_out), "eval_loss": _last_eval_loss(trainer)},
                   "distributed": trainer.distributed()}
        save_adapter(model, trainer.refactorer, out)  # every rank (a gather under FSDP2); the main one writes
        if test_files and trainer.refactorer.shard_group() is not None:
            get_logger(__name__).warning("--eval_datasets is skipped under FSDP (sharded weights); evaluate the saved "
                                         "adapter with `train/commonsense.py eval --adapter <output_dir>`")
            test_files = {}
        if is_main:
            with open(os.path.join(out, "README.md"), "w") as f:
                f.write(_model_card(args, train_args, results["train"]))
            write_json_atomic(results_path, results)
            if test_files:
                log.set_status(step=steps, max_steps=trainer.state.max_steps)
                model = model.merge_and_unload()  # the adapter is saved; merged, generation runs at base speed
                model.config.use_cache = True
                evaluate_datasets(model, tokenizer, test_files, out, results,
                                  lambda r: write_json_atomic(results_path, r), args.eval_max_samples,
                                  args.eval_batch_size, args.max_new_tokens, args.num_beams,
                                  score_options=args.score_options)
            log.set_status(state="done", step=steps, max_steps=trainer.state.max_steps)
        return results


def _eval_config(args: EvalArguments) -> dict:
    return {k: v for k, v in asdict(args).items() if k not in ("output_dir", "resume", "dataset")}


def run_eval(args: EvalArguments) -> dict:
    """Evaluate a base model (+ adapter) on one or more test sets; results.json and predictions as it goes.

    Rerun into the same --output_dir with the same settings and an interrupted evaluation continues
    where it stopped (finished datasets and predictions are kept).
    """
    out = args.output_dir
    results_path = os.path.join(out, "results.json")
    test_files = resolve_datasets(args.dataset, args.data_dir)  # bad names / missing files: before loading
    config = _eval_config(args)
    previous = None
    if args.resume and os.path.isfile(results_path):
        try:
            with open(results_path) as f:
                previous = json.load(f)
        except ValueError:
            previous = None
    resume = previous is not None and previous.get("config") == config
    results = previous if resume else {"config": config, "datasets": {}}
    results["config"] = config
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "config.json"), asdict(args))
    log = RunLog(out, 0)
    log.set_status(state="running")
    with log.reporting():
        model, tokenizer = load_causal_lm(args.model_name_or_path, args.gguf_file, args.dtype)
        if args.adapter:
            from peft import PeftModel

            # merged: generation runs at the base model's speed
            model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
        evaluate_datasets(model, tokenizer, test_files, out, results, lambda r: write_json_atomic(results_path, r),
                          args.max_samples, args.batch_size, args.max_new_tokens, args.num_beams, resume=resume,
                          score_options=args.score_options)
        log.set_status(state="done")
        return results
