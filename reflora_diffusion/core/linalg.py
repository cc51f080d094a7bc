"""Batched r x r algebra for the LoRA methods (docs/methods.md sections 2 and 3).

Every function takes stacks of Gram matrices ``AAt = A A^T`` and ``BtB = B^T B`` shaped (n, r, r) and
returns a pair of r x r preconditioners ``(P_A, P_B)`` and a validity mask: the gradient update is
``G_A <- P_A G_A``, ``G_B <- G_B P_B``. Invalid layers (rank-deficient or non-finite factors) get the
identity so their gradients pass through untouched. The Refactorer passes float32 Grams (float64 for
float64 factors); scaled_gd and normalized_scaled_gd work in float64, geometric_mean in float32 where that
is accurate (see FAST_COND) and in float64 elsewhere.
"""

from __future__ import annotations

import torch

# Relative eigenvalue floor for the Gram matrices: below this fraction of the largest eigenvalue a factor
# counts as rank-deficient (its Gram is computed in float32, so smaller eigenvalues are rounding noise).
RANK_TOL = 1e-6


def finite(x: torch.Tensor) -> torch.Tensor:
    """Elementwise isfinite in two ops (x * 0 is 0 exactly for finite x, NaN for inf and NaN); torch.isfinite
    dispatches four."""
    return (x * 0) == 0


def finite_rows(*stacks: torch.Tensor) -> torch.Tensor:
    """Per matrix of (n, rows, cols) stacks: whether every entry of each is finite, in a few ops: a matrix's sum is
    NaN or inf when an entry is (a sum past the dtype's range counts as non-finite too, as the r x r algebra on it
    would overflow)."""
    total = stacks[0].sum(dim=(-2, -1))
    for s in stacks[1:]:
        total = total + s.sum(dim=(-2, -1))
    return finite(total)


def _eigh(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """eigh of a stack of symmetric matrices; returns (eigenvalues clamped at the floor, vectors, ok mask)."""
    fin = finite_rows(sym)
    sym = torch.where(fin[:, None, None], sym, torch.eye(sym.shape[-1], dtype=sym.dtype, device=sym.device))
    sym = 0.5 * (sym + sym.transpose(-1, -2))
    w, v = torch.linalg.eigh(sym)
    top = w[:, -1:]
    ok = fin & (top[:, 0] > 0) & (w[:, 0] > RANK_TOL * top[:, 0])
    floor = (RANK_TOL * top).clamp_min(torch.finfo(w.dtype).tiny)
    return torch.maximum(w, floor), v, ok


def _identity_where(mask: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
    return torch.where(mask[:, None, None], mats, eye)


# The float32 path of geometric_mean takes a layer only when both r x r problems are well conditioned:
# cond(A A^T) (an upper bound from the Cholesky factor) and cond(M^T M) below FAST_COND. Its relative error
# grows like eps32 * cond (~1e-7 * 1e3 = 1e-4 at the limit); every other layer (ill-conditioned,
# rank-deficient, non-finite) is recomputed by the float64 two-eigh path, which applies the RANK_TOL checks.
FAST_COND = 1e3


def _geometric_mean_eigh(AAt: torch.Tensor, BtB: torch.Tensor):
    """Two eighs in the input's dtype: (S*^-1, S*, ok, log det S*); the reference (float64) path."""
    wa, va, ok_a = _eigh(AAt)
    a = wa.sqrt()
    K = torch.bmm(torch.bmm(va.mT, BtB), va) * (a[:, :, None] * a[:, None, :])  # (M^T M) with M = B V_A diag(a)
    wm, vm, ok_m = _eigh(K)
    m = wm.sqrt()
    left = torch.bmm(va / a[:, None, :], vm)  # V_A diag(1/a) V_M
    S = torch.bmm(left * m[:, None, :], left.mT)
    right = torch.bmm(va * a[:, None, :], vm)  # V_A diag(a) V_M
    S_inv = torch.bmm(right / m[:, None, :], right.mT)
    logdet = m.log().sum(-1) - 2 * a.log().sum(-1)  # det S* = prod(m) / prod(a)^2
    return S_inv, S, ok_a & ok_m, logdet


def _geometric_mean_cholesky(AAt: torch.Tensor, BtB: torch.Tensor, logdet: bool = False):
    """One Cholesky and one eigh: (S*^-1, S*, ok, log det S* or None), ok only for well-conditioned layers.

    With A A^T = L L^T and K = L^T B^T B L = V diag(m^2) V^T (congruence invariance of the geometric mean):
        S* = L^-T V diag(m) V^T L^-1,    S*^-1 = L V diag(1/m) V^T L^T.
    Cholesky and eigh read the lower triangle only, so the Grams are not symmetrised first. Only eigh needs finite
    input (it raises otherwise): a non-finite Gram gives a non-finite K, or a failed Cholesky (info > 0), and such a
    layer's K is replaced by I; its ok is False either way.
    """
    L, info = torch.linalg.cholesky_ex(AAt)
    K = torch.bmm(torch.bmm(L.mT, BtB), L)
    fin = finite_rows(K)
    eye = torch.eye(AAt.shape[-1], dtype=AAt.dtype, device=AAt.device)
    wm, vm = torch.linalg.eigh(torch.where(fin.view(-1, 1, 1), K, eye))
    m = wm.clamp_min(torch.finfo(wm.dtype).tiny).sqrt()
    left = torch.linalg.solve_triangular(L.mT, vm, upper=True)  # L^-T V
    right = torch.bmm(L, vm)
    m_cols = m.unsqueeze(1)
    S = torch.bmm(left * m_cols, left.mT)
    S_inv = torch.bmm(right / m_cols, right.mT)
    # cond(A A^T) <= ||A A^T||_F ||(A A^T)^-1||_F <= ||A A^T||_F tr((A A^T)^-1) = ||A A^T||_F ||L^-T V||_F^2
    cond_a = torch.linalg.matrix_norm(AAt) * left.square().sum(dim=(-2, -1))
    ok = (fin & (info == 0) & (cond_a < FAST_COND) & (wm[:, 0] * FAST_COND > wm[:, -1]) & finite_rows(S, S_inv))
    if not logdet:
        return S_inv, S, ok, None
    return S_inv, S, ok, m.log().sum(-1) - 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def geometric_mean(AAt: torch.Tensor, BtB: torch.Tensor, normalize: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RefLoRA's optimal metric (Theorem 3): S* = (A A^T)^{-1} # (B^T B), and S*^{-1}.

    S* is the unique SPD solution of S (A A^T) S = B^T B. With A A^T = V_A diag(a^2) V_A^T and
    diag(a) V_A^T B^T B V_A diag(a) = V_M diag(m^2) V_M^T:
        S*    = V_A diag(1/a) V_M diag(m)   V_M^T diag(1/a) V_A^T
        S*^-1 = V_A diag(a)   V_M diag(1/m) V_M^T diag(a)   V_A^T
    Returns (S*^-1, S*, ok): the preconditioners for G_A and G_B, in the input's dtype.

    float64 input runs this two-eigh form in float64. float32 input (what the Refactorer passes for
    float32/bf16/fp16 factors) runs a Cholesky + one eigh in float32 (``_geometric_mean_cholesky``, 2-3x
    faster on a CPU at r = 64) and recomputes in float64 only the layers that form is not certified for
    (condition number >= FAST_COND, rank-deficient, non-finite), so the validity checks are the float64
    ones. That selection reads a mask on the host (a device sync; torch's eigh syncs on CUDA as well).

    ``normalize`` divides S* by its geometric-mean eigenvalue (det S = 1). Adam cancels a per-layer scalar
    in steady state, so this keeps RefLoRA's shape of the update but not the large jumps in gradient
    scale S* makes while B grows from zero (which Adam's second-moment average follows only slowly).
    """
    if AAt.dtype == torch.float64:
        S_inv, S, ok, logdet = _geometric_mean_eigh(AAt, BtB)
    else:
        S_inv, S, ok, logdet = _geometric_mean_cholesky(AAt, BtB, logdet=normalize)
        redo = (~ok).nonzero()  # the one host read: which layers to recompute
        if len(redo):
            redo = redo[:, 0]
            ref = _geometric_mean_eigh(AAt[redo].double(), BtB[redo].double())
            S_inv, S, ok, logdet = (t if t is None else t.index_put((redo,), r.to(t.dtype))
                                    for t, r in zip((S_inv, S, ok, logdet), ref))
        elif not normalize:  # every layer took the certified float32 path: finite, and ok everywhere already
            return S_inv, S, ok
    if normalize:
        c = torch.exp(logdet / S.shape[-1])[:, None, None]
        S, S_inv = S / c, S_inv * c
    ok = ok & finite_rows(S, S_inv)
    return _identity_where(ok, S_inv), _identity_where(ok, S), ok


def _inverse(gram: torch.Tensor, delta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(gram + delta I)^{-1} through eigh; ok is False for non-finite or (undamped) singular grams."""
    if delta:
        gram = gram + delta * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    w, v, ok = _eigh(gram)
    if delta:  # the damping makes the matrix definite; only non-finite input is refused
        ok = finite(w).all(-1) & (w[:, 0] > 0)
    inv = torch.bmm(v / w[:, None, :], v.mT)
    ok = ok & finite_rows(inv)
    return _identity_where(ok, inv), ok


def scaled_gd(AAt: torch.Tensor, BtB: torch.Tensor, delta: float = 0.0):
    """ScaledGD (delta = 0) / PrecLoRA (delta > 0): P_A = (B^T B + delta I)^-1, P_B = (A A^T + delta I)^-1.

    Computed in float64 whatever the input; returned in the input's dtype.
    """
    P_A, ok_b = _inverse(BtB.double(), delta)
    P_B, ok_a = _inverse(AAt.double(), delta)
    ok = ok_a & ok_b
    return _identity_where(ok, P_A).to(AAt.dtype), _identity_where(ok, P_B).to(AAt.dtype), ok


def normalized_scaled_gd(AAt: torch.Tensor, BtB: torch.Tensor, delta: float = 1e-6):
    """NoRA+: ScaledGD preconditioners with each Gram normalised by its Frobenius norm, damped by delta."""
    dtype, AAt, BtB = AAt.dtype, AAt.double(), BtB.double()
    nb = torch.linalg.matrix_norm(BtB).clamp_min(torch.finfo(BtB.dtype).tiny)[:, None, None]
    na = torch.linalg.matrix_norm(AAt).clamp_min(torch.finfo(AAt.dtype).tiny)[:, None, None]
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in scaled_gd(AAt / na, BtB / nb, delta))
