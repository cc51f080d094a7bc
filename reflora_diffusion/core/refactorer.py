"""Refactorer: hooks a LoRA method into any torch optimizer's step."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from . import state_file
from .links import Links
from .methods import METHODS, Method
from .pairs import LoraPair, find_lora_pairs, unwrap_model
from .plan import Context, Plan, warn_unknown_state

STATE_FILE = state_file.STATE_FILE


def _method_names() -> str:
    return ", ".join(sorted(METHODS))


class Refactorer:
    """Apply a LoRA method (``METHODS``) to every peft LoRA pair of ``model`` inside ``optimizer.step()``.

    >>> ref = Refactorer(model, method="reflora", warmup_steps=100)
    >>> ref.attach(optimizer)   # before creating the lr scheduler

    Refactoring methods (reflora, reflora-s, scaledgd, preclora, nora+) run plain LoRA steps for the
    first ``warmup_steps`` optimizer steps (peft starts with B = 0, where S* is undefined) and then act
    for every ``interval``-th step: for the optimizer steps k = W, W + I, W + 2I, ... (k counts from 0,
    W = ``warmup_steps``, I = ``interval``). The preconditioners transform step k's gradient; RefLoRA-S
    balances the factors (and the optimizer state) for step k, i.e. right after step k - 1 (for k = 0,
    before step 0: factors and gradients together). So both start changing the update at the same
    step, as in the authors' code, where RefLoRA-S first rescales after W completed steps (its attach
    consumes one warm-up count). Because the work happens in optimizer step hooks it runs once per
    real optimizer step: after gradient accumulation, DDP all-reduce and the GradScaler's unscale, and
    not at all on a step the GradScaler skips.

    The per-step work is planned once (``plan.Plan``: buckets of equal-shaped pairs, tensor lists, shard group,
    optimizer state) and replanned only when the optimizer's parameters or state change, so a step costs a fixed
    number of ops per bucket, not per layer (benchmarks/hook_ops.py).

    ``reinit=True`` replaces peft's init (B = 0, where refactoring is undefined) by random full-rank
    factors (A0, B0) and subtracts s * B0 @ A0 from the base weight, so the model output is unchanged and
    refactoring can start at step 0 (docs/methods.md, Assumption 1). The subtraction is kept like a chain link:
    ``effective_factors()`` then exports [A0; A], [-B0, B] (rank 2r), exact on the original base model.
    """

    STATE_FILE = STATE_FILE  # what save() writes into a checkpoint folder

    def __init__(self, model: nn.Module, method: str = "reflora", warmup_steps: int = 0, interval: int = 1,
                 adapter: str | None = None, reinit: bool = False, reinit_seed: int = 0, **method_options):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of: {_method_names()}.")
        if int(warmup_steps) < 0 or int(interval) < 1:
            raise ValueError(f"warmup_steps must be >= 0 and interval >= 1 (got {warmup_steps}, {interval}).")
        self.model = unwrap_model(model)
        self.pairs: list[LoraPair] = find_lora_pairs(self.model, adapter)
        if not self.pairs:
            raise ValueError(
                f"{type(self.model).__name__} has no trainable peft LoRA layers; add adapters first "
                "(peft.get_peft_model(model, LoraConfig(...)) or model.add_adapter(LoraConfig(...))).")
        self.method_name = method
        self.method: Method = METHODS[method](**method_options)
        self.warmup_steps, self.interval = int(warmup_steps), int(interval)
        if self.method.needs_full_rank:
            self._check_ranks()
        if self.method.merges_links and any(getattr(p.module, "use_dora", {}).get(p.adapter, False)
                                                  for p in self.pairs):
            raise ValueError(f"method {method!r} merges links into the base weight, which DoRA does not allow; "
                             "train DoRA with a non-chain method.")
        self.optimizer: torch.optim.Optimizer | None = None
        self.links = Links(self.pairs)
        self.step_count = 0
        self._handles = []
        self._warned_state: set[str] = set()
        self._plan: Plan | None = None
        self.context: Context | None = None
        self._reset_counters()
        if reinit:
            self._reinit(reinit_seed)

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def _reinit(self, seed: int) -> None:
        if any(getattr(p.module, "use_dora", {}).get(p.adapter, False) for p in self.pairs):
            raise ValueError("reinit=True changes the base weights, which DoRA's magnitude depends on; "
                             "use warmup_steps instead.")
        g = torch.Generator().manual_seed(int(seed))
        for pair in self.pairs:
            for factor, fan_in in ((pair.A, pair.d_in), (pair.B, pair.rank)):
                # peft's kaiming_uniform(a=sqrt(5)) bound, drawn on the CPU so every process draws the same
                u = torch.rand(factor.shape, generator=g) * 2 - 1
                factor.copy_((u / fan_in ** 0.5).to(factor))
        # base <- base - s * B0 @ A0, remembered as the link (A0, -B0) so export and resume stay exact
        self.links.merge([(p.A.detach().clone(), -p.B.detach().clone()) for p in self.pairs])

    def _check_ranks(self) -> None:
        for p in self.pairs:
            if p.rank > min(p.d_in, p.d_out):
                raise ValueError(
                    f"LoRA rank {p.rank} of layer {p.name!r} exceeds min(d_in, d_out) = {min(p.d_in, p.d_out)}; "
                    f"method {self.method_name!r} needs full-rank factors: lower the rank or leave that layer out.")

    def attach(self, optimizer):
        """Hook the method into ``optimizer`` (a torch optimizer, or a wrapper holding one as ``.optimizer``).

        Chains start their first link here (RAC-LoRA re-initialises the factors it draws): when resuming,
        restore model weights, optimizer state and then :meth:`load` after attaching, as
        ``accelerator.load_state`` after ``prepare`` does.
        """
        inner = optimizer  # accelerate's AcceleratedOptimizer is an Optimizer wrapping the real one
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"attach() needs a torch.optim.Optimizer (or a wrapper with .optimizer), "
                            f"got {type(optimizer).__name__}.")
        if inner is self.optimizer:
            return optimizer  # already attached (e.g. once bare, once through accelerate's wrapper)
        held = {id(p) for g in inner.param_groups for p in g["params"]}
        missing = [p.name for p in self.pairs if id(p.A) not in held or id(p.B) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the LoRA parameters of {len(missing)} layer(s) "
                             f"(e.g. {missing[0]!r}); create it from the model's trainable parameters "
                             "after adding the adapters.")
        if self.optimizer is not None:
            self.detach()
        self.optimizer = inner
        self._plan = None
        self._handles = [inner.register_step_pre_hook(self._pre_hook),
                         inner.register_step_post_hook(self._post_hook)]
        self.method.setup(self._context())
        return optimizer

    def _context(self) -> Context:
        """The plan for the current parameters and optimizer state (rebuilt only when they changed)."""
        if self._plan is None or not self._plan.current(self.optimizer):
            # a Trainer shards (FSDP2) or replaces the parameters after attach(): plan, and check, on first use
            self._plan = Plan(self.pairs, self.optimizer)
            self._check_sharding(self._plan.group)
            if self.context is None:
                self.context = Context(self._plan, self.optimizer, self.links, self.count, self.warn_unknown_state,
                                       self.method_name)
            self.context.plan, self.context.optimizer = self._plan, self.optimizer
        self.context.step = self.step_count
        return self.context

    def _check_sharding(self, group) -> None:
        if group is not None and (self.method.merges_links or self.links):
            raise ValueError(f"method {self.method_name!r} (or reinit) merges LoRA links into the base weights, which "
                             "FSDP shards: train chains and reinit with DDP or one process")

    def shard_group(self):
        """The process group the LoRA factors are sharded over (FSDP2's fully_shard), or None (whole on each rank)."""
        group = Plan(self.pairs, self.optimizer).group
        self._check_sharding(group)
        return group

    def check_schedule(self, total_steps: int) -> str | None:
        """Warn (one line, returned too) when the warm-up covers the whole run, which is then plain LoRA."""
        if not self.method.uses_warmup or self.warmup_steps < int(total_steps):
            return None
        msg = (f"method {self.method_name!r} starts after {self.warmup_steps} warm-up steps but the run has only "
               f"{int(total_steps)} optimizer steps, so it trains as plain LoRA; lower the warm-up "
               f"(e.g. to {max(0, int(total_steps) // 10)}) or train longer")
        warnings.warn(msg, stacklevel=2)
        return msg

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.optimizer, self._plan = [], None, None

    # ------------------------------------------------------------------ the hooks
    def _active(self) -> bool:
        """Whether the method acts for optimizer step ``step_count`` (the next one; steps count from 0)."""
        if not self.method.uses_warmup:
            return True  # lora, lora+, chains act on every step
        k = self.step_count - self.warmup_steps
        return k >= 0 and k % self.interval == 0

    @torch.no_grad()
    def _pre_hook(self, optimizer, args, kwargs):
        ctx = self._context()  # checks the plan once per step
        if self._active():  # before this step
            self._new_action = True
            self.method.pre_step(ctx)

    @torch.no_grad()
    def _post_hook(self, optimizer, args, kwargs):
        ctx = self.context
        self.method.finish_step(ctx)
        self.step_count += 1
        ctx.step = self.step_count
        if self._active():  # after the previous step, for the next one
            self._new_action = True
            self.method.post_step(ctx)

    # ------------------------------------------------------------------ what methods report
    def _reset_counters(self) -> None:
        # [layers ok, layers finite] as device counters and the number of layers they count, of the method's last
        # action and in total (``_outcomes`` turns them into refactored / skipped rank-deficient / non-finite)
        self._last, self._last_layers = torch.zeros(2, dtype=torch.long), 0
        self._total, self._total_layers = torch.zeros(2, dtype=torch.long), 0
        self._new_action = False

    def count(self, ok: torch.Tensor, finite: torch.Tensor) -> None:
        """Record the per-layer outcome of a method's action: ``ok`` (acted on; implies ``finite``) and ``finite``
        (factors and gradients finite), as device counters (no host synchronisation)."""
        counts = torch.stack((ok, finite)).sum(1)
        if self._new_action:  # the first count of a hook call replaces the last action's figures
            self._last, self._last_layers, self._new_action = counts, len(ok), False
        else:
            self._last, self._last_layers = self._last.to(counts.device) + counts, self._last_layers + len(ok)
        self._total, self._total_layers = self._total.to(counts.device) + counts, self._total_layers + len(ok)

    @staticmethod
    def _outcomes(counts: torch.Tensor, layers: int) -> tuple[int, int, int]:
        """(refactored, skipped rank-deficient, skipped non-finite) from [ok, finite] counters (a host read)."""
        ok, finite = counts.tolist()
        return ok, finite - ok, layers - finite

    def precondition_gradients(self, preconditioner) -> None:
        """G_A <- P_A G_A, G_B <- G_B P_B with (P_A, P_B, ok) = preconditioner(A A^T, B^T B) (``Plan.precondition``)."""
        self._context().precondition(preconditioner)

    def factor_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||A||_F, ||B||_F) of every pair, float32; sharded factors: one all-reduce of squared norms (call it on
        every rank)."""
        return self._context().plan.factor_norms()

    def warn_unknown_state(self, known: tuple) -> None:
        """Warn once per unknown optimizer-state key that a factor rescaling cannot carry along."""
        warn_unknown_state(self.optimizer, self.pairs, known, self._warned_state, self.method_name)

    # ------------------------------------------------------------------ chains: merging and export
    def merge_into_base(self) -> None:
        """Merge each pair's current s * B @ A into its base weight and remember it as a chain link."""
        self.links.merge()

    @property
    def chained(self) -> bool:
        """Whether links were merged into the base weights (chains, reinit): the export then has rank K*r."""
        return bool(self.links)

    def effective_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{pair name: (A, B, scaling)} of the LoRA to export (``links.Links.effective_factors``)."""
        return self.links.effective_factors()

    # ------------------------------------------------------------------ figures for a UI
    @torch.no_grad()
    def stats(self, sstar: bool = True) -> dict:
        """Per-step figures: layers refactored / skipped at the method's last action, balance ||B||/||A||, and with
        ``sstar`` how far S* is from the identity (``_sstar_stats``: about the cost of one RefLoRA step itself, so a
        caller that logs every step asks for it less often).

        Synchronises the device (it reads numbers): call it at logging steps only, and on every rank when the
        factors are sharded (FSDP2: the norms are summed over the ranks).
        """
        plan = self._context().plan if self.optimizer is not None else Plan(self.pairs, None)
        na, nb = plan.factor_norms()
        ratio = nb / na
        ratio = ratio[torch.isfinite(ratio)]
        refactored, deficient, nonfinite = self._outcomes(self._last, self._last_layers)
        total = self._outcomes(self._total, self._total_layers)
        return {
            **(self._sstar_stats(plan) if sstar else {}),
            "method": self.method_name,
            "step": self.step_count,
            "layers": len(self.pairs),
            "refactored": refactored,
            "skipped": deficient + nonfinite,
            "skipped_rank_deficient": deficient,
            "skipped_nonfinite": nonfinite,
            "skipped_total": total[1] + total[2],
            "balance_mean": float(ratio.mean()) if ratio.numel() else float("nan"),
            "balance_max": float(ratio.max()) if ratio.numel() else float("nan"),
        }

    @staticmethod
    def _sstar_stats(plan: Plan) -> dict:
        """How far RefLoRA's S* of the current factors is from the identity, over the full-rank layers (median and
        max over layers): ``sstar_spread`` = lambda_max / lambda_min of S* (1: S* is a multiple of I, what RefLoRA-S
        can do too), ``sstar_scale`` = det(S*)^(1/r) (1: ||B|| and ||A|| balanced in scale). Whole factors only
        (left out under FSDP2); r x r eighs, cheap at logging steps."""
        if plan.group is not None:
            return {}
        from .linalg import geometric_mean

        spreads, scales = [], []
        for bucket in plan.buckets:
            AAt, BtB, _, _ = bucket.grams(torch.float64)
            _, S, ok = geometric_mean(AAt, BtB)
            w = torch.linalg.eigvalsh(S[ok])
            spreads.append(w[:, -1] / w[:, 0])
            scales.append(w.log().mean(-1).exp())
        spread, scale = torch.cat(spreads), torch.cat(scales)
        if not spread.numel():
            return {"sstar_layers": 0}
        return {"sstar_layers": int(spread.numel()), "sstar_spread_median": float(spread.median()),
                "sstar_spread_max": float(spread.max()), "sstar_scale_median": float(scale.median()),
                "sstar_scale_min": float(scale.min()), "sstar_scale_max": float(scale.max())}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "method": self.method_name, "step_count": self.step_count,
            "warmup_steps": self.warmup_steps, "interval": self.interval,
            "totals": {k: torch.tensor(v) for k, v in zip(_COUNTERS, self._outcomes(self._total, self._total_layers))},
            "method_state": self.method.state_dict(),
            **self.links.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method_name:
            raise ValueError(f"the saved state is for method {state['method']!r}, this Refactorer runs "
                             f"{self.method_name!r}; resume with --method {state['method']}.")
        self.step_count = int(state["step_count"])
        refactored, deficient, nonfinite = (int(state["totals"][k]) for k in _COUNTERS)
        self._total = torch.tensor([refactored, refactored + deficient])
        self._total_layers = refactored + deficient + nonfinite
        self.method.load_state_dict(state["method_state"], self.context)
        self.links.load_state_dict(state)

    def save(self, directory) -> Path:
        """Write the state to ``directory/refactorer.safetensors`` (tensors + JSON metadata), atomically."""
        return state_file.save(self.state_dict(), directory)

    def load(self, directory) -> None:
        """Restore the state written by :meth:`save` (``directory`` or the file itself)."""
        self.load_state_dict(state_file.load(directory))


_COUNTERS = ("refactored", "skipped_rank_deficient", "skipped_nonfinite")
