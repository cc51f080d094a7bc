"""The facts of METHODS.md section 2, checked on random and adversarial matrices."""

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
