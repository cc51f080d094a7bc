"""The LoRA methods as transformations around an optimizer step (docs/methods.md sections 2 and 3).

A method sees a ``plan.Context`` (the pairs and their batched plan, the optimizer, the step count, the chain links)
and may
- ``setup``: change the optimizer once when attached (LoRA+ parameter groups, a chain's first link);
- ``pre_step``: transform gradients after they are final and before the optimizer reads them;
- ``finish_step``: change the step the optimizer has just taken (RefLoRA's apply_to="update");
- ``post_step``: transform factors and optimizer state after the optimizer has moved them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import linalg
from .linalg import _identity_where, finite, finite_rows
from .plan import (LINEAR_STATE, PARAM_STATE, QUADRATIC_STATE, UNSCALED_STATE, Context, _copy_rows,
                   _matrices)
from .sharding import local


class Method:
    name = "lora"
    needs_full_rank = False  # the r x r algebra assumes A and B of full rank r
    uses_warmup = False  # plain LoRA steps for the first warmup_steps (refactoring needs B != 0)
    merges_links = False  # merges links into the base weight (chains): the export then concatenates them
    options: dict = {}  # option name -> default

    def __init__(self, **options):
        unknown = set(options) - set(self.options)
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise TypeError(f"method {self.name!r} got unknown option(s) {sorted(unknown)}; its options are: {known}.")
        for key, default in self.options.items():
            setattr(self, key, options.get(key, default))

    def setup(self, ctx: Context) -> None:
        pass

    def pre_step(self, ctx: Context) -> None:
        pass

    def post_step(self, ctx: Context) -> None:
        pass

    def finish_step(self, ctx: Context) -> None:
        """After every optimizer step, before ``post_step`` (whether or not the method acts next)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, ctx: Context) -> None:
        pass


class LoRA(Method):
    """Plain LoRA: the optimizer as it is."""


class Preconditioned(Method):
    """Methods that precondition (G_A, G_B) with r x r matrices built from the Gram matrices."""

    needs_full_rank = True
    uses_warmup = True

    def preconditioner(self) -> Callable:
        raise NotImplementedError

    def pre_step(self, ctx: Context) -> None:
        ctx.precondition(self.preconditioner())


class RefLoRA(Preconditioned):
    """Full RefLoRA (docs/methods.md 2). ``apply_to`` says where S* acts, which matters only with an adaptive optimizer
    (for plain gradient steps all three are the same first-order step, Theorem 3):

    - "gradient" (the paper's and the default): G_A <- S*^-1 G_A, G_B <- G_B S* before the optimizer reads them;
      Adam's moments stay in the original coordinates and its per-coordinate scaling partly undoes S*.
    - "update": the optimizer takes its step (U_A, U_B) as it would, which is then replaced by (S*^-1 U_A, U_B S*),
      S* from the factors before the step. Moments in the original coordinates, S* applied after Adam's scaling.
    - "factors": before each step, refactor the pair to its balanced form A <- P A, B <- B P^-1 with P = S*^1/2
      (then A A^T = B^T B; S* of the new pair is I) and carry the optimizer's moments into the new coordinates:
      linear state (exp_avg, momentum) like the gradient, G_A -> P^-1 G_A, G_B -> G_B P; Adam's diagonal second
      moment by the squared entries of the same matrices (exact for a diagonal P, RefLoRA-S's case). The optimizer
      then steps in the balanced factorization, which is RefLoRA's "refactor, step" without the refactoring back.
    """

    name = "reflora"
    options = {"normalize": False, "apply_to": "gradient"}
    APPLY_TO = ("gradient", "update", "factors")

    def __init__(self, **options):
        super().__init__(**options)
        if self.apply_to not in self.APPLY_TO:
            raise ValueError(f"apply_to={self.apply_to!r} is unknown; use one of {', '.join(self.APPLY_TO)}.")
        self._before: list | None = None

    def setup(self, ctx: Context) -> None:
        if self.apply_to == "factors":
            _refuse_state_change(ctx, "reflora apply_to='factors'", factored=True)

    def preconditioner(self):
        # Theorem 3: S* = (A A^T)^-1 # (B^T B); G_A <- S*^-1 G_A, G_B <- G_B S*
        return lambda AAt, BtB: linalg.geometric_mean(AAt, BtB, normalize=self.normalize)

    def pre_step(self, ctx: Context) -> None:
        if self.apply_to == "gradient":
            ctx.precondition(self.preconditioner())
        elif self.apply_to == "update":
            ctx.whole_factors(f"reflora apply_to={self.apply_to!r}")
            self._before = [(p.A.detach().clone(), p.B.detach().clone()) for p in ctx.pairs]
        elif ctx.step == 0:  # "factors", no previous step to balance after: balance now, gradients along
            self._balance(ctx, with_grads=True)

    def post_step(self, ctx: Context) -> None:
        if self.apply_to == "factors":
            self._balance(ctx)

    def finish_step(self, ctx: Context) -> None:
        """"update": replace the step the optimizer just took by its preconditioned form."""
        if self._before is None:
            return
        before, self._before = self._before, None
        grads = []
        for pair, (a0, b0) in zip(ctx.pairs, before):
            if pair.A.grad is None or pair.B.grad is None:  # not stepped (frozen this step)
                continue
            grads.append((pair, pair.A.grad, pair.B.grad))
            pair.A.grad, pair.B.grad = pair.A.detach() - a0, pair.B.detach() - b0  # the step, read as a "gradient"
            pair.A.copy_(a0)
            pair.B.copy_(b0)
        ctx.precondition(self.preconditioner())  # S* of the factors before the step
        for pair, ga, gb in grads:
            pair.A.add_(pair.A.grad)
            pair.B.add_(pair.B.grad)
            pair.A.grad, pair.B.grad = ga, gb

    @torch.no_grad()
    def _balance(self, ctx: Context, with_grads: bool = False) -> None:
        """A <- P A, B <- B P^-1 (P = S*^1/2) per bucket, the optimizer's moments and (step 0) gradients along."""
        ctx.whole_factors(f"reflora apply_to={self.apply_to!r}")
        plan = ctx.plan
        for rank_group in plan.rank_groups:
            grams = [b.grams() for b in rank_group.buckets]
            AAt = torch.cat([g[0] for g in grams])
            BtB = torch.cat([g[1] for g in grams])
            finite = finite_rows(AAt, BtB)
            _, S, ok = linalg.geometric_mean(AAt, BtB)
            ok = ok & finite
            ctx.count(ok, finite)
            w, v = torch.linalg.eigh(S.double())
            root = w.clamp_min(0).sqrt()
            P = _identity_where(ok, (v * root[:, None, :]) @ v.mT)  # S*^1/2 (identity where not ok)
            P_inv = _identity_where(ok, (v / root[:, None, :]) @ v.mT)
            start = 0
            for bucket, (_, _, A, B) in zip(rank_group.buckets, grams):
                sel = slice(start, start + len(bucket.pairs))
                start += len(bucket.pairs)
                pa, pa_inv = P[sel].to(bucket.cdt), P_inv[sel].to(bucket.cdt)
                _copy_rows(bucket.A, torch.bmm(pa, A))
                _copy_rows(bucket.B, torch.bmm(B, pa_inv))
                # what scales like the gradient (G_A -> P^-1 G_A, G_B -> G_B P) and like its square, entrywise
                for params, left, g_map, f_map in ((bucket.A, True, pa_inv, pa), (bucket.B, False, pa, pa_inv)):
                    todo = [(ts, f_map) for ts in plan.state_of(params, PARAM_STATE).values()]
                    todo += [(ts, g_map) for ts in plan.state_of(params, LINEAR_STATE).values()]
                    todo += [(ts, g_map.square()) for ts in plan.state_of(params, QUADRATIC_STATE).values()]
                    if with_grads and all(p.grad is not None for p in params):
                        todo.append(([p.grad for p in params], g_map))
                    for ts, M in todo:
                        X = _matrices(ts, bucket.cdt)
                        _copy_rows(ts, torch.bmm(M, X) if left else torch.bmm(X, M))
        ctx.warn_state(LINEAR_STATE + QUADRATIC_STATE + PARAM_STATE + UNSCALED_STATE)


def state_change_refusal(what: str, optimizer_name: str, factored: bool) -> str | None:
    """Why a method that changes the factors' coordinates cannot carry this optimizer's state exactly, or None.

    ``factored``: the change is an r x r matrix (RefLoRA apply_to="factors"), not a per-layer scalar (RefLoRA-S)."""
    if "Prodigy" in optimizer_name or optimizer_name.lower() == "prodigy":
        return (f"{what} rescales the factors and their optimizer state, which Prodigy's step-size estimate (sums "
                "over all parameters) does not follow; use --method reflora (S* on the gradient, which Prodigy reads "
                "like any gradient) or AdamW / Adafactor / schedule-free AdamW")
    if factored and optimizer_name.lower() == "adafactor":
        return (f"{what} maps the optimizer state by r x r matrices, which Adafactor's factored second moment cannot "
                "carry; use apply_to='gradient' (the default), or reflora-s, with Adafactor")
    return None


def _refuse_state_change(ctx: Context, what: str, factored: bool) -> None:
    reason = state_change_refusal(what, type(ctx.optimizer).__name__, factored)
    if reason:
        raise ValueError(reason)


class ScaledGD(Preconditioned):
    """ScaledGD: G_A <- (B^T B)^-1 G_A, G_B <- G_B (A A^T)^-1."""

    name = "scaledgd"

    def preconditioner(self):
        return linalg.scaled_gd


class PrecLoRA(Preconditioned):
    """Riemannian preconditioned LoRA: ScaledGD with damping delta; matches peft's create_riemannian_optimizer(reg=delta)."""

    name = "preclora"
    options = {"delta": 1e-2}

    def preconditioner(self):
        return lambda AAt, BtB: linalg.scaled_gd(AAt, BtB, self.delta)


class NoRAPlus(Preconditioned):
    """NoRA+: Frobenius-normalised ScaledGD preconditioners with damping delta."""

    name = "nora+"
    options = {"delta": 1e-6}

    def preconditioner(self):
        return lambda AAt, BtB: linalg.normalized_scaled_gd(AAt, BtB, self.delta)


class RefLoRAS(Method):
    """RefLoRA-S (Theorem 5): rescale A <- pA, B <- B/p with p^2 = ||B||_F / ||A||_F so that ||A|| = ||B||.

    The rescaling for step k happens after step k - 1 (as in the authors' code), and for k = 0 before the
    step, together with the gradients. The optimizer state is carried along so that the next step is the one
    the rescaled pair would take: G_A scales by 1/p and G_B by p, so exp_avg(A) /= p, exp_avg_sq(A) /= p^2
    and the reverse for B.
    """

    name = "reflora-s"
    uses_warmup = True

    def setup(self, ctx: Context) -> None:
        _refuse_state_change(ctx, "reflora-s", factored=False)

    def pre_step(self, ctx: Context) -> None:
        if ctx.step == 0:  # no previous step to rescale after: rescale now, the gradients along
            self._balance(ctx, with_grads=True)

    def post_step(self, ctx: Context) -> None:
        self._balance(ctx)

    @torch.no_grad()
    def _balance(self, ctx: Context, with_grads: bool = False) -> None:
        # Whole-factor norms (one all-reduce under FSDP2), then every rank rescales its own shards.
        plan = ctx.plan
        na, nb = plan.factor_norms()
        s = nb / na
        ok = finite(s) & (s > 0)
        ctx.count(ok, finite(na) & finite(nb))
        s = torch.where(ok, s, torch.ones_like(s))
        p = s.sqrt()
        # One host read of the per-layer scales (float32 values, exact as Python floats): with plain numbers as
        # the scale list, one multi-tensor call per (device, dtype) scales every factor and moment (fused kernels
        # on CUDA) instead of one kernel per tensor, which a list of 0-dim tensors costs. Rows: Plan.scaling_lists.
        values = torch.cat((p, 1.0 / p, s, 1.0 / s)).tolist()
        for tensors, rows in plan.scaling_lists(ctx.warn_state):
            torch._foreach_mul_(tensors, [values[r] for r in rows])
        if with_grads:  # G_A by 1/p, G_B by p
            n = len(plan.pairs)
            grads = [(local(t.grad), values[n + i if k == 0 else i])
                     for k, ts in enumerate((plan.A, plan.B)) for i, t in enumerate(ts) if t.grad is not None]
            for g, f in grads:
                g.mul_(f)


class LoRAPlus(Method):
    """LoRA+: lr(B) = ratio * lr(A), by moving the B factors into their own parameter groups.

    Matches peft's ``create_loraplus_optimizer(loraplus_lr_ratio=ratio)`` for linear and conv LoRA.
    """

    name = "lora+"
    options = {"ratio": 16.0}

    def setup(self, ctx: Context) -> None:
        opt = ctx.optimizer
        b_ids = {id(p.B) for p in ctx.pairs}
        for group in list(opt.param_groups):
            moved = [p for p in group["params"] if id(p) in b_ids]
            if not moved:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in b_ids]
            new = {k: v for k, v in group.items() if k != "params"}
            new["lr"] = group["lr"] * self.ratio
            if "initial_lr" in group:
                new["initial_lr"] = group["initial_lr"] * self.ratio
            opt.add_param_group({"params": moved, **new})
            if not group["params"]:
                opt.param_groups.remove(group)


class Chain(Method):
    """Chain of LoRA (COLA): every ``chain_every`` steps merge s*B*A into the base weight, start a fresh
    link (A random, B zero) and reset the optimizer state of the factors."""

    name = "cola"
    merges_links = True
    options = {"chain_every": 100, "seed": 0}

    def __init__(self, **options):
        super().__init__(**options)
        if int(self.chain_every) < 1:
            raise ValueError(f"chain_every must be a positive number of steps, got {self.chain_every}.")
        self.generator = torch.Generator().manual_seed(int(self.seed))
        self.links = 0
        self.trains_b: list[bool] = []

    def draw_trained(self, n: int) -> list[bool]:
        return [True] * n  # COLA trains both factors; "True" means B starts at zero

    def setup(self, ctx: Context) -> None:
        self.trains_b = self.draw_trained(len(ctx.pairs))
        if any(not t for t in self.trains_b):
            self._reinit(ctx)  # a link that trains A must start with A = 0 and B random

    def post_step(self, ctx: Context) -> None:
        if ctx.step % self.chain_every != 0:  # step_count already counts this step
            return
        ctx.links.merge()
        self.links += 1
        self.trains_b = self.draw_trained(len(ctx.pairs))
        self._reinit(ctx)
        for pair in ctx.pairs:
            ctx.optimizer.state.pop(pair.A, None)
            ctx.optimizer.state.pop(pair.B, None)

    def _random_like(self, t: torch.Tensor) -> torch.Tensor:
        # peft's default A init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        fan_in = t[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        u = torch.rand(t.shape, generator=self.generator, dtype=torch.float32)
        return ((2 * u - 1) * bound).to(device=t.device, dtype=t.dtype)

    @torch.no_grad()
    def _reinit(self, ctx: Context) -> None:
        for pair, trains_b in zip(ctx.pairs, self.trains_b):
            if trains_b:  # random A (frozen in RAC-LoRA), B = 0 (trained)
                pair.A.copy_(self._random_like(pair.A))
                pair.B.zero_()
            else:  # A = 0 (trained), random B (frozen)
                pair.A.zero_()
                pair.B.copy_(self._random_like(pair.B.transpose(0, 1)).transpose(0, 1))

    def state_dict(self) -> dict:
        return {"links": self.links, "trains_b": list(self.trains_b), "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict, ctx: Context) -> None:
        self.links = int(state["links"])
        self.trains_b = [bool(t) for t in state["trains_b"]]
        self.generator.set_state(state["rng"])


class RACLoRA(Chain):
    """RAC-LoRA: a chain whose links train one factor from zero while the other is random and frozen.

    ``p`` is the probability that a layer's link trains B (A random and frozen); 1.0 always trains B,
    0.0 always trains A, and in between each layer draws independently at the start of every link.
    """

    name = "rac-lora"
    options = {"chain_every": 100, "p": 1.0, "seed": 0}

    def __init__(self, **options):
        super().__init__(**options)
        if not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"p is a probability (of training B in a link), got {self.p}; use a value in [0, 1].")

    def draw_trained(self, n: int) -> list[bool]:
        return (torch.rand(n, generator=self.generator) < float(self.p)).tolist()

    def pre_step(self, ctx: Context) -> None:
        for pair, trains_b in zip(ctx.pairs, self.trains_b):
            (pair.A if trains_b else pair.B).grad = None  # the frozen factor: the optimizer skips it


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (LoRA, RefLoRA, RefLoRAS, LoRAPlus, ScaledGD, PrecLoRA, NoRAPlus, RACLoRA, Chain)
}
