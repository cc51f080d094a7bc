"""The per-step work of the Refactorer, planned once: buckets, tensor lists, shard group, optimizer state.

A :class:`Plan` is built from the LoRA pairs and the optimizer when the Refactorer first acts and again only when
the optimizer's parameters change (a Trainer shards or replaces them after ``attach``) or its state is replaced or
created (``load_state_dict``, the first Adam step). Each step then runs a fixed number of ops, whatever the number
of layers: whole factors are stacked by side (every A of one width together, every B of one width together,
``Side``), with one Gram, one batched matmul and one multi-tensor copy back per side; FSDP2-sharded factors and a
step where a layer has no gradient go by bucket of equal-shaped pairs (``Bucket``). What grows with the layer count
is Python list building only (the gradients are new tensors every step).

This module is also the one home of the Gram / precondition step (``precondition``) for whole and FSDP2-sharded
factors, on every device; the methods see the plan through :class:`Context`.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Callable

import torch

from .linalg import finite, finite_rows
from .pairs import LoraPair
from .sharding import all_sum, gather_rows, local, local_rows, shard_group

# Optimizer state that is linear in the gradient (scales like G) and quadratic in it (scales like G^2): torch's
# Adam/AdamW/SGD, and bitsandbytes' optimizers (state1 / state2; their 8-bit blockwise states are uint8 codes times
# a per-block absmax1 / absmax2, so scaling the absmax scales the state exactly; qmap is the shared code book).
# Adafactor's factored second moment (row and column means of G^2; V = R C^T / sum R) scales like G^2 under a
# per-layer scalar as well. Schedule-free AdamW's z is a point of the factor's own space (the training point
# interpolates it with the averaged one), so it scales like the factor. Adafactor's RMS is recomputed every step.
LINEAR_STATE = ("exp_avg", "momentum_buffer", "state1", "absmax1")
QUADRATIC_STATE = ("exp_avg_sq", "max_exp_avg_sq", "state2", "absmax2", "exp_avg_sq_row", "exp_avg_sq_col")
PARAM_STATE = ("z",)
UNSCALED_STATE = ("step", "qmap1", "qmap2", "RMS")


_GRAD = operator.attrgetter("grad")  # per-layer reads on the per-step path: map(_GRAD, ...) is the cheapest in Python


def _matrices(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Stack factor-shaped tensors as (n, rows, cols) matrices in ``dtype`` (conv factors are flattened: A is
    r x C_in*k*k, B is C_out x r)."""
    stacked = torch.stack(tensors)
    if stacked.dim() != 3:
        stacked = stacked.flatten(2)
    return stacked if stacked.dtype == dtype else stacked.to(dtype)


def gram(M: torch.Tensor, left: bool) -> torch.Tensor:
    """The r x r Gram of a stack of factors: A A^T for A (left, (n, r, d_in)), B^T B for B ((n, d_out, r))."""
    return torch.bmm(M, M.mT) if left else torch.bmm(M.mT, M)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The r x r algebra's precision for factors of ``dtype``: float64 for float64, else float32 (linalg's docstring)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precondition_into(grads: list[torch.Tensor], P: torch.Tensor, G: torch.Tensor, ok: torch.Tensor, left: bool,
                       kept: torch.Tensor | None = None) -> None:
    """grads <- P G (left) or G P for the layers marked in ``ok`` (n, 1, 1), ``kept`` (default G) for the others:
    exactly their gradients, where a matmul would smear one NaN over a whole column."""
    _copy_rows(grads, torch.where(ok, torch.bmm(P, G) if left else torch.bmm(G, P), G if kept is None else kept))


def _copy_rows(targets: list[torch.Tensor], mats: torch.Tensor) -> None:
    """targets[i] <- mats[i] in one op (``split_with_sizes_copy``, a single fused kernel on CUDA, the one FSDP2
    uses), without a view per layer; conv layouts reshaped. The cast comes first (the op copies within a dtype;
    a gradient has its parameter's dtype, so one per bucket)."""
    if mats.dtype != targets[0].dtype:
        mats = mats.to(targets[0].dtype)
    rows = targets[0].shape[0]
    torch.split_with_sizes_copy(mats.reshape(len(targets) * rows, *targets[0].shape[1:]), [rows] * len(targets),
                                out=targets)


@dataclass
class Batch:
    """One bucket's inputs of a precondition step: Grams, finiteness, stacked gradients and where they go back."""

    AAt: torch.Tensor
    BtB: torch.Tensor
    finite: torch.Tensor | None  # sharded buckets only (Plan.precondition checks whole ones in one pass)
    GA: torch.Tensor  # whole rows (also when sharded: the all-gather brings every rank's rows)
    GB: torch.Tensor  # this rank's rows
    grads_a: list[torch.Tensor]
    grads_b: list[torch.Tensor]


class Bucket:
    """Pairs whose factors have equal shapes, dtypes and device: one stack, one batched matmul, one collective."""

    def __init__(self, pairs: list[LoraPair], index: list[int], group):
        self.pairs, self.index, self.group = pairs, index, group
        self.A = [p.A for p in pairs]
        self.B = [p.B for p in pairs]
        self.rank = pairs[0].rank
        self.dtype, self.device = self.A[0].dtype, self.A[0].device
        self.cdt = compute_dtype(self.dtype)

    def stale(self) -> bool:
        return self.A[0].dtype != self.dtype or self.A[0].device != self.device

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) stacked as (n, r, d_in), (n, d_out, r) whole matrices (not for sharded factors)."""
        return _matrices(self.A, dtype or self.cdt), _matrices(self.B, dtype or self.cdt)

    def grams(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A A^T, B^T B, A, B) of whole factors, stacked (A, B as in ``factors``)."""
        A, B = self.factors(dtype)
        return gram(A, True), gram(B, False), A, B

    def gather(self) -> Batch | None:
        """Grams and stacked gradients (and, sharded, gradient finiteness; whole factors get theirs in one pass over
        every bucket from ``Plan.precondition``); None when a layer has no gradient this step."""
        grads_a = [p.grad for p in self.A]
        grads_b = [p.grad for p in self.B]
        if any(g is None for g in grads_a) or any(g is None for g in grads_b):
            return None  # (a layer without a gradient this step: the whole bucket is left to the optimizer)
        if self.group is None:
            AAt, BtB, _, _ = self.grams()
            return Batch(AAt, BtB, None, _matrices(grads_a, self.cdt), _matrices(grads_b, self.cdt), grads_a, grads_b)
        # FSDP2: one all-gather of the rows of A and G_A with the partial B_i^T B_i and ||G_B,i||^2 of every rank
        grads_a, grads_b = [local(g) for g in grads_a], [local(g) for g in grads_b]
        A = _matrices([local(t.detach()) for t in self.A], self.cdt)
        B = _matrices([local(t.detach()) for t in self.B], self.cdt)
        GA, GB = _matrices(grads_a, self.cdt), _matrices(grads_b, self.cdt)
        partial = torch.cat([gram(B, False).flatten(1), GB.square().sum((1, 2))[:, None]], dim=1)
        whole, summed = gather_rows(torch.stack([A, GA], dim=1), self.rank, partial, self.group)
        A, GA = whole[:, 0], whole[:, 1]
        BtB = summed[:, :-1].view(-1, self.rank, self.rank)
        ok = finite(GA.sum(dim=(-2, -1)) + summed[:, -1])
        return Batch(gram(A, True), BtB, ok, GA, GB, grads_a, grads_b)

    def apply(self, batch: Batch, P_A: torch.Tensor, P_B: torch.Tensor, ok: torch.Tensor) -> None:
        """G_A <- P_A G_A, G_B <- G_B P_B for the layers marked in ``ok`` (n, 1, 1); the others keep their gradients
        exactly (their factors or gradients are not finite, where a matmul would smear one NaN over a whole column,
        or their preconditioner is not valid). Sharded, each rank writes its rows of G_A."""
        GA_mine = None
        if self.group is not None:
            mine = local_rows(self.rank, self.group)
            P_A, GA_mine = P_A[:, mine], batch.GA[:, mine]
        _precondition_into(batch.grads_a, P_A, batch.GA, ok, True, GA_mine)
        _precondition_into(batch.grads_b, P_B, batch.GB, ok, False)


class Side:
    """The A (or B) factors of a rank group that share one shape, whatever their pairs' other factor: A (r x d_in)
    is shared by every projection reading width d_in, B (d_out x r) by every one writing d_out (SD 1.5's attention:
    6 pair shapes, 4 A shapes, 3 B shapes). Whole factors get one stack, one Gram, one batched matmul and one copy
    back per side, not per pair shape."""

    def __init__(self, factors: list[torch.Tensor], left: bool):
        self.factors, self.left, self.cdt = factors, left, compute_dtype(factors[0].dtype)

    def gram(self) -> torch.Tensor:
        return gram(_matrices(self.factors, self.cdt), self.left)


class RankGroup:
    """Buckets of one rank on one device: their r x r problems are solved in one batched call. For whole factors the
    A and B sides are grouped by shape (``Side``); the r x r algebra runs in B-side order, and ``to_b`` / ``to_a``
    (None when the orders agree) carry the A side's Grams into it and its preconditioners back."""

    def __init__(self, buckets: list[Bucket]):
        self.buckets = buckets
        pairs = [p for b in buckets for p in b.pairs]  # the buckets' order, the bucket path's
        self.a_sides, a_order = self._sides(pairs, "A")
        self.b_sides, b_order = self._sides(pairs, "B")
        self.to_b = self.to_a = None
        if a_order != b_order:
            a, b = torch.tensor(a_order), torch.tensor(b_order)
            self.to_b, self.to_a = a.argsort()[b].to(buckets[0].device), b.argsort()[a].to(buckets[0].device)

    @staticmethod
    def _sides(pairs: list[LoraPair], name: str) -> tuple[list[Side], list[int]]:
        """The sides of factor ``name`` ("A" or "B") and the order of the pairs in them."""
        keyed: dict[tuple, list[int]] = {}
        for i, p in enumerate(pairs):
            t = getattr(p, name)
            keyed.setdefault((tuple(t.shape), t.dtype), []).append(i)
        sides = [Side([getattr(pairs[i], name) for i in idx], name == "A") for idx in keyed.values()]
        return sides, [i for idx in keyed.values() for i in idx]

    def precondition_sides(self, preconditioner: Callable, count: Callable) -> bool:
        """``Plan.precondition`` for whole factors, by side; False (nothing done) when a layer has no gradient this
        step, which the bucket path handles."""
        grads_a = [list(map(_GRAD, side.factors)) for side in self.a_sides]
        grads_b = [list(map(_GRAD, side.factors)) for side in self.b_sides]
        if any(map(operator.is_, chain.from_iterable(grads_a + grads_b), repeat(None))):
            return False
        GA = [_matrices(gs, side.cdt) for side, gs in zip(self.a_sides, grads_a)]
        GB = [_matrices(gs, side.cdt) for side, gs in zip(self.b_sides, grads_b)]
        AAt = torch.cat([side.gram() for side in self.a_sides])
        BtB = torch.cat([side.gram() for side in self.b_sides])
        # finiteness of each layer's Grams and gradients from their sums (a sum past the range counts as non-finite)
        sums_a = AAt.sum(dim=(-2, -1)) + torch.cat([G.sum(dim=(-2, -1)) for G in GA])
        sums_b = BtB.sum(dim=(-2, -1)) + torch.cat([G.sum(dim=(-2, -1)) for G in GB])
        if self.to_b is not None:  # the r x r algebra runs in B-side order
            AAt, sums_a = AAt[self.to_b], sums_a[self.to_b]
        fin = finite(sums_a + sums_b)
        P_A, P_B, ok = preconditioner(AAt, BtB)
        ok = ok & fin
        count(ok, fin)
        ok_a = ok_b = ok.view(-1, 1, 1)
        if self.to_a is not None:  # and back into A-side order
            P_A, ok_a = P_A[self.to_a], ok_b[self.to_a]
        # one split per tensor, not a slice per side; invalid layers keep their gradients (not P = I: exact)
        for sides, grads, Gs, P, oks in ((self.a_sides, grads_a, GA, P_A, ok_a), (self.b_sides, grads_b, GB, P_B, ok_b)):
            sizes = [len(gs) for gs in grads]
            for side, gs, G, P_side, ok_side in zip(sides, grads, Gs, P.split(sizes), oks.split(sizes)):
                _precondition_into(gs, P_side.to(side.cdt), G, ok_side, side.left)
        return True


class Plan:
    """Everything per step that does not change between steps: see the module docstring."""

    def __init__(self, pairs: list[LoraPair], optimizer: torch.optim.Optimizer | None):
        self.pairs, self.optimizer = pairs, optimizer
        if any(p.A.dim() < 2 or p.B.dim() < 2 for p in pairs):
            raise ValueError("the LoRA factors are flattened (FSDP1 / FullyShardedDataParallel); the core supports "
                             "FSDP2: set fsdp_version: 2 in the accelerate config (fully_shard)")
        self.A = [p.A for p in pairs]
        self.B = [p.B for p in pairs]
        groups = {id(g): g for g in (shard_group(t) for t in self.A + self.B)}
        if len(groups) > 1:
            raise ValueError("some LoRA factors are sharded and others not (or over different groups); shard the "
                             "whole model with FSDP2's fully_shard")
        self.group = next(iter(groups.values()))
        keyed: dict[tuple, list[int]] = {}
        for i, (a, b) in enumerate(zip(self.A, self.B)):
            keyed.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, b.dtype, a.device), []).append(i)
        self.buckets = [Bucket([pairs[i] for i in idx], idx, self.group) for idx in keyed.values()]
        by_rank: dict[tuple, list[Bucket]] = {}
        for b in self.buckets:
            by_rank.setdefault((b.rank, b.device), []).append(b)
        self.rank_groups = [RankGroup(bs) for bs in by_rank.values()]
        self._signature = self._optimizer_params()
        self._state_key = None
        self._scaling: list[tuple[list[torch.Tensor], list[int]]] = []

    # ------------------------------------------------------------------ validity
    def _optimizer_params(self) -> list:
        if self.optimizer is None:
            return []
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def current(self, optimizer) -> bool:
        """Whether this plan still describes ``optimizer``'s parameters (cheap: identities, one dtype per bucket)."""
        if optimizer is not self.optimizer:
            return False
        params = self._optimizer_params()
        return (len(params) == len(self._signature) and all(map(operator.is_, params, self._signature))
                and not any(b.stale() for b in self.buckets))

    # ------------------------------------------------------------------ preconditioning (Theorem 3 and its kin)
    def precondition(self, preconditioner: Callable, count: Callable) -> None:
        """G_A <- P_A G_A, G_B <- G_B P_B with (P_A, P_B, ok) = preconditioner(A A^T, B^T B), batched.

        The r x r algebra gets one batched preconditioner call per (rank, device), on float32 Grams (float64 for
        float64 factors); it picks its precision (linalg's docstring). A layer whose factors or gradients are not
        finite keeps exactly the gradients it had and is counted in ``skipped_nonfinite``; the other layers of its
        batch are unaffected. Under FSDP2 each bucket does one all-gather and the same r x r algebra on every rank.
        """
        for rank_group in self.rank_groups:
            if self.group is None and rank_group.precondition_sides(preconditioner, count):
                continue
            parts = [(b, batch) for b in rank_group.buckets if (batch := b.gather()) is not None]
            if not parts:
                continue
            cat = (lambda ts: ts[0]) if len(parts) == 1 else torch.cat
            AAt = cat([batch.AAt for _, batch in parts])
            BtB = cat([batch.BtB for _, batch in parts])
            if self.group is None:  # every gradient's norm in one multi-tensor op (overflow counts as non-finite)
                grads = [g for _, b in parts for g in b.grads_a] + [g for _, b in parts for g in b.grads_b]
                norms = torch.stack(torch._foreach_norm(grads, 2, dtype=AAt.dtype))
                fin = finite(norms[:len(AAt)] + norms[len(AAt):] + AAt.sum(dim=(-2, -1)) + BtB.sum(dim=(-2, -1)))
            else:
                fin = cat([batch.finite for _, batch in parts]) & finite_rows(AAt, BtB)
            P_A, P_B, ok = preconditioner(AAt, BtB)
            ok = ok & fin
            count(ok, fin)
            # one split per tensor, not a slice per bucket; invalid layers keep their gradients (not P = I: exact)
            sizes = [len(batch.grads_a) for _, batch in parts]
            oks = ok.view(-1, 1, 1).split(sizes)
            P_As, P_Bs = P_A.to(AAt.dtype).split(sizes), P_B.to(AAt.dtype).split(sizes)
            for (bucket, batch), P_A, P_B, ok in zip(parts, P_As, P_Bs, oks):
                bucket.apply(batch, P_A, P_B, ok)

    # ------------------------------------------------------------------ norms and rescaling (RefLoRA-S)
    def factor_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||A||_F, ||B||_F) of every pair, float32; sharded factors: one all-reduce of squared norms."""
        tensors = self.A + self.B if self.group is None else [local(t.detach()) for t in self.A + self.B]
        norms = torch.stack(torch._foreach_norm(tensors))
        norms = norms if norms.dtype == torch.float32 else norms.float()
        if self.group is not None:
            norms = all_sum(norms.square(), self.group).sqrt()
        n = len(self.pairs)
        return norms[:n], norms[n:]

    def _current_state(self):
        state = self.optimizer.state
        return id(state), tuple(map(id, map(state.get, self.A + self.B)))

    def scaling_lists(self, warn: Callable) -> list[tuple[list[torch.Tensor], list[int]]]:
        """Per (device, dtype): the tensors RefLoRA-S rescales and, for each, the row of its factor in a (4 n,)
        vector of scales [p; 1/p; p^2; 1/p^2] (n layers): A by p, B by 1/p; what scales like the gradient by 1/p
        (A) and p (B), like its square by 1/p^2 and p^2. Rebuilt when the optimizer state is created or replaced."""
        key = self._current_state()
        if key == self._state_key:
            return self._scaling
        n = len(self.pairs)
        groups: dict[tuple, tuple[list, list]] = {}
        state = self.optimizer.state

        def add(t, row):
            if t is not None and t.is_floating_point():  # (8-bit codes scale through their absmax)
                t = local(t)
                tensors, rows = groups.setdefault((t.device, t.dtype), ([], []))
                tensors.append(t)
                rows.append(row)

        for i in range(n):
            for param, own, linear, quadratic in ((self.A[i], i, n + i, 3 * n + i), (self.B[i], n + i, i, 2 * n + i)):
                add(param.detach() if self.group is not None else param, own)
                st = state.get(param, {})
                for k in PARAM_STATE:
                    add(st.get(k), own)
                for k in LINEAR_STATE:
                    add(st.get(k), linear)
                for k in QUADRATIC_STATE:
                    add(st.get(k), quadratic)
        warn(LINEAR_STATE + QUADRATIC_STATE + PARAM_STATE + UNSCALED_STATE)
        self._scaling, self._state_key = list(groups.values()), key
        return self._scaling

    def state_of(self, params: list[torch.Tensor], keys: tuple) -> dict[str, list[torch.Tensor]]:
        """{key: [state[p][key] for p in params]} for the keys every one of ``params`` holds as a tensor of its shape."""
        out = {}
        state = self.optimizer.state
        for k in keys:
            ts = [state.get(p, {}).get(k) for p in params]
            if all(t is not None and t.is_floating_point() and t.shape == p.shape for t, p in zip(ts, params)):
                out[k] = ts
        return out


@dataclass
class Context:
    """What a method sees: the plan (pairs, buckets, batched Gram / precondition / rescaling), the optimizer, the
    optimizer steps taken so far, the chain links, and ``count`` for the per-layer outcome of its action."""

    plan: Plan
    optimizer: torch.optim.Optimizer
    links: object  # links.Links
    count: Callable[[torch.Tensor, torch.Tensor], None]
    warn_state: Callable[[tuple], None]
    method_name: str
    step: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def pairs(self) -> list[LoraPair]:
        return self.plan.pairs

    def precondition(self, preconditioner: Callable) -> None:
        self.plan.precondition(preconditioner, self.count)

    def whole_factors(self, what: str) -> None:
        if self.plan.group is not None:
            raise ValueError(f"{what} needs whole factors on each process; use DDP, or "
                             "apply_to='gradient' (the default) with FSDP2")


def warn_unknown_state(optimizer, pairs, known: tuple, warned: set, method_name: str) -> None:
    """Warn once per unknown optimizer-state key that a factor rescaling cannot carry along."""
    for pair in pairs[:1]:
        for key in optimizer.state.get(pair.A, {}):
            if key not in known and key not in warned:
                warned.add(key)
                warnings.warn(f"{method_name}: optimizer state {key!r} of {type(optimizer).__name__} is not rescaled "
                              "with the factors; use Adam/AdamW/SGD for exact results.", stacklevel=4)
