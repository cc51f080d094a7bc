"""The core's method and its options, declared once: both trainers' command lines are built from this dataclass
(the SD config inherits it, the LLM entry points hand it to HfArgumentParser), so an option has one name, one
help text (naming the methods that take it, from their declared ``options``) and one validation.

    opts = MethodOptions(method="lora+", loraplus_lr_ratio=4)
    opts.check()                                     # ValueError in one line for a bad combination
    Refactorer(model, method=opts.method, **opts.method_options())
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from .methods import METHODS


def _owners(core_name: str) -> list[str]:
    return [name for name, cls in METHODS.items() if core_name in cls.options]


# Flag name -> keyword of Refactorer / the method classes (metadata is passed on to argparse, so it lives here).
CORE_NAMES = {"refactor_warmup_steps": "warmup_steps", "refactor_interval": "interval", "loraplus_lr_ratio": "ratio",
              "preconditioner_delta": "delta", "chain_every": "chain_every", "rac_p": "p",
              "reflora_normalize": "normalize", "reflora_apply_to": "apply_to", "reinit": "reinit"}


def _opt(default, core: str, help: str):
    """A method option; its help names the methods that declare `core` in their options, with their defaults."""
    owners = _owners(core)
    defaults = sorted({str(METHODS[m].options[core]) for m in owners})
    if owners:
        help = f"{help} ({', '.join(owners)}; default {' / '.join(defaults)})"
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class MethodOptions:
    method: str = field(default="reflora", metadata={"help": f"core method: {', '.join(METHODS)}"})
    refactor_warmup_steps: int = field(default=100, metadata={
        "help": "plain LoRA optimizer steps before refactoring starts (peft starts with B = 0)"})
    refactor_interval: int = field(default=1, metadata={"help": "refactor every N optimizer steps"})
    loraplus_lr_ratio: float | None = _opt(None, "ratio", "lr(B) / lr(A)")
    preconditioner_delta: float | None = _opt(None, "delta", "damping of the preconditioner")
    chain_every: int | None = _opt(None, "chain_every", "optimizer steps per chain link")
    rac_p: float | None = _opt(None, "p", "probability that a link trains B with A frozen")
    reflora_normalize: bool = _opt(False, "normalize", "unit-determinant S* (steadier with Adam right after the warm-up)")
    reflora_apply_to: str | None = _opt(None, "apply_to", "where S* acts under an adaptive optimizer: gradient (the paper), "
                                        "update (the optimizer's step) or factors (balanced factors, moments carried)")
    reinit: bool = field(default=False, metadata={
        "help": "random full-rank A, B with the base weight compensated: refactor from step 0 (export has rank 2r)"})

    def __post_init__(self):
        self.check()

    def method_options(self) -> dict:
        """Keyword options for reflora_diffusion.core.Refactorer: the warm-up, interval and those set."""
        opts = {"warmup_steps": self.refactor_warmup_steps, "interval": self.refactor_interval}
        for name in _METHOD_FIELDS:
            value = getattr(self, name)
            if value is not None and value is not False:
                opts[CORE_NAMES[name]] = value
        return opts

    def check(self) -> "MethodOptions":
        """One-line ValueError for an unknown method, a bad number, or an option the method does not take."""
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if (self.refactor_warmup_steps or 0) < 0 or self.refactor_interval < 1:
            raise ValueError(f"--refactor_warmup_steps must be >= 0 and --refactor_interval >= 1 (got "
                             f"{self.refactor_warmup_steps}, {self.refactor_interval})")
        for name in _METHOD_FIELDS:
            value, owners = getattr(self, name), _owners(CORE_NAMES[name])
            if value is not None and value is not False and owners and self.method not in owners:
                raise ValueError(f"--method {self.method}: unknown option --{name} (an option of {', '.join(owners)})")
        return self


def default_warmup(total_steps: int) -> int:
    """The warm-up when none is given: the paper's 100 steps, at most 10 % of the run (so a short run is not
    plain LoRA throughout)."""
    return min(100, int(total_steps) // 10)


# The options beyond the schedule (warm-up, interval): passed on only when set.
_METHOD_FIELDS = [name for name in CORE_NAMES if name not in ("refactor_warmup_steps", "refactor_interval")]


# Old flag names -> new: still accepted, with one deprecation line. (The SD trainer also had --warmup_steps
# and --interval; on the LLM side --warmup_steps is TrainingArguments' lr warm-up, so it is not renamed there.)
DEPRECATED = {"ratio": "loraplus_lr_ratio", "delta": "preconditioner_delta", "p": "rac_p",
              "normalize": "reflora_normalize"}


def rename_deprecated(argv: list[str], renames: dict[str, str] = DEPRECATED) -> list[str]:
    """Command-line flags with old names replaced by the new ones (one FutureWarning per old name)."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        negated = name.startswith("--no-")
        old = name[5:] if negated else name[2:] if name.startswith("--") else None
        if old in renames:
            new = renames[old]
            warnings.warn(f"--{old} is deprecated; use --{new}", FutureWarning, stacklevel=2)
            arg = f"--{'no-' if negated else ''}{new}{eq}{value}"
        out.append(arg)
    return out


def rename_deprecated_keys(values: dict, renames: dict[str, str] = DEPRECATED) -> dict:
    """The same for option names in a config file or a dict."""
    out = dict(values)
    for old, new in renames.items():
        if old in out:
            warnings.warn(f"option {old!r} is deprecated; use {new!r}", FutureWarning, stacklevel=2)
            value = out.pop(old)
            out.setdefault(new, value)
    return out
