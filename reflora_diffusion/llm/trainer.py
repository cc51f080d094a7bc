"""transformers' Trainer with the optimizer core attached (shared by GLUE and commonsense).

    model = add_lora(model, ["query", "key", "value"], r=8, alpha=8)
    trainer = RefactorTrainer(model=model, args=args, train_dataset=ds, method="reflora",
                              method_options={"warmup_steps": 100}, run_log=RunLog("runs/x"))
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

Hook points (transformers 5.x `Trainer`): `create_optimizer` runs before the lr scheduler is created in every
code path (plain, accelerate-prepared, FSDP-delayed), so the core attaches there; `_save_checkpoint` writes
each checkpoint-<N>/ folder; `_load_optimizer_and_scheduler` runs exactly when a checkpoint is resumed.
"""

from __future__ import annotations

import json
import os
import time

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from reflora_diffusion.core import Refactorer
from reflora_diffusion.core.options import MethodOptions, rename_deprecated, rename_deprecated_keys
from reflora_diffusion.rundir import RunLog

__all__ = ["MethodArguments", "parse_hf_args", "RefactorTrainer", "EventsCallback", "add_lora", "save_adapter",
           "leave_distributed"]


# The method flags both LLM entry points share: declared once in the core (one name per knob, one check).
MethodArguments = MethodOptions


def parse_hf_args(dataclass_types, argv: list[str]) -> tuple[tuple, set[str]]:
    """(dataclasses, names given explicitly) from flags or a single .json/.yaml file, with HfArgumentParser.

    Old method-flag names (--ratio, --delta, --p, --normalize) are accepted with a deprecation line.
    A multi-process launch on a machine without a GPU runs on CPU with gloo (as `accelerate launch --cpu` would
    ask): TrainingArguments sets up its devices while it is parsed, so this is said before."""
    from transformers import HfArgumentParser

    from reflora_diffusion.cpu import distributed_cpu_run

    if distributed_cpu_run():
        os.environ["ACCELERATE_USE_CPU"] = "true"
    parser = HfArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0]) as f:
            if argv[0].endswith(".json"):
                values = json.load(f)
            else:
                import yaml

                values = yaml.safe_load(f) or {}
        values = rename_deprecated_keys(values)
        return parser.parse_dict(values), set(values)
    argv = rename_deprecated(argv)
    return parser.parse_args_into_dataclasses(args=argv), {a[2:].split("=")[0] for a in argv if a.startswith("--")}


def add_lora(model, target_modules, r: int = 8, alpha: float = 8, dropout: float = 0.0,
             modules_to_save=None, task_type=None, **lora_kwargs):
    """Wrap `model` with a peft LoRA adapter (the core's method is applied later, by RefactorTrainer).

    Raises a one-line ValueError for a model without any of the target modules.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and "," in target_modules:
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = LoraConfig(target_modules=target_modules)
    if not any(check_target_module_exists(probe, n) for n, _ in model.named_modules() if n):
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"model {type(model).__name__} has none of the target modules {target_modules}; "
                         f"its linear layers are named {linear}: pass --target_modules from those names")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        modules_to_save=modules_to_save, task_type=task_type, **lora_kwargs)
    return get_peft_model(model, config)


class EventsCallback(TrainerCallback):
    """Appends one JSON line per logging step (and per evaluation) to events.jsonl, keeps status.json fresh."""

    def __init__(self, run_log: RunLog, refactorer: Refactorer):
        self.log = run_log
        self.refactorer = refactorer
        self._last_step = 0
        self._last_time = time.time()

    def _status(self, state):
        self.log.set_status(state="running", step=state.global_step, max_steps=state.max_steps)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_step, self._last_time = state.global_step, time.time()
        if state.is_world_process_zero:
            self._status(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        stats = self.refactorer.stats()  # on every rank: sharded factors (FSDP2) sum their norms over the ranks
        if not state.is_world_process_zero:
            return
        now = time.time()
        steps = max(state.global_step - self._last_step, 1)
        event = {"step": state.global_step, "loss": float(logs["loss"]), "lr": logs.get("learning_rate"),
                 "sec_per_step": (now - self._last_time) / steps, "time": now,
                 "refactor": stats}
        if "grad_norm" in logs:
            event["grad_norm"] = float(logs["grad_norm"])
        if "epoch" in logs:
            event["epoch"] = logs["epoch"]
        self.log.event(**event)
        self._status(state)
        self._last_step, self._last_time = state.global_step, now

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics:
            self.log.event(step=state.global_step, time=time.time(),
                           eval={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        self._exclude_pause(state)

    def on_save(self, args, state, control, **kwargs):
        self._exclude_pause(state)

    def _exclude_pause(self, state):
        # Evaluation and saving run right after the log of the same step: keep them out of sec_per_step.
        if state.global_step == self._last_step:
            self._last_time = time.time()


class RefactorTrainer(Trainer):
    """`transformers.Trainer` whose optimizer runs a core method (docs/methods.md) and whose checkpoints carry its state."""

    def __init__(self, *args, method: str = "reflora", method_options: dict | None = None,
                 run_log: RunLog | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled:
            plugin = self.accelerator.state.fsdp_plugin
            _layer_units_without_the_embedding(plugin, self.model)
            if plugin.cpu_ram_efficient_loading:
                _materialize_trainable(self.model)
        self.method = method
        self.method_options = dict(method_options or {})
        # The core walks module names: give it the unwrapped model (no DDP/compile wrapper).
        self.refactorer = Refactorer(self.accelerator.unwrap_model(self.model), method=method, **self.method_options)
        if run_log is not None:
            self.add_callback(EventsCallback(run_log, self.refactorer))

    def create_accelerator_and_postprocess(self):
        fsdp_on_cpu = _fsdp_asked_on_cpu(self.args)  # before accelerate builds its (FSDP1: accelerator-only) plugin
        super().create_accelerator_and_postprocess()
        if fsdp_on_cpu:
            _shard_on_cpu(self.accelerator.state, self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True  # what Trainer reads to leave placement and sharding to accelerate

    def distributed(self) -> dict:
        """How the run was spread, for results.json: processes, and whether FSDP2 sharded the LoRA factors."""
        return {"processes": self.args.world_size, "sharded": self.refactorer.shard_group() is not None}

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        # Trainer calls this before create_scheduler, so param groups the core adds (lora+) get scheduled.
        # A second train() hands back the same optimizer (wrapped by accelerate): attach() is then a no-op.
        self.refactorer.attach(optimizer)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        self.refactorer.check_schedule(num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.refactorer.save(folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if not os.path.isfile(os.path.join(checkpoint, Refactorer.STATE_FILE)):
            raise FileNotFoundError(f"checkpoint {checkpoint} has no {Refactorer.STATE_FILE} (the core's state); resume from "
                                    "a checkpoint written by RefactorTrainer, or train without --resume_from_checkpoint")
        self.refactorer.load(checkpoint)


def _fsdp_asked_on_cpu(args) -> bool:
    """True when the launcher's accelerate config (or transformers' --fsdp flags) asks for FSDP and this run is on
    CPU with gloo (a multi-process launch without GPUs, see parse_hf_args). FSDP1 is refused there in one line:
    accelerate's FSDP1 plugin needs an accelerator, and the core needs FSDP2's row-aligned factors anyway."""
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or args.fsdp_plugin_args is not None
    state = args.distributed_state
    if not asked or state is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    version = int((args.fsdp_plugin_args or {}).get("fsdp_version", os.environ.get("FSDP_VERSION", "1")))
    if version != 2:
        raise ValueError(f"FSDP on CPU runs as FSDP2 only (fsdp_version is {version}): set fsdp_version: 2 in the "
                         "accelerate config's fsdp_config (or \"version\": 2 in --fsdp_config)")
    return True


def _shard_on_cpu(state, fsdp_plugin_args: dict | None = None) -> None:
    """Turn accelerate's CPU run (gloo) into the FSDP2 run the launcher asked for.

    accelerate 1.15 builds an FSDP state on accelerators only: on CPU it drops the FSDP plugin of the config (or of
    transformers' --fsdp flags) and runs DDP, and under fsdp_cpu_ram_efficient_loading the ranks other than 0,
    which loaded an empty (meta) model, then fail in Trainer.__init__ ("Cannot copy out of meta tensor"). torch's
    fully_shard runs on CPU with gloo, so the plugin is put back: accelerate then shards the model in prepare and
    fills the empty ranks from rank 0, as on GPUs."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**(fsdp_plugin_args or {}))  # no arguments: from the launcher's env
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP


def _layer_units_without_the_embedding(plugin, model) -> None:
    """TRANSFORMER_BASED_WRAP: one FSDP2 unit per class in the model's ``_no_split_modules``, except a class that
    holds the input embedding (BERT's ``BertEmbeddings``). accelerate 1.15 gives the input embedding a unit of
    its own after the layers; inside an already sharded parent that second ``fully_shard`` fails
    ("Invariant encountered: value was None"). The parent's other weights join the root unit."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy or plugin.transformer_cls_names_to_wrap is not None:
        return  # another policy, or classes the user named
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    holders = {type(m).__name__ for m in model.modules() if embedding is not None and m is not embedding
               and any(c is embedding for c in m.modules())}
    plugin.transformer_cls_names_to_wrap = [c for c in getattr(model, "_no_split_modules", None) or []
                                            if c not in holders]


@torch.no_grad()
def _materialize_trainable(model) -> None:
    """Give trainable parameters that are still on the meta device storage of their own (values do not matter).

    With fsdp_cpu_ram_efficient_loading the ranks other than 0 load the model on the meta device; peft keeps the
    LoRA factors off it, but a head it trains in full (``modules_to_save``: GLUE's classifier) is a meta copy.
    accelerate's FSDP2 ``prepare`` finds each optimizer parameter's sharded successor by ``data_ptr()``, which is 0
    for every meta tensor: the classifier's weight and bias then collide and the optimizer steps the bias twice
    and the weight never (seen on 2 CPU ranks). Rank 0's values are broadcast into the shards afterwards."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and param.is_meta:
                module.register_parameter(name, torch.nn.Parameter(torch.empty_like(param, device="cpu")))


def run_command(body) -> None:
    """What an LLM trainer's command line does around ``body()`` (parsing and the run): the library notices, bad
    input as one line ("error: ...", exit 1, no traceback), Ctrl-C as "interrupted" (exit 130, as the SD trainer),
    and the end of a multi-process run (``leave_distributed``)."""
    import sys

    from reflora_diffusion.logs import show_info

    show_info()
    try:
        body()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    leave_distributed()


def leave_distributed() -> None:
    """End a finished multi-process run: destroy the process group and exit at once (status 0); nothing without
    a process group. Left to the interpreter's teardown, gloo's threads can still hold work objects and abort the
    process after the run's work is done ("terminate called without an active exception", SIGABRT;
    pytorch/pytorch#179291), so the launcher would report a finished run as failed. Call it after everything is
    written (files are closed; the output streams are flushed here)."""
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _whole_state_dict(model) -> dict | None:
    """model.state_dict() with its trainable tensors whole when FSDP2 shards them (DTensor.full_tensor(), one
    all-gather each: call on every rank) and the frozen sharded ones left out (peft saves only the adapter);
    None for a model that is not sharded."""
    from reflora_diffusion.core.sharding import is_dtensor

    if not any(is_dtensor(p) for p in model.parameters()):
        return None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.full_tensor().cpu() if is_dtensor(v) else v for k, v in model.state_dict().items()
            if k in trainable or not is_dtensor(v)}


def save_adapter(model, refactorer: Refactorer, output_dir: str) -> None:
    """peft's save_pretrained (adapter_model.safetensors + adapter_config.json), chains included.

    Call it on every process: under FSDP2 the adapter's shards are gathered first (the saved adapter is whole);
    only the main process writes.

    Chain methods (rac-lora, cola) have merged earlier links into the in-memory base weights; the adapter
    then holds the concatenated rank-K*r factors from `effective_factors()`, which on the original base
    model reproduce base + all links (a rank-r save would drop the merged links). Everything else peft
    saves (modules_to_save such as a classifier head) is kept.
    """
    import torch.distributed as dist

    whole = _whole_state_dict(model)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    if not refactorer.chained:  # (chains are refused under FSDP: `whole` is for this branch)
        model.save_pretrained(output_dir, **({"state_dict": whole} if whole is not None else {}))
        return
    factors = refactorer.effective_factors()
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config["default"])
    rank = next(iter(factors.values()))[0].shape[0]
    scaling = next(iter(factors.values()))[2]
    config.r = rank
    config.lora_alpha = scaling * (rank ** 0.5 if config.use_rslora else rank)  # same s = alpha / r
    config.rank_pattern, config.alpha_pattern = {}, {}
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    for name, (A, B, _) in factors.items():
        state[f"{name}.lora_A.weight"] = A.detach().contiguous().cpu()
        state[f"{name}.lora_B.weight"] = B.detach().contiguous().cpu()
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    tmp = os.path.join(output_dir, "adapter_model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(output_dir, "adapter_model.safetensors"))
