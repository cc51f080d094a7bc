"""The LoRA methods as transformations around an optimizer step (METHODS.md sections 2 and 3).

A method sees the Refactorer (pairs, step count, optimizer) and may
- ``setup``: change the optimizer once when attached (LoRA+ parameter groups, a chain's first link);
- ``pre_step``: transform gradients after they are final and before the optimizer reads them;
- ``post_step``: transform factors and optimizer state after the optimizer has moved them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from . import linalg
from .sharding import local

if TYPE_CHECKING:
    from .refactorer import Refactorer


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

    def setup(self, ref: Refactorer) -> None:
        pass

    def pre_step(self, ref: Refactorer) -> None:
        pass

    def post_step(self, ref: Refactorer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, ref: Refactorer) -> None:
        pass


class LoRA(Method):
    """Plain LoRA: the optimizer as it is."""


class Preconditioned(Method):
    """Methods that precondition (G_A, G_B) with r x r matrices built from the Gram matrices."""

    needs_full_rank = True
    uses_warmup = True

    def preconditioner(self) -> Callable:
        raise NotImplementedError

    def pre_step(self, ref: Refactorer) -> None:
        ref.precondition_gradients(self.preconditioner())


class RefLoRA(Preconditioned):
    """Full RefLoRA as a gradient preconditioner: G_A <- S*^-1 G_A, G_B <- G_B S* (METHODS.md 2)."""

    name = "reflora"
    options = {"normalize": False}

    def preconditioner(self):
        return lambda AAt, BtB: linalg.geometric_mean(AAt, BtB, normalize=self.normalize)


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


# Optimizer state that is linear in the gradient (scales like G) and quadratic in it (scales like G^2): torch's
# Adam/AdamW/SGD, and bitsandbytes' optimizers (state1 / state2; their 8-bit blockwise states are uint8 codes times
# a per-block absmax1 / absmax2, so scaling the absmax scales the state exactly; qmap is the shared code book).
_LINEAR_STATE = ("exp_avg", "momentum_buffer", "state1", "absmax1")
_QUADRATIC_STATE = ("exp_avg_sq", "max_exp_avg_sq", "state2", "absmax2")
_UNSCALED_STATE = ("step", "qmap1", "qmap2")


class RefLoRAS(Method):
    """RefLoRA-S (Theorem 5): rescale A <- pA, B <- B/p with p^2 = ||B||_F / ||A||_F so that ||A|| = ||B||.

    The rescaling for step k happens after step k - 1 (as in the authors' code), and for k = 0 before the
    step, together with the gradients. The optimizer state is carried along so that the next step is the one
    the rescaled pair would take: G_A scales by 1/p and G_B by p, so exp_avg(A) /= p, exp_avg_sq(A) /= p^2
    and the reverse for B.
    """

    name = "reflora-s"
    uses_warmup = True

    def pre_step(self, ref: Refactorer) -> None:
        if ref.step_count == 0:  # no previous step to rescale after: rescale now, the gradients along
            self._balance(ref, with_grads=True)

    def post_step(self, ref: Refactorer) -> None:
        self._balance(ref)

    def _balance(self, ref: Refactorer, with_grads: bool = False) -> None:
        # Whole-factor norms (one all-reduce under FSDP2), then every rank rescales its own shards.
        na, nb = ref.factor_norms()
        s = nb / na
        ok = torch.isfinite(s) & (s > 0)
        ref.count(ok, torch.isfinite(na) & torch.isfinite(nb))
        s = torch.where(ok, s, torch.ones_like(s))
        p = s.sqrt()
        p_list, s_list = list(p.unbind()), list(s.unbind())
        inv_p = list((1.0 / p).unbind())
        inv_s = list((1.0 / s).unbind())
        torch._foreach_mul_([local(pair.A.detach()) for pair in ref.pairs], p_list)
        torch._foreach_mul_([local(pair.B.detach()) for pair in ref.pairs], inv_p)
        # What scales like the gradient (by 1/p for A, p for B) and like its square (1/p^2, p^2).
        state = ref.optimizer.state
        tensors, factors = [], []
        for i, pair in enumerate(ref.pairs):
            for param, linear, quadratic in ((pair.A, inv_p[i], inv_s[i]), (pair.B, p_list[i], s_list[i])):
                st = state.get(param, {})
                scaled = [(st.get(k), linear) for k in _LINEAR_STATE]
                scaled += [(st.get(k), quadratic) for k in _QUADRATIC_STATE]
                if with_grads:
                    scaled.append((param.grad, linear))
                for t, f in scaled:
                    if t is not None and t.is_floating_point():  # (8-bit codes scale through their absmax)
                        tensors.append(local(t))
                        factors.append(f)
        if tensors:
            torch._foreach_mul_(tensors, factors)
        ref.warn_unknown_state(_LINEAR_STATE + _QUADRATIC_STATE + _UNSCALED_STATE)


class LoRAPlus(Method):
    """LoRA+: lr(B) = ratio * lr(A), by moving the B factors into their own parameter groups.

    Matches peft's ``create_loraplus_optimizer(loraplus_lr_ratio=ratio)`` for linear and conv LoRA.
    """

    name = "lora+"
    options = {"ratio": 16.0}

    def setup(self, ref: Refactorer) -> None:
        opt = ref.optimizer
        b_ids = {id(p.B) for p in ref.pairs}
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

    def setup(self, ref: Refactorer) -> None:
        self.trains_b = self.draw_trained(len(ref.pairs))
        if any(not t for t in self.trains_b):
            self._reinit(ref)  # a link that trains A must start with A = 0 and B random

    def post_step(self, ref: Refactorer) -> None:
        if ref.step_count % self.chain_every != 0:  # step_count already counts this step
            return
        ref.merge_into_base()
        self.links += 1
        self.trains_b = self.draw_trained(len(ref.pairs))
        self._reinit(ref)
        for pair in ref.pairs:
            ref.optimizer.state.pop(pair.A, None)
            ref.optimizer.state.pop(pair.B, None)

    def _random_like(self, t: torch.Tensor) -> torch.Tensor:
        # peft's default A init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        fan_in = t[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        u = torch.rand(t.shape, generator=self.generator, dtype=torch.float32)
        return ((2 * u - 1) * bound).to(device=t.device, dtype=t.dtype)

    @torch.no_grad()
    def _reinit(self, ref: Refactorer) -> None:
        for pair, trains_b in zip(ref.pairs, self.trains_b):
            if trains_b:  # random A (frozen in RAC-LoRA), B = 0 (trained)
                pair.A.copy_(self._random_like(pair.A))
                pair.B.zero_()
            else:  # A = 0 (trained), random B (frozen)
                pair.A.zero_()
                pair.B.copy_(self._random_like(pair.B.transpose(0, 1)).transpose(0, 1))

    def state_dict(self) -> dict:
        return {"links": self.links, "trains_b": list(self.trains_b), "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict, ref: Refactorer) -> None:
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

    def pre_step(self, ref: Refactorer) -> None:
        for pair, trains_b in zip(ref.pairs, self.trains_b):
            (pair.A if trains_b else pair.B).grad = None  # the frozen factor: the optimizer skips it


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (LoRA, RefLoRA, RefLoRAS, LoRAPlus, ScaledGD, PrecLoRA, NoRAPlus, RACLoRA, Chain)
}
