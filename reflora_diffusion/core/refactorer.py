"""Refactorer: hooks a LoRA method into any torch optimizer's step."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .linalg import _identity_where
from .methods import METHODS, Method
from .pairs import LoraPair, find_lora_pairs, unwrap_model
from .sharding import all_sum, gather_rows, local, local_rows, shard_group

STATE_FILE = "refactorer.safetensors"


def _all_finite(stack: torch.Tensor) -> torch.Tensor:
    """Per-matrix finiteness of a (n, rows, cols) stack."""
    return torch.isfinite(stack).all(dim=(-2, -1))


def _layer_by_layer(device: torch.device) -> bool:
    """Large matmuls of precondition_gradients one layer at a time (CPU) or batched (accelerators)."""
    return device.type == "cpu"


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

    ``reinit=True`` replaces peft's init (B = 0, where refactoring is undefined) by random full-rank
    factors (A0, B0) and subtracts s * B0 @ A0 from the base weight, so the model output is unchanged and
    refactoring can start at step 0 (METHODS.md, Assumption 1). The subtraction is kept like a chain link:
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
        self._checked_sharding = False
        self.step_count = 0
        self._handles = []
        self._warned_state: set[str] = set()
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
        self._merge([(p.A.detach().clone(), -p.B.detach().clone()) for p in self.pairs])
    def _check_ranks(self) -> None:
        for p in self.pairs:
            if p.rank > min(p.d_in, p.d_out):
                raise ValueError(
                    f"LoRA rank {p.rank} of layer {p.name!r} exceeds min(d_in, d_out) = {min(p.d_in, p.d_out)}; "
                    f"method {self.method_name!r} needs full-rank factors: lower the rank or leave that layer out.")

    def _group_pairs(self) -> dict[tuple, list[LoraPair]]:
        # Pairs of equal shapes, dtype and device are stacked and handled by one batched matmul (and, sharded, one
        # collective). Grouped at each use: a Trainer moves or shards the model after the Refactorer is made.
        buckets: dict[tuple, list[LoraPair]] = defaultdict(list)
        for p in self.pairs:
            buckets[(p.rank, p.d_in, p.d_out, p.A.dtype, p.B.dtype, p.A.device)].append(p)
        return dict(buckets)

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
        self._checked_sharding = False
        self._handles = [inner.register_step_pre_hook(self._pre_hook),
                         inner.register_step_post_hook(self._post_hook)]
        self.method.setup(self)
        return optimizer

    def shard_group(self):
        """The process group the LoRA factors are sharded over (FSDP2's fully_shard), or None (whole on each rank)."""
        if any(p.A.dim() < 2 or p.B.dim() < 2 for p in self.pairs):
            raise ValueError("the LoRA factors are flattened (FSDP1 / FullyShardedDataParallel); the core supports "
                             "FSDP2: set fsdp_version: 2 in the accelerate config (fully_shard)")
        groups = {id(g): g for g in (shard_group(t) for p in self.pairs for t in (p.A, p.B))}
        if len(groups) > 1:
            raise ValueError("some LoRA factors are sharded and others not (or over different groups); shard the "
                             "whole model with FSDP2's fully_shard")
        group = next(iter(groups.values()))
        if group is not None and (self.method.merges_links or getattr(self, "_links", None) is not None):
            raise ValueError(f"method {self.method_name!r} (or reinit) merges LoRA links into the base weights, which "
                             "FSDP shards: train chains and reinit with DDP or one process")
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
        self._handles, self.optimizer = [], None

    # ------------------------------------------------------------------ the hooks
    def _active(self) -> bool:
        """Whether the method acts for optimizer step ``step_count`` (the next one; steps count from 0)."""
        if not self.method.uses_warmup:
            return True  # lora, lora+, chains act on every step
        k = self.step_count - self.warmup_steps
        return k >= 0 and k % self.interval == 0

    @torch.no_grad()
    def _pre_hook(self, optimizer, args, kwargs):
        if not self._checked_sharding:  # a Trainer shards the model (FSDP2) after attach(): check at the first step
            self.shard_group()
            self._checked_sharding = True
        if self._active():  # before this step
            self._new_action = True
            self.method.pre_step(self)

    @torch.no_grad()
    def _post_hook(self, optimizer, args, kwargs):
        self.method.finish_step(self)
        self.step_count += 1
        if self._active():  # after the previous step, for the next one
            self._new_action = True
            self.method.post_step(self)

    # ------------------------------------------------------------------ shared machinery for methods
    def _reset_counters(self) -> None:
        zero = lambda: torch.zeros((), dtype=torch.long)  # noqa: E731
        self._last = {"refactored": zero(), "skipped_rank_deficient": zero(), "skipped_nonfinite": zero()}
        self._total = {k: zero() for k in self._last}
        self._new_action = False

    def count(self, ok: torch.Tensor, finite: torch.Tensor) -> None:
        """Record the per-layer outcome of a method's action (device tensors; no host synchronisation)."""
        if self._new_action:  # the first count of a hook call replaces the last action's figures
            self._last = {k: torch.zeros((), dtype=torch.long) for k in self._last}
            self._new_action = False
        counts = {"refactored": ok.sum(), "skipped_rank_deficient": (~ok & finite).sum(),
                  "skipped_nonfinite": (~finite).sum()}
        for k, v in counts.items():  # a 0-dim CPU tensor adds to a device tensor without a sync
            self._last[k] = self._last[k] + v
            self._total[k] = self._total[k] + v

    def precondition_gradients(self, preconditioner) -> None:
        """G_A <- P_A G_A, G_B <- G_B P_B with (P_A, P_B, ok) = preconditioner(A A^T, B^T B), batched.

        The r x r algebra gets one batched preconditioner call per (rank, device), on float32 Grams (float64
        for float64 factors); it picks its precision (linalg's docstring). The large matmuls (Grams and the
        gradient updates) are batched per bucket of equal shapes on an accelerator (few kernel launches) and
        run layer by layer on a CPU, where stacking the factors and gradients would cost more memory traffic
        than the matmuls save. A layer whose factors or gradients are not finite keeps exactly the gradients
        it had (a matmul would smear one NaN over a whole column) and is counted in ``skipped_nonfinite``;
        the other layers of its batch are unaffected.

        Under FSDP2 (factors sharded by rows, ``sharding``) each bucket does one all-gather and the same r x r
        algebra on every rank; each rank then writes its own rows of the new gradients.
        """
        group = self.shard_group()
        by_rank: dict[tuple, list] = defaultdict(list)
        for (r, *_rest), pairs in self._group_pairs().items():
            pairs = [p for p in pairs if p.A.grad is not None and p.B.grad is not None]
            if not pairs:
                continue
            cdt = torch.float64 if pairs[0].A.dtype == torch.float64 else torch.float32
            grams = self._grams if group is None else self._sharded_grams
            AAt, BtB, finite, GA = grams(pairs, cdt, group)
            by_rank[(r, AAt.device)].append((pairs, AAt, BtB, finite, GA))
        for items in by_rank.values():
            AAt = torch.cat([it[1] for it in items])
            BtB = torch.cat([it[2] for it in items])
            finite = torch.cat([it[3] for it in items]) & _all_finite(AAt) & _all_finite(BtB)
            P_A, P_B, ok = preconditioner(AAt, BtB)
            ok = ok & finite
            self.count(ok, finite)
            start = 0
            for pairs, _, _, _, GA in items:
                sel = slice(start, start + len(pairs))
                start += len(pairs)
                self._apply(pairs, P_A[sel], P_B[sel], ok[sel], finite[sel], AAt.dtype, GA, group)

    @staticmethod
    def _grams(pairs: list[LoraPair], cdt, group=None):
        """(A A^T, B^T B, gradients finite, None) of a bucket held whole by this process."""
        As = [p.a_matrix(p.A.detach()).to(cdt) for p in pairs]
        Bs = [p.b_matrix(p.B.detach()).to(cdt) for p in pairs]
        if _layer_by_layer(pairs[0].A.device):
            AAt = torch.stack([a @ a.T for a in As])
            BtB = torch.stack([b.T @ b for b in Bs])
        else:
            A, B = torch.stack(As), torch.stack(Bs)
            AAt, BtB = A @ A.transpose(-1, -2), B.transpose(-1, -2) @ B
        # the factors are checked through their Grams (non-finite where a factor is), the gradients through
        # their norms (one fused pass; a norm that overflows float32 counts as non-finite too)
        norms = torch._foreach_norm([p.A.grad for p in pairs] + [p.B.grad for p in pairs])
        finite = torch.isfinite(torch.stack(norms).view(2, -1)).all(0)
        return AAt, BtB, finite, None

    @staticmethod
    def _sharded_grams(pairs: list[LoraPair], cdt, group):
        """(A A^T, B^T B, gradients finite, whole G_A) of a row-sharded bucket: one all-gather of the rows of A
        and G_A with the partial B_i^T B_i and ||G_B,i||^2 of every rank (sharding.gather_rows)."""
        rows = pairs[0].rank
        A = torch.stack([p.a_matrix(local(p.A.detach())) for p in pairs]).to(cdt)
        GA = torch.stack([p.a_matrix(local(p.A.grad)) for p in pairs]).to(cdt)
        B = torch.stack([p.b_matrix(local(p.B.detach())) for p in pairs]).to(cdt)
        GB = torch.stack([p.b_matrix(local(p.B.grad)) for p in pairs]).to(cdt)
        partial = torch.cat([(B.transpose(-1, -2) @ B).flatten(1), GB.square().sum((1, 2))[:, None]], dim=1)
        whole, summed = gather_rows(torch.stack([A, GA], dim=1), rows, partial, group)
        A, GA = whole[:, 0], whole[:, 1]
        BtB = summed[:, :-1].view(-1, rows, rows)
        finite = _all_finite(GA) & torch.isfinite(summed[:, -1])
        return A @ A.transpose(-1, -2), BtB, finite, GA

    @staticmethod
    def _apply(pairs: list[LoraPair], P_A, P_B, ok, finite, cdt, GA=None, group=None) -> None:
        """G_A <- P_A G_A, G_B <- G_B P_B for the layers that are ok; the others keep their gradients.

        Sharded (``group``), ``GA`` holds the whole G_A of every layer and this rank writes its rows of the result.
        """
        if group is None and _layer_by_layer(pairs[0].A.device):  # reading the masks on the host costs nothing
            for i in ok.nonzero()[:, 0].tolist():
                p = pairs[i]
                ga, gb = p.a_matrix(p.A.grad), p.b_matrix(p.B.grad)
                p.A.grad.copy_((P_A[i].to(cdt) @ ga.to(cdt)).view_as(p.A.grad))  # (a reshape may be a copy)
                p.B.grad.copy_((gb.to(cdt) @ P_B[i].to(cdt)).view_as(p.B.grad))
            return
        grads_a = [local(p.A.grad) for p in pairs]
        grads_b = [local(p.B.grad) for p in pairs]
        mine = slice(None) if group is None else local_rows(pairs[0].rank, group)
        GA = torch.stack([p.a_matrix(g) for p, g in zip(pairs, grads_a)]).to(cdt) if GA is None else GA
        GB = torch.stack([p.b_matrix(g) for p, g in zip(pairs, grads_b)]).to(cdt)
        # identity for skipped layers: I @ G is G exactly when G is finite
        new_a = _identity_where(ok, P_A.to(cdt))[:, mine] @ GA
        new_b = GB @ _identity_where(ok, P_B.to(cdt))
        if not bool(finite.all()):  # a host read; the r x r algebra synchronises anyway
            keep = ~finite[:, None, None]
            new_a, new_b = torch.where(keep, GA[:, mine], new_a), torch.where(keep, GB, new_b)
        torch._foreach_copy_(grads_a, [n.view_as(g) for n, g in zip(new_a.unbind(), grads_a)])
        torch._foreach_copy_(grads_b, [n.view_as(g) for n, g in zip(new_b.unbind(), grads_b)])

    def factor_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||A||_F, ||B||_F) of every pair, float32; sharded factors: one all-reduce of squared norms (call it on
        every rank)."""
        group = self.shard_group()
        tensors = [local(p.A.detach()) for p in self.pairs] + [local(p.B.detach()) for p in self.pairs]
        norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
        if group is not None:
            norms = all_sum(norms.square(), group).sqrt()
        return norms[:len(self.pairs)], norms[len(self.pairs):]

    def warn_unknown_state(self, known: tuple) -> None:
        """Warn once per unknown optimizer-state key that a factor rescaling cannot carry along."""
        for pair in self.pairs[:1]:
            for key in self.optimizer.state.get(pair.A, {}):
                if key not in known and key not in self._warned_state:
                    self._warned_state.add(key)
                    warnings.warn(f"{self.method_name}: optimizer state {key!r} of "
                                  f"{type(self.optimizer).__name__} is not rescaled with the factors; "
                                  "use Adam/AdamW/SGD for exact results.", stacklevel=3)

    # ------------------------------------------------------------------ chains: merging and export
    @staticmethod
    def _delta(pair: LoraPair, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """scaling * B @ A laid out like the base layer's weight."""
        base = pair.module.get_base_layer().weight
        dt = torch.promote_types(base.dtype, torch.float32)
        mat = pair.scaling * (pair.b_matrix(B).to(dt) @ pair.a_matrix(A).to(dt))
        if pair.kind == "embedding" or (pair.kind == "linear" and getattr(pair.module, "fan_in_fan_out", False)):
            mat = mat.T
        return mat.reshape(base.shape).to(base.dtype)

    def merge_into_base(self) -> None:
        """Merge each pair's current s * B @ A into its base weight and remember it as a chain link."""
        self._merge([(p.A.detach().clone(), p.B.detach().clone()) for p in self.pairs])

    @torch.no_grad()
    def _merge(self, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        links = getattr(self, "_links", None)
        if links is None:
            links = self._links = [[] for _ in self.pairs]
        for pair, pair_links, (A, B) in zip(self.pairs, links, factors):
            pair.module.get_base_layer().weight.add_(self._delta(pair, A, B))
            pair_links.append((A, B))

    @property
    def chained(self) -> bool:
        """Whether links were merged into the base weights (chains, reinit): the export then has rank K*r."""
        return bool(getattr(self, "_links", None))

    def effective_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{pair name: (A, B, scaling)} of the LoRA to export.

        For chains the merged links and the current link are concatenated, [A_1; ...; A_K] and
        [B_1 ... B_K]: one LoRA of rank K*r with the same scaling reproduces base + all links.
        """
        links = getattr(self, "_links", None) or [[] for _ in self.pairs]
        out = {}
        for pair, pair_links in zip(self.pairs, links):
            As = [a for a, _ in pair_links] + [pair.A.detach()]
            Bs = [b for _, b in pair_links] + [pair.B.detach()]
            key = pair.name if pair.adapter == "default" else f"{pair.name}[{pair.adapter}]"
            out[key] = (torch.cat(As, dim=0), torch.cat(Bs, dim=1), pair.scaling)
        return out

    # ------------------------------------------------------------------ figures for a UI
    @torch.no_grad()
    def stats(self, sstar: bool = True) -> dict:
        """Per-step figures: layers refactored / skipped at the method's last action, balance ||B||/||A||, and with
        ``sstar`` how far S* is from the identity (``_sstar_stats``: about the cost of one RefLoRA step itself, so a
        caller that logs every step asks for it less often).

        Synchronises the device (it reads numbers): call it at logging steps only, and on every rank when the
        factors are sharded (FSDP2: the norms are summed over the ranks).
        """
        na, nb = self.factor_norms()
        ratio = nb / na
        ratio = ratio[torch.isfinite(ratio)]
        last = {k: int(v) for k, v in self._last.items()}
        return {
            **(self._sstar_stats() if sstar else {}),
            "method": self.method_name,
            "step": self.step_count,
            "layers": len(self.pairs),
            "refactored": last["refactored"],
            "skipped": last["skipped_rank_deficient"] + last["skipped_nonfinite"],
            "skipped_rank_deficient": last["skipped_rank_deficient"],
            "skipped_nonfinite": last["skipped_nonfinite"],
            "skipped_total": int(self._total["skipped_rank_deficient"]) + int(self._total["skipped_nonfinite"]),
            "balance_mean": float(ratio.mean()) if ratio.numel() else float("nan"),
            "balance_max": float(ratio.max()) if ratio.numel() else float("nan"),
        }

    def _sstar_stats(self) -> dict:
        """How far RefLoRA's S* of the current factors is from the identity, over the full-rank layers (median and
        max over layers): ``sstar_spread`` = lambda_max / lambda_min of S* (1: S* is a multiple of I, what RefLoRA-S
        can do too), ``sstar_scale`` = det(S*)^(1/r) (1: ||B|| and ||A|| balanced in scale). Whole factors only
        (left out under FSDP2); r x r eighs, cheap at logging steps."""
        if self.shard_group() is not None:
            return {}
        from .linalg import geometric_mean

        spreads, scales = [], []
        for pairs in self._group_pairs().values():
            As = torch.stack([p.a_matrix(p.A.detach()) for p in pairs]).double()
            Bs = torch.stack([p.b_matrix(p.B.detach()) for p in pairs]).double()
            _, S, ok = geometric_mean(As @ As.transpose(-1, -2), Bs.transpose(-1, -2) @ Bs)
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
        state = {
            "method": self.method_name, "step_count": self.step_count,
            "warmup_steps": self.warmup_steps, "interval": self.interval,
            "totals": {k: v.cpu() for k, v in self._total.items()},
            "method_state": self.method.state_dict(),
        }
        links = getattr(self, "_links", None)
        if links:
            state["links"] = [[(a.cpu(), b.cpu()) for a, b in pl] for pl in links]
            state["base_checksums"] = [self._checksum(p) for p in self.pairs]
        return state

    @staticmethod
    def _checksum(pair: LoraPair) -> float:
        return float(pair.module.get_base_layer().weight.double().sum())

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method_name:
            raise ValueError(f"the saved state is for method {state['method']!r}, this Refactorer runs "
                             f"{self.method_name!r}; resume with --method {state['method']}.")
        self.step_count = int(state["step_count"])
        self._total = {k: v.clone() for k, v in state["totals"].items()}
        self.method.load_state_dict(state["method_state"], self)
        links = state.get("links")
        if links:
            if len(links) != len(self.pairs):
                raise ValueError(f"the saved chain has {len(links)} layers, this model {len(self.pairs)}.")
            self._links = [[(a.to(p.A), b.to(p.B)) for a, b in pl] for pl, p in zip(links, self.pairs)]
            # The base weights may come back pristine (only LoRA weights were checkpointed) or already merged
            # (the whole model was): merge the links only where the checksum says they are missing.
            for pair, pl, saved in zip(self.pairs, self._links, state["base_checksums"]):
                weight = pair.module.get_base_layer().weight
                if abs(self._checksum(pair) - saved) <= 1e-6 * (1.0 + float(weight.double().abs().sum())):
                    continue
                for a, b in pl:
                    weight.add_(self._delta(pair, a, b))

    def save(self, directory) -> Path:
        """Write the state to ``directory/refactorer.safetensors`` (tensors + JSON metadata), atomically."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}

        def encode(obj, key):
            if isinstance(obj, torch.Tensor):
                tensors[key] = obj.detach().cpu().contiguous()
                return {"__tensor__": key}
            if isinstance(obj, dict):
                return {k: encode(v, f"{key}.{k}") for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [encode(v, f"{key}.{i}") for i, v in enumerate(obj)]
            return obj

        meta = encode(self.state_dict(), "state")
        path = Path(directory) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"refactorer": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def load(self, directory) -> None:
        """Restore the state written by :meth:`save` (``directory`` or the file itself)."""
        from safetensors import safe_open

        path = Path(directory)
        path = path / STATE_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no Refactorer state at {path}; pass the checkpoint folder that holds "
                                    f"{STATE_FILE}.")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["refactorer"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}

        def decode(obj):
            if isinstance(obj, dict):
                return tensors[obj["__tensor__"]] if set(obj) == {"__tensor__"} else {k: decode(v) for k, v in obj.items()}
            if isinstance(obj, list):
                return [decode(v) for v in obj]
            return obj

        self.load_state_dict(decode(meta))
