"""GLUE fine-tuning with LoRA and a core method: tasks, data, presets, model and the run (entry: train/glue.py).

Data flow: GlueArguments + GlueTrainingArguments -> load_glue (TSV folder or hub) -> tokenize -> model + add_lora
-> RefactorTrainer (core attached) -> train -> evaluate -> results.json / events.jsonl / status.json.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from transformers import TrainerCallback, TrainingArguments

from reflora_diffusion.llm.metrics import MAIN_METRIC, glue_metrics, main_value
from reflora_diffusion.llm.models import QuantArguments, checkpointing, prepare_quantized, quantization
from reflora_diffusion.llm.trainer import MethodArguments, RefactorTrainer, add_lora, parse_hf_args, save_adapter
from reflora_diffusion.rundir import RunLog, start_fresh, write_json_atomic

csv.field_size_limit(sys.maxsize)  # MNLI parse-tree columns are long


# ---- tasks -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str                      # folder in the GLUE download (download_glue_data.py layout)
    text_columns: tuple              # TSV columns: (first, second or None)
    label_column: str | int          # TSV column name, or index for header-less CoLA
    labels: tuple | None             # label strings in id order (as in the hub's `glue`), None = regression
    eval_splits: tuple = ("validation",)
    hub_text_columns: tuple = ()     # the hub dataset's column names
    header: bool = True


TASKS = {
    # CoLA train/dev have no header: source, label, original label ("*" if unacceptable), sentence.
    "cola": GlueTask("cola", "CoLA", (3, None), 1, ("0", "1"), header=False, hub_text_columns=("sentence", None)),
    "sst2": GlueTask("sst2", "SST-2", ("sentence", None), "label", ("0", "1"), hub_text_columns=("sentence", None)),
    "mrpc": GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"),
                     hub_text_columns=("sentence1", "sentence2")),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None,
                     hub_text_columns=("sentence1", "sentence2")),
    "qqp": GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"),
                    hub_text_columns=("question1", "question2")),
    "mnli": GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
                     eval_splits=("validation_matched", "validation_mismatched"),
                     hub_text_columns=("premise", "hypothesis")),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"),
                     hub_text_columns=("question", "sentence")),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
                    hub_text_columns=("sentence1", "sentence2")),
}
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv",
               "validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"}

# Per-task presets for DeBERTaV3-base (--preset paper / adalora; flags given explicitly still win).
# Shared by both: the RefLoRA paper's setting (arXiv 2505.18877, Sec. 5.1 and Appendix D; the authors'
# NLU/debertaV3-base.sh): lr 1e-3, batch 32, AdamW with a linear schedule, r = 8, alpha = 8, RefLoRA warm-up
# 100 steps.
SHARED = dict(learning_rate=1e-3, per_device_train_batch_size=32, lr_scheduler_type="linear", lora_r=8, lora_alpha=8,
              refactor_warmup_steps=100)
# "paper": the RefLoRA paper's per-task rows (Appendix D, Table 6), LoRA on all linear modules of the encoder.
PAPER = {
    "mnli": dict(num_train_epochs=5, warmup_steps=1000, max_length=256, cls_dropout=0.15, weight_decay=0.0),
    "sst2": dict(num_train_epochs=2, warmup_steps=500, max_length=128, cls_dropout=0.0, weight_decay=0.01),
    "mrpc": dict(num_train_epochs=10, warmup_steps=50, max_length=128, cls_dropout=0.0, weight_decay=0.01),
    "cola": dict(num_train_epochs=5, warmup_steps=100, max_length=64, cls_dropout=0.15, weight_decay=0.0),
    "qnli": dict(num_train_epochs=5, warmup_steps=500, max_length=512, cls_dropout=0.1, weight_decay=0.01),
    "qqp": dict(num_train_epochs=5, warmup_steps=1000, max_length=320, cls_dropout=0.2, weight_decay=0.01),
    "rte": dict(num_train_epochs=10, warmup_steps=50, max_length=320, cls_dropout=0.2, weight_decay=0.01),
    "stsb": dict(num_train_epochs=10, warmup_steps=100, max_length=128, cls_dropout=0.1, weight_decay=0.1),
}
# "adalora": AdaLoRA's DeBERTaV3-base GLUE scripts (QingruZhang/AdaLoRA NLU/scripts/run_debertav3_<task>.sh):
# more epochs; lr warm-up steps (a float < 1 is a ratio), max length, classifier dropout and weight decay.
# Targets stay the default set.
ADALORA = {
    "cola": dict(num_train_epochs=5, warmup_steps=100, max_length=64, cls_dropout=0.15, weight_decay=0.0),
    "sst2": dict(num_train_epochs=24, warmup_steps=1000, max_length=128, cls_dropout=0.0, weight_decay=0.01),
    "mrpc": dict(num_train_epochs=30, warmup_steps=0.1, max_length=320, cls_dropout=0.0, weight_decay=0.01),
    "stsb": dict(num_train_epochs=25, warmup_steps=100, max_length=128, cls_dropout=0.2, weight_decay=0.1),
    "qqp": dict(num_train_epochs=5, warmup_steps=2000, max_length=320, cls_dropout=0.15, weight_decay=0.01),
    "mnli": dict(num_train_epochs=7, warmup_steps=1000, max_length=256, cls_dropout=0.15, weight_decay=0.0),
    "qnli": dict(num_train_epochs=5, warmup_steps=500, max_length=512, cls_dropout=0.1, weight_decay=0.01),
    "rte": dict(num_train_epochs=50, warmup_steps=200, max_length=320, cls_dropout=0.2, weight_decay=0.01),
}
PRESETS = {
    "paper": {task: {**SHARED, "target_modules": "paper", **row} for task, row in PAPER.items()},
    "adalora": {task: {**SHARED, **row} for task, row in ADALORA.items()},
}

# LoRA targets per model family (peft matches a name against a module's full name or a dotted suffix of it).
# The default set: query/key/value projections, attention output dense and FFN intermediate dense.
# --target_modules paper: all linear modules of the encoder, as in the paper, i.e. also the FFN output dense
# (<layer>.output.dense). The authors pass "output.dense", which matches both attention.output.dense and it.
TARGETS = {
    "deberta": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense"],
}
FFN_OUTPUT = "output.dense"


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]


# ---- data --------------------------------------------------------------------------------------------------

def _task_dir(task: GlueTask, data_dir: str) -> str:
    # Accept the GLUE root (with CoLA/, RTE/, ...) or the task's own folder.
    nested = os.path.join(data_dir, task.folder)
    return nested if os.path.isdir(nested) else data_dir


def read_glue_tsv(task: GlueTask, path: str) -> dict[str, list]:
    """Rows of one GLUE TSV as {"text_a", "text_b", "label"}; labels become ids (or floats for STS-B)."""
    # utf-8-sig drops MRPC's byte-order mark; QUOTE_NONE because quotes in GLUE text are not CSV quoting.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.header:
        if not rows:
            raise ValueError(f"{path} is empty; expected a header row and {task.name} examples")
        header, rows, first_line = rows[0], rows[1:], 2
        missing = [c for c in (*task.text_columns, task.label_column) if c is not None and c not in header]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing} (header: {header}); is it the {task.name} file?")
        cols = [header.index(c) if c is not None else None for c in (*task.text_columns, task.label_column)]
    else:
        first_line, cols = 1, [*task.text_columns, task.label_column]
    ia, ib, il = cols
    need = max(c for c in cols if c is not None)
    out = {"text_a": [], "text_b": [], "label": []}
    for i, row in enumerate(rows, start=first_line):
        if not row:
            continue
        if len(row) <= need:
            raise ValueError(f"{path}:{i}: {len(row)} tab-separated fields, expected at least {need + 1} for {task.name}")
        raw = row[il].strip()
        if task.labels is None:
            try:
                label = float(raw)
            except ValueError:
                label = math.nan
            if not 0.0 <= label <= 5.0:
                raise ValueError(f"{path}:{i}: label {raw!r} is not a score in [0, 5] for task {task.name}")
        elif raw in task.labels:
            label = task.labels.index(raw)
        else:
            raise ValueError(f"{path}:{i}: label {raw!r} is not one of {list(task.labels)} for task {task.name}")
        out["text_a"].append(row[ia])
        out["text_b"].append(row[ib] if ib is not None else None)
        out["label"].append(label)
    return out


def load_glue(task_name: str, data_dir: str | None = None, splits=None,
              max_train_samples: int | None = None, max_eval_samples: int | None = None, subset_seed: int = 0):
    """DatasetDict with "train" and the task's eval splits, columns text_a, text_b, label.

    data_dir: a GLUE TSV folder; None loads the hub's `nyu-mll/glue` (needs network or a cache).
    max_*_samples take a fixed random subset (subset_seed), the same for every method and training seed.
    """
    from datasets import Dataset, DatasetDict

    task = get_task(task_name)
    splits = list(splits or ("train", *task.eval_splits))
    result = {}
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"GLUE data folder {data_dir} does not exist; pass --data_dir <folder with "
                                    f"{task.folder}/train.tsv>, or omit it to load the hub's glue dataset")
        folder = _task_dir(task, data_dir)
        for split in splits:
            path = os.path.join(folder, SPLIT_FILES[split])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"GLUE folder {folder} is missing the {task.name} {split} split "
                                        f"({SPLIT_FILES[split]}); use the GLUE layout <data_dir>/{task.folder}/"
                                        f"{SPLIT_FILES[split]}")
            result[split] = Dataset.from_dict(read_glue_tsv(task, path))
    else:
        from datasets import load_dataset

        hub = load_dataset("nyu-mll/glue", task.name)
        a, b = task.hub_text_columns
        for split in splits:
            ds = hub[split]
            result[split] = Dataset.from_dict({"text_a": ds[a], "text_b": ds[b] if b else [None] * len(ds),
                                               "label": ds["label"]})
    for split, ds in result.items():
        limit = max_train_samples if split == "train" else max_eval_samples
        if limit is not None and limit < len(ds):
            result[split] = ds.shuffle(seed=subset_seed).select(range(limit))
    return DatasetDict(result)


def tokenize_glue(datasets, tokenizer, max_length: int):
    """Tokenize text pairs (truncation only; DataCollatorWithPadding pads per batch)."""
    def encode(batch):
        second = batch["text_b"] if any(t is not None for t in batch["text_b"]) else None
        return tokenizer(batch["text_a"], second, truncation=True, max_length=max_length)

    return datasets.map(encode, batched=True, remove_columns=["text_a", "text_b"])


# ---- arguments ---------------------------------------------------------------------------------------------

@dataclass
class GlueArguments(MethodArguments, QuantArguments):
    task_name: str = field(metadata={"help": f"GLUE task: {', '.join(TASKS)}"})
    model_name_or_path: str = field(metadata={"help": "AutoModelForSequenceClassification hub id or local folder"})
    data_dir: str | None = field(default=None, metadata={"help": "GLUE TSV folder (e.g. ../shared/data/glue); "
                                                                  "omit to load the hub's glue dataset"})
    preset: str | None = field(default=None, metadata={"help": "per-task DeBERTaV3 hyperparameters: 'paper' (RefLoRA "
                                                                "paper, Table 6) or 'adalora' (AdaLoRA's scripts); "
                                                                "flags given explicitly still win"})
    max_length: int = field(default=128, metadata={"help": "max tokens per example (pair)"})
    lora_r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | None = field(default=None, metadata={"help": "comma-separated module names, or 'paper' "
                                                                        "(all linear modules of the encoder); "
                                                                        "default: q/k/v, attention output, "
                                                                        "intermediate"})
    cls_dropout: float | None = field(default=None, metadata={"help": "classifier-head dropout"})
    train_pooler: bool = field(default=True, metadata={"help": "train the model's pooler (BERT: the dense + tanh "
                                                                "over [CLS]; DeBERTa: ContextPooler) in full next "
                                                                "to the classifier; false: keep it frozen (the "
                                                                "old behaviour)"})
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self.task_name = get_task(self.task_name).name
        if self.preset not in (None, *PRESETS):
            raise ValueError(f"unknown --preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")


@dataclass
class GlueTrainingArguments(TrainingArguments):
    # The paper's shared setting as defaults; everything else is TrainingArguments' own.
    learning_rate: float = 1e-3
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    logging_steps: float = 10
    # Dev loss and metrics at every logging step (eval_steps defaults to logging_steps): the held-out curve next
    # to the training loss. --eval_steps N thins it, --eval_strategy no evaluates once, after training.
    eval_strategy: str = "steps"
    save_strategy: str = "no"


def parse_args(argv=None):
    """(GlueArguments, TrainingArguments) from CLI flags, or from a single .json/.yaml file."""
    (glue_args, train_args), given = parse_hf_args((GlueArguments, GlueTrainingArguments),
                                                   list(sys.argv[1:] if argv is None else argv))
    if glue_args.preset is not None:
        apply_preset(glue_args, train_args, given)
    return glue_args, train_args


def apply_preset(glue_args, train_args, given: set) -> None:
    """Fill in the preset's per-task hyperparameters, except where a flag was given explicitly."""
    from transformers import SchedulerType

    for key, value in PRESETS[glue_args.preset][glue_args.task_name].items():
        if key in given:
            continue
        if key == "lr_scheduler_type":
            value = SchedulerType(value)  # as TrainingArguments stores it after parsing
        target = glue_args if hasattr(glue_args, key) else train_args
        setattr(target, key, value)


# ---- model -------------------------------------------------------------------------------------------------

def default_targets(model, paper: bool = False) -> list[str]:
    """The model family's target names; ``paper=True`` adds the FFN output dense (all linear modules)."""
    names = [n for n, _ in model.named_modules()]
    family = next((t for t in TARGETS.values() if any(n.endswith("." + t[0]) for n in names)),
                  TARGETS["bert"])  # add_lora reports what the model has instead
    return family + [FFN_OUTPUT] if paper else family


def pooler_names(model) -> list[str] | None:
    """["pooler"] when the model has a pooler with weights (BERT's BertPooler, DeBERTa's ContextPooler), else None.

    The classifier reads the pooler's output, but a pooler is often untrained: sentence-transformers checkpoints
    (all-MiniLM-L6-v2: trained with mean pooling, its pooler bias is exactly 0) and DeBERTaV3 (no pooler in the
    checkpoint: initialised at random). Left frozen, the head sees a random projection of [CLS]."""
    found = any(n.rsplit(".", 1)[-1] == "pooler" and any(True for _ in m.parameters())
                for n, m in model.named_modules())
    return ["pooler"] if found else None


def load_model(args: GlueArguments, gradient_checkpointing: bool = False):
    """Tokenizer and LoRA-wrapped AutoModelForSequenceClassification for the task (classifier head trained)."""
    from peft import TaskType
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    task = get_task(args.task_name)
    if task.labels is None:
        config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=1, problem_type="regression")
    else:
        config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=len(task.labels),
                                            id2label=dict(enumerate(task.labels)),
                                            label2id={l: i for i, l in enumerate(task.labels)})
    if args.cls_dropout is not None:
        config.cls_dropout = args.cls_dropout          # DeBERTa's head
        config.classifier_dropout = args.cls_dropout   # BERT / RoBERTa's head
    quantized = quantization(args)  # QLoRA flags: checked before the load
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, config=config, **quantized)
    model = prepare_quantized(model, args, gradient_checkpointing)
    if args.target_modules in (None, "paper"):
        targets = default_targets(model, paper=args.target_modules == "paper")
    else:
        targets = args.target_modules.split(",")
    # TaskType.SEQ_CLS makes peft train the new head ("classifier" / "score") in full: modules_to_save.
    # The pooler the head reads joins it (--train_pooler): it may be untrained in the checkpoint (see pooler_names).
    model = add_lora(model, [t.strip() for t in targets], r=args.lora_r, alpha=args.lora_alpha,
                     dropout=args.lora_dropout, task_type=TaskType.SEQ_CLS,
                     modules_to_save=pooler_names(model) if args.train_pooler else None)
    return tokenizer, model


# ---- run ---------------------------------------------------------------------------------------------------

class ResultsWriter(TrainerCallback):
    """Rewrites results.json after every evaluation, so a crash later keeps the metrics so far."""

    def __init__(self, path: str, header: dict):
        self.path, self.header, self.evals = path, header, []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics:
            self.add(state.global_step, state.epoch, metrics)

    def add(self, step, epoch, metrics):
        entry = {"step": step, "epoch": epoch, **{k: _clean(v) for k, v in metrics.items()}}
        if self.evals and self.evals[-1]["step"] == step:
            self.evals[-1].update(entry)    # MNLI: matched and mismatched arrive as two evaluations
        else:
            self.evals.append(entry)
        self.write()

    def write(self, **extra):
        task = self.header["task"]
        last = self.evals[-1] if self.evals else {}
        write_json_atomic(self.path, {**self.header, "main_metric": MAIN_METRIC[task],
                                      "main_value": main_value(task, last), "evals": self.evals, **extra})


def _clean(v):
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(float(v)) else float(v)
    return v


def run(glue_args: GlueArguments, train_args) -> dict:
    """Train and evaluate one GLUE task; returns the final metrics. Writes the run folder (docs/design.md)."""
    from transformers import DataCollatorWithPadding, set_seed

    out = train_args.output_dir
    os.makedirs(out, exist_ok=True)
    is_main = train_args.process_index == 0
    if is_main:
        start_fresh(out, keep_events=bool(train_args.resume_from_checkpoint))
        write_json_atomic(os.path.join(out, "config.json"), {**asdict(glue_args), **train_args.to_dict()})
    log = RunLog(out, train_args.max_steps, enabled=is_main)
    log.set_status(state="running")
    with log.reporting():
        set_seed(train_args.seed)
        task = get_task(glue_args.task_name)
        raw = load_glue(task.name, glue_args.data_dir, max_train_samples=glue_args.max_train_samples,
                        max_eval_samples=glue_args.max_eval_samples)
        tokenizer, model = load_model(glue_args, checkpointing(train_args))
        data = tokenize_glue(raw, tokenizer, glue_args.max_length)
        evals = {s.split("_", 1)[1]: data[s] for s in task.eval_splits} if len(task.eval_splits) > 1 \
            else data[task.eval_splits[0]]

        def compute_metrics(p):
            preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
            return glue_metrics(task.name, preds, p.label_ids)

        results = ResultsWriter(os.path.join(out, "results.json"),
                                   {"task": task.name, "method": glue_args.method,
                                    "model": glue_args.model_name_or_path, "seed": train_args.seed})
        trainer = RefactorTrainer(
            model=model, args=train_args, train_dataset=data["train"], eval_dataset=evals,
            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
            compute_metrics=compute_metrics, callbacks=[results],
            method=glue_args.method, method_options=glue_args.method_options(),
            run_log=log)
        # The classification loss is a batch mean that ignores num_items_in_batch, but the model's forward takes
        # **kwargs, so Trainer would treat it as a sum over its tokens: multiplied by the number of processes
        # (DDP, FSDP: twice the gradient on 2) and not divided over gradient accumulation steps.
        trainer.model_accepts_loss_kwargs = False
        started = time.time()
        train_out = trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
        train_seconds = time.time() - started
        sharded = trainer.refactorer.shard_group() is not None
        if not sharded:
            trainer.save_model(out)    # peft adapter (safetensors) + the trained head + the tokenizer
        elif is_main:
            # FSDP2: Trainer.save_model writes no weights with a SHARDED_STATE_DICT config and fails in peft's
            # save_pretrained with FULL_STATE_DICT ("invalid python storage"); save_adapter below gathers them.
            tokenizer.save_pretrained(out)
        if trainer.refactorer.method.merges_links or sharded:
            # + the links merged into the base; under FSDP2 the whole adapter. Every rank calls it (a gather under
            # FSDP2), the main process writes.
            save_adapter(trainer.model, trainer.refactorer, out)
        # No second pass over the same weights when the last step was just evaluated (log_history is the
        # same on every process, so all ranks take the same branch).
        step = trainer.state.global_step
        last = [h for h in trainer.state.log_history if h.get("step") == step and any(k.startswith("eval_") for k in h)]
        final = {k: v for h in last for k, v in h.items()} if last else trainer.evaluate()
        stats = trainer.refactorer.stats()  # every rank (a collective under FSDP2)
        if is_main:
            results.write(final=results.evals[-1] if results.evals else final, train_loss=train_out.training_loss, train_seconds=train_seconds,
                          train_steps=trainer.state.global_step, refactor=stats, distributed=trainer.distributed())
        log.set_status(state="done", step=trainer.state.global_step, max_steps=trainer.state.max_steps)
        return final
