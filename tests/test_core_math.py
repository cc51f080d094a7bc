"""The facts of docs/methods.md section 2, checked on random and adversarial matrices."""

import pytest
import torch

from reflora_diffusion.core import linalg


def _factors(n, r, d_in, d_out, seed=0, cond=1.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(n, d_out, r, generator=g, dtype=torch.float64)
    if cond != 1.0:  # spread the singular values of A over [1, cond]
        u, _, vh = torch.linalg.svd(A, full_matrices=False)
        s = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)
        A = u @ torch.diag_embed(s.expand(n, r)) @ vh
    return A, B


def _grams(A, B):
    return A @ A.transpose(-1, -2), B.transpose(-1, -2) @ B


@pytest.mark.parametrize("r,d_in,d_out,cond", [(4, 32, 16, 1.0), (8, 64, 96, 1.0), (16, 40, 24, 1e2), (4, 4, 7, 1.0)])
def test_geometric_mean_solves_riccati_and_is_spd(r, d_in, d_out, cond):
    A, B = _factors(5, r, d_in, d_out, cond=cond)
    AAt, BtB = _grams(A, B)
    S_inv, S, ok = linalg.geometric_mean(AAt, BtB)
    assert ok.all()
    assert torch.allclose(S, S.transpose(-1, -2), atol=1e-10)
    assert (torch.linalg.eigvalsh(S) > 0).all()
    lhs = S @ AAt @ S
    assert torch.allclose(lhs, BtB, rtol=1e-7, atol=1e-7 * BtB.abs().max().item())
    assert torch.allclose(S @ S_inv, torch.eye(r, dtype=S.dtype).expand_as(S), atol=1e-8)


def test_minimum_is_twice_nuclear_norm_reached_only_at_S_star():
    A, B = _factors(3, 6, 20, 12, seed=1)
    AAt, BtB = _grams(A, B)
    _, S, _ = linalg.geometric_mean(AAt, BtB)

    def objective(S):
        return (S @ AAt).diagonal(dim1=-2, dim2=-1).sum(-1) + (torch.linalg.inv(S) @ BtB).diagonal(dim1=-2, dim2=-1).sum(-1)

    nuclear = torch.linalg.matrix_norm(B @ A, ord="nuc")
    assert torch.allclose(objective(S), 2 * nuclear, rtol=1e-9)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):  # any other SPD matrix does worse
        E = 0.1 * torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
        other = S + E @ E.transpose(-1, -2) + 1e-3 * torch.eye(6, dtype=torch.float64)
        assert (objective(other) > 2 * nuclear).all()


def test_balanced_refactoring_gives_equal_diagonal_grams():
    A, B = _factors(2, 5, 30, 18, seed=3)
    AAt, BtB = _grams(A, B)
    wa, Va = torch.linalg.eigh(AAt)
    a = wa.sqrt()
    M = B @ Va * a[:, None, :]
    wm, Vm = torch.linalg.eigh(M.transpose(-1, -2) @ M)
    m = wm.sqrt()
    P = Va / a[:, None, :] @ Vm * m.sqrt()[:, None, :]
    A_t = P.transpose(-1, -2) @ A
    B_t = B @ torch.linalg.inv(P).transpose(-1, -2)
    assert torch.allclose(B_t @ A_t, B @ A, atol=1e-9)
    assert torch.allclose(A_t @ A_t.transpose(-1, -2), torch.diag_embed(m), atol=1e-8)
    assert torch.allclose(B_t.transpose(-1, -2) @ B_t, torch.diag_embed(m), atol=1e-8)
    # and P P^T is S*: the balanced pair is the optimal refactoring
    _, S, _ = linalg.geometric_mean(AAt, BtB)
    assert torch.allclose(P @ P.transpose(-1, -2), S, atol=1e-8)


def test_rank_deficient_and_nonfinite_layers_get_identity():
    A, B = _factors(4, 4, 16, 8, seed=4)
    B[0] = 0  # peft's init: B = 0
    B[1, :, 0] = B[1, :, 1]  # rank-deficient B
    A[2, 0, 0] = float("nan")
    AAt, BtB = _grams(A, B)
    for fn in (linalg.geometric_mean, linalg.scaled_gd):
        P_A, P_B, ok = fn(AAt, BtB)
        assert ok.tolist() == [False, False, False, True]
        eye = torch.eye(4, dtype=torch.float64)
        for i in range(3):
            assert torch.equal(P_A[i], eye) and torch.equal(P_B[i], eye)
        assert torch.isfinite(P_A).all() and torch.isfinite(P_B).all()


def test_damped_preconditioners_stay_defined_at_B_zero():
    A, B = _factors(1, 4, 16, 8, seed=5)
    B.zero_()
    P_A, P_B, ok = linalg.scaled_gd(*_grams(A, B), delta=1e-2)
    assert ok.all()
    assert torch.allclose(P_A[0], 100 * torch.eye(4, dtype=torch.float64))


def test_nora_plus_is_scale_invariant():
    A, B = _factors(2, 4, 16, 8, seed=6)
    P1 = linalg.normalized_scaled_gd(*_grams(A, B))
    P2 = linalg.normalized_scaled_gd(*_grams(7 * A, 0.1 * B))
    assert torch.allclose(P1[0], P2[0]) and torch.allclose(P1[1], P2[1])


def test_normalized_geometric_mean_has_unit_determinant_and_the_same_shape():
    A, B = _factors(3, 5, 30, 18, seed=7)
    AAt, BtB = _grams(A, B)
    S_inv, S, _ = linalg.geometric_mean(AAt, BtB)
    S_inv_n, S_n, ok = linalg.geometric_mean(AAt, BtB, normalize=True)
    assert ok.all()
    assert torch.allclose(torch.linalg.det(S_n), torch.ones(3, dtype=torch.float64), rtol=1e-8)
    c = S[:, 0, 0] / S_n[:, 0, 0]
    assert torch.allclose(S, S_n * c[:, None, None], rtol=1e-8)
    assert torch.allclose(S_n @ S_inv_n, torch.eye(5, dtype=torch.float64).expand(3, 5, 5), atol=1e-8)


# ---------------------------------------------------------------- the float32 path (Cholesky + eigh, float64 fallback)
def _relative(a, b):
    return (torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).max().item()


@pytest.mark.parametrize("r", [4, 16, 64])
@pytest.mark.parametrize("cond,tol", [(1.0, 2e-5), (10.0, 2e-5), (100.0, 1e-3)])  # cond(A A^T) = cond^2
def test_float32_geometric_mean_solves_riccati_and_matches_float64(r, cond, tol):
    """float32 Grams (what the Refactorer passes): S (A A^T) S = B^T B and S = the float64 S* to ``tol``
    (relative Frobenius), well-conditioned (fast path) and ill-conditioned (float64 fallback) alike."""
    A, B = _factors(6, r, 3 * r, 2 * r, seed=r, cond=cond)
    AAt, BtB = _grams(A, B)
    S_inv, S, ok = linalg.geometric_mean(AAt.float(), BtB.float())
    _, S_ref, ok_ref = linalg.geometric_mean(AAt, BtB)
    assert S.dtype == torch.float32 and ok.all() and ok_ref.all()
    S64 = S.double()
    assert _relative(S64 @ AAt @ S64, BtB) < tol
    assert _relative(S64, S_ref) < tol
    assert _relative(S64 @ S_inv.double(), torch.eye(r, dtype=torch.float64).expand_as(S64)) < tol


def test_float32_fast_path_takes_well_conditioned_layers_only():
    A, B = _factors(4, 8, 32, 16, seed=8)
    A_ill, _ = _factors(4, 8, 32, 16, seed=8, cond=100.0)  # cond(A A^T) = 1e4 >= FAST_COND
    _, _, ok_fast, _ = linalg._geometric_mean_cholesky(*(t.float() for t in _grams(A, B)))
    _, _, ok_ill, _ = linalg._geometric_mean_cholesky(*(t.float() for t in _grams(A_ill, B)))
    assert ok_fast.all() and not ok_ill.any()
    # the ill-conditioned ones still come out right (float64 fallback)
    S_inv, S, ok = linalg.geometric_mean(*(t.float() for t in _grams(A_ill, B)))
    assert ok.all() and _relative(S.double(), linalg.geometric_mean(*_grams(A_ill, B))[1]) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_and_nonfinite_layers_are_flagged_in_both_precisions(dtype):
    A, B = _factors(5, 4, 16, 8, seed=4)
    B[0] = 0
    B[1, :, 0] = B[1, :, 1]
    A[2, 0, 0] = float("nan")
    A[3, 1] = A[3, 0]  # rank-deficient A
    S_inv, S, ok = linalg.geometric_mean(*(t.to(dtype) for t in _grams(A, B)))
    assert ok.tolist() == [False, False, False, False, True]
    eye = torch.eye(4, dtype=dtype)
    assert all(torch.equal(S[i], eye) and torch.equal(S_inv[i], eye) for i in range(4))
    assert S.dtype == dtype and torch.isfinite(S).all() and torch.isfinite(S_inv).all()


def test_float32_normalize_gives_unit_determinant():
    A, B = _factors(3, 6, 24, 12, seed=9, cond=100.0)  # fast path and fallback layers mixed in one batch
    A[0] = _factors(1, 6, 24, 12, seed=10)[0][0]
    S_inv, S, ok = linalg.geometric_mean(*(t.float() for t in _grams(A, B)), normalize=True)
    assert ok.all()
    assert torch.allclose(torch.linalg.det(S.double()), torch.ones(3, dtype=torch.float64), rtol=1e-4)
