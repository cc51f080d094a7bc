"""The Refactorer on real peft models: hooks, methods, state, peft parity, bad input."""

import copy
import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from reflora_diffusion.core import METHODS, Refactorer, find_lora_pairs, links


class Net(nn.Module):
    def __init__(self, d=12, conv=False, emb=False):
        super().__init__()
        self.emb = nn.Embedding(20, d) if emb else None
        self.conv = nn.Conv2d(3, 8, 3, padding=1) if conv else None
        self.fc1 = nn.Linear(d, 24)
        self.fc2 = nn.Linear(24, 6)

    def forward(self, x):
        if self.emb is not None:
            x = self.emb(x).mean(1)
        h = torch.tanh(self.fc1(x))
        out = self.fc2(h)
        if self.conv is not None:
            out = out + self.conv(torch.ones(x.shape[0], 3, 4, 4, dtype=out.dtype)).mean((1, 2, 3))[:, None]
        return out


def lora_model(seed=0, r=4, alpha=8, targets=("fc1", "fc2"), dtype=torch.float32, warm=True, **net_kw):
    torch.manual_seed(seed)
    model = get_peft_model(Net(**net_kw), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    model.to(dtype)
    if warm:  # full-rank factors, as after the warm-up (peft starts with B = 0)
        with torch.no_grad():
            for p in find_lora_pairs(model):
                p.B.normal_(0, 0.3)
    return model


def data(seed=1, n=32, d=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype), torch.randn(n, 6, generator=g).to(dtype)


def train(model, method, steps=5, lr=1e-2, opt_cls=torch.optim.AdamW, accum=1, **kw):
    ref = Refactorer(model, method=method, **kw)
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    ref.attach(opt)
    x, y = data(dtype=next(model.parameters()).dtype)
    losses = []
    for _ in range(steps):
        for xb, yb in zip(x.chunk(accum), y.chunk(accum)):
            loss = ((model(xb) - yb) ** 2).mean() / accum
            loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return ref, opt, losses


def lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_find_lora_pairs_linear_conv_embedding_match_peft_delta():
    model = get_peft_model(Net(conv=True, emb=True), LoraConfig(r=3, lora_alpha=5, target_modules=["fc1", "conv", "emb"]))
    pairs = {p.name.split(".")[-1]: p for p in find_lora_pairs(model)}
    assert {k: p.kind for k, p in pairs.items()} == {"emb": "embedding", "conv": "conv", "fc1": "linear"}
    with torch.no_grad():
        for p in pairs.values():
            p.A.normal_()
            p.B.normal_()
    conv = pairs["conv"]
    assert (conv.rank, conv.d_in, conv.d_out) == (3, 3 * 3 * 3, 8)
    for p in pairs.values():
        assert p.scaling == pytest.approx(5 / 3)
        expected = p.module.get_delta_weight(p.adapter)
        assert torch.allclose(links.delta(p, p.A, p.B), expected, atol=1e-5)


def test_plain_model_with_add_adapter_and_ddp_style_wrapper():
    net = Net()
    from peft import inject_adapter_in_model
    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["fc1"]), net)
    wrapper = nn.Module()
    wrapper.module = net  # what DDP looks like
    names = [p.name for p in find_lora_pairs(wrapper)]
    assert names == ["fc1"]


def _first_order_update(model, method, lr=1e-6):
    """(W_new - W_old) / lr for every adapted layer after one plain-SGD step."""
    before = {p.name: links.delta(p, p.A, p.B).double() for p in find_lora_pairs(model)}
    train(model, method, steps=1, lr=lr, opt_cls=torch.optim.SGD)
    return {p.name: (links.delta(p, p.A, p.B).double() - before[p.name]) / lr for p in find_lora_pairs(model)}


@pytest.mark.parametrize("method,consistent", [("reflora", True), ("scaledgd", True), ("lora", False)])
def test_factorization_consistency_theorem_6(method, consistent):
    m1 = lora_model(dtype=torch.float64)
    m2 = copy.deepcopy(m1)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # (A, B) -> (Q^T A, B Q^-T): same product, same loss, other factorization
        for p in find_lora_pairs(m2):
            Q = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
            p.A.copy_(Q.T @ p.A)
            p.B.copy_(p.B @ torch.linalg.inv(Q).T)
    for p1, p2 in zip(find_lora_pairs(m1), find_lora_pairs(m2)):
        assert torch.allclose(p1.B @ p1.A, p2.B @ p2.A, atol=1e-10)
    u1, u2 = _first_order_update(m1, method), _first_order_update(m2, method)
    gap = max(((u1[k] - u2[k]).norm() / u1[k].norm()).item() for k in u1)
    if consistent:
        assert gap < 1e-4
    else:
        assert gap > 1e-2


def test_reflora_sgd_step_matches_closed_form():
    """-eta s^2 (B S^-1 B^T G + G A^T S A) from docs/methods.md section 1, with S = S*."""
    from reflora_diffusion.core import geometric_mean
    model = lora_model(targets=("fc2",), dtype=torch.float64)
    (pair,) = find_lora_pairs(model)
    A, B, s = pair.A.detach().clone(), pair.B.detach().clone(), pair.scaling
    x, y = data(dtype=torch.float64)
    W = pair.module.get_base_layer().weight
    W.requires_grad_(True)
    ((model(x) - y) ** 2).mean().backward()
    G = W.grad.clone()
    W.requires_grad_(False)
    model.zero_grad()
    S_inv, S, _ = geometric_mean((A @ A.T)[None], (B.T @ B)[None])
    S_inv, S = S_inv[0], S[0]
    expected = -(s ** 2) * (B @ S_inv @ B.T @ G + G @ A.T @ S @ A)
    update = _first_order_update(model, "reflora", lr=1e-7)["base_model.model.fc2"]
    assert torch.allclose(update, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_reflora_s_balances_factors_and_carries_adam_state():
    ref, opt, _ = train(lora_model(), "reflora-s", steps=3)
    for p in ref.pairs:
        assert p.A.norm().item() == pytest.approx(p.B.norm().item(), rel=1e-5)
    assert ref.stats()["balance_max"] == pytest.approx(1.0, rel=1e-5)

    # one step from identical states: RefLoRA-S = an AdamW step, then the rescaling of factors and moments
    # (warm-up 1: step 0 is plain, and the rescaling for step 1 runs right after it)
    m_lora, m_s = lora_model(seed=3), lora_model(seed=3)
    _, opt_lora, _ = train(m_lora, "lora", steps=1)
    _, opt_s, _ = train(m_s, "reflora-s", steps=1, warmup_steps=1)
    for pl, ps in zip(find_lora_pairs(m_lora), find_lora_pairs(m_s)):
        s = pl.B.norm() / pl.A.norm()
        p = s.sqrt()
        assert torch.allclose(ps.A, p * pl.A, atol=1e-6) and torch.allclose(ps.B, pl.B / p, atol=1e-6)
        assert torch.allclose(ps.B @ ps.A, pl.B @ pl.A, atol=1e-6)
        sl, ss = opt_lora.state, opt_s.state
        assert torch.allclose(ss[ps.A]["exp_avg"], sl[pl.A]["exp_avg"] / p, atol=1e-7)
        assert torch.allclose(ss[ps.A]["exp_avg_sq"], sl[pl.A]["exp_avg_sq"] / s, atol=1e-9)
        assert torch.allclose(ss[ps.B]["exp_avg"], sl[pl.B]["exp_avg"] * p, atol=1e-7)
        assert torch.allclose(ss[ps.B]["exp_avg_sq"], sl[pl.B]["exp_avg_sq"] * s, atol=1e-9)


def test_reflora_apply_to_variants_take_the_same_sgd_steps():
    """Under plain SGD, preconditioning the gradient, the optimizer's step, or stepping in the balanced
    factorization are one and the same step of B A (RefLoRA's consistency, Theorem 6: exact, not only to first
    order); only the factorization differs. Warm-up 1 (one plain step first), float64."""
    products = {}
    for apply_to in ("gradient", "update", "factors"):
        model = lora_model(seed=5, dtype=torch.float64)
        ref, _, losses = train(model, "reflora", steps=6, lr=0.05, opt_cls=torch.optim.SGD, warmup_steps=1,
                               apply_to=apply_to)
        products[apply_to] = [p.B.detach() @ p.A.detach() for p in ref.pairs]
        assert ref.stats()["refactored"] == 2 and losses[-1] < losses[0]
        if apply_to == "factors":  # the pair is kept balanced: A A^T = B^T B after each step's refactoring
            ref.method._balance(ref._context())
            for p in ref.pairs:
                torch.testing.assert_close(p.A @ p.A.T, p.B.T @ p.B, rtol=1e-8, atol=1e-10)
    for apply_to in ("update", "factors"):
        for got, want in zip(products[apply_to], products["gradient"]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_reflora_apply_to_under_adam_differs_and_carries_the_moments():
    """With AdamW the variants are different methods; 'factors' carries the first moment like a gradient
    (G_A -> P^-1 G_A with P = S*^1/2) and keeps B A through the refactoring."""
    from reflora_diffusion.core import geometric_mean

    runs = {}
    for apply_to in ("gradient", "update", "factors"):
        model = lora_model(seed=5)
        runs[apply_to] = train(model, "reflora", steps=4, lr=1e-2, warmup_steps=1, apply_to=apply_to)
    prods = {k: torch.cat([(p.B @ p.A).flatten() for p in ref.pairs]) for k, (ref, _, _) in runs.items()}
    assert (prods["update"] - prods["gradient"]).abs().max() > 1e-4
    assert (prods["factors"] - prods["gradient"]).abs().max() > 1e-4

    ref, opt, _ = runs["factors"]
    pair = ref.pairs[0]
    A, B = pair.A.detach().clone(), pair.B.detach().clone()
    m_a, m_b = opt.state[pair.A]["exp_avg"].clone(), opt.state[pair.B]["exp_avg"].clone()
    _, S, _ = geometric_mean((A @ A.T)[None], (B.T @ B)[None])
    w, v = torch.linalg.eigh(S[0].double())
    P = (v * w.sqrt()) @ v.T
    ref.method._balance(ref._context())
    torch.testing.assert_close(pair.A.detach().double(), P @ A.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pair.B @ pair.A, B @ A, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(opt.state[pair.A]["exp_avg"].double(), torch.linalg.solve(P, m_a.double()),
                               rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(opt.state[pair.B]["exp_avg"].double(), m_b.double() @ P, rtol=1e-4, atol=1e-8)


def test_sstar_stats_measure_how_far_refactoring_is_from_identity():
    """After balancing (apply_to='factors'), S* = I: spread 1, scale 1. B -> 4 B makes S* -> 4 S* (S (A A^T) S =
    B^T B is quadratic in S): scale 4, spread unchanged. Before the warm-up (B = 0) no layer has an S*."""
    assert Refactorer(lora_model(warm=False), method="reflora").stats()["sstar_layers"] == 0
    ref = Refactorer(lora_model(dtype=torch.float64), method="reflora", apply_to="factors")
    ref.attach(torch.optim.SGD([p for pair in ref.pairs for p in (pair.A, pair.B)], lr=0.1))
    before = ref.stats()
    assert before["sstar_layers"] == 2 and before["sstar_spread_max"] > 1.5
    ref.method._balance(ref._context())
    st = ref.stats()
    assert st["sstar_spread_max"] == pytest.approx(1.0, abs=1e-6) and st["sstar_scale_max"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        for pair in ref.pairs:
            pair.B.mul_(4.0)
    st = ref.stats()
    assert st["sstar_scale_min"] == pytest.approx(4.0, rel=1e-6) and st["sstar_spread_max"] == pytest.approx(1.0, abs=1e-5)


def test_reflora_apply_to_unknown_is_refused():
    with pytest.raises(ValueError, match="apply_to='adam' is unknown; use one of gradient, update, factors"):
        Refactorer(lora_model(), method="reflora", apply_to="adam")


@pytest.mark.parametrize("method", ["reflora", "reflora-s", "nora+"])
def test_gradient_accumulation_preconditions_once_per_step(method):
    m1, m4 = lora_model(seed=5), lora_model(seed=5)
    r1, _, _ = train(m1, method, steps=3, accum=1)
    r4, _, _ = train(m4, method, steps=3, accum=4)
    assert r1.step_count == r4.step_count == 3
    for (n, a), b in zip(lora_params(m1).items(), lora_params(m4).values()):
        assert torch.allclose(a, b, atol=1e-5), n


def _authors_loop(model, method, warmup, interval, steps, lr=1e-2):
    """The published algorithm, written out by hand as the authors' code schedules it: a countdown set to the
    warm-up when attached, one count consumed per call; RefLoRA preconditions in a step pre-hook, RefLoRA-S
    rescales in a post-hook and is called once at attach. Returns, per step, whether ||A|| = ||B|| held in
    every layer when the step's update was made."""
    pairs = [(m.lora_A["default"].weight, m.lora_B["default"].weight)
             for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    countdown = warmup

    def due():
        nonlocal countdown
        if countdown > 0:
            countdown -= 1
            return False
        countdown = interval - 1
        return True

    @torch.no_grad()
    def rescale():  # RefLoRA-S: A <- pA, B <- B/p, p^2 = ||B|| / ||A||, Adam's moments along
        for A, B in pairs:
            s = B.norm() / A.norm()
            A.mul_(s.sqrt())
            B.div_(s.sqrt())
            if opt.state:
                opt.state[A]["exp_avg"] /= s.sqrt()
                opt.state[A]["exp_avg_sq"] /= s
                opt.state[B]["exp_avg"] *= s.sqrt()
                opt.state[B]["exp_avg_sq"] *= s

    @torch.no_grad()
    def precondition():  # RefLoRA: G_A <- S*^-1 G_A, G_B <- G_B S*, S* = (A A^T)^-1 # (B^T B)
        for A, B in pairs:
            wa, va = torch.linalg.eigh(A @ A.T)
            a = wa.sqrt()
            wm, vm = torch.linalg.eigh((B @ va * a).T @ (B @ va * a))
            m = wm.sqrt()
            left, right = (va / a) @ vm, (va * a) @ vm
            A.grad.copy_((right / m) @ right.T @ A.grad)
            B.grad.copy_(B.grad @ ((left * m) @ left.T))

    if method == "reflora-s" and due():
        rescale()
    x, y = data(dtype=torch.float64)
    balanced = []
    for _ in range(steps):
        ((model(x) - y) ** 2).mean().backward()
        if method == "reflora" and due():
            precondition()
        balanced.append(_balanced(pairs))
        opt.step()
        opt.zero_grad()
        if method == "reflora-s" and due():
            rescale()
    return balanced


def _balanced(pairs) -> bool:
    return all(abs(A.norm() - B.norm()) <= 1e-6 * B.norm() for A, B in pairs)  # the core computes p in float32


@pytest.mark.parametrize("method,warmup,interval,warm", [
    ("reflora-s", 100, 1, False),  # the paper's GLUE warm-up, from peft's B = 0
    ("reflora-s", 3, 2, False),
    ("reflora-s", 0, 2, True),     # no warm-up: the authors rescale once at attach, before the first step
    ("reflora", 3, 2, False),
])
def test_schedule_matches_the_authors_algorithm(method, warmup, interval, warm):
    """RefLoRA-S first balances the factors for step W (0-based), the step RefLoRA first preconditions."""
    steps = warmup + 2 * interval + 1
    reference = lora_model(seed=11, warm=warm, dtype=torch.float64)
    ours = copy.deepcopy(reference)
    expected = _authors_loop(reference, method, warmup, interval, steps)

    ref = Refactorer(ours, method=method, warmup_steps=warmup, interval=interval)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ref.attach(opt)
    balanced = []  # observed after the core's own pre-hook, as the update is made
    opt.register_step_pre_hook(lambda *_: balanced.append(_balanced([(p.A, p.B) for p in ref.pairs])))
    x, y = data(dtype=torch.float64)
    for _ in range(steps):
        ((ours(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()

    assert balanced == expected
    assert ref.stats()["refactored"] == len(ref.pairs)  # the figures of the method's last action
    if method == "reflora-s":
        assert expected.index(True) == warmup and expected[warmup::interval] == [True] * 3
    for (n, a), b in zip(lora_params(reference).items(), lora_params(ours).values()):
        assert (b - a).norm() <= 1e-6 * a.norm(), n  # the same trajectory (the core's p is float32)


def test_warmup_runs_plain_lora_then_refactors():
    # from peft's init (B = 0) RefLoRA is undefined: the warm-up steps are exactly LoRA's
    m_lora, m_ref = lora_model(seed=2, warm=False), lora_model(seed=2, warm=False)
    train(m_lora, "lora", steps=3)
    ref, _, _ = train(m_ref, "reflora", steps=3, warmup_steps=3)
    for a, b in zip(lora_params(m_lora).values(), lora_params(m_ref).values()):
        assert torch.equal(a, b)
    assert ref.stats()["refactored"] == 0
    # without warm-up, B = 0 makes every layer rank-deficient: skipped and counted, never NaN
    m0 = lora_model(seed=2, warm=False)
    ref0, _, losses = train(m0, "reflora", steps=1)
    st = ref0.stats()
    assert st["skipped_rank_deficient"] == 2 and st["refactored"] == 0
    assert all(torch.isfinite(p).all() for p in lora_params(m0).values())


def test_nonfinite_factor_is_left_untouched_and_counted():
    model = lora_model()
    pairs = find_lora_pairs(model)
    ref = Refactorer(model, method="reflora")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ref.attach(opt)
    x, y = data()
    ((model(x) - y) ** 2).mean().backward()
    with torch.no_grad():
        pairs[1].B[0, 0] = float("inf")
    grads = [p.A.grad.clone() for p in pairs] + [p.B.grad.clone() for p in pairs]
    ref._pre_hook(opt, (), {})
    st = ref.stats()
    assert st["skipped_nonfinite"] == 1 and st["refactored"] == 1
    assert torch.equal(pairs[1].A.grad, grads[1]) and torch.equal(pairs[1].B.grad, grads[3])
    assert not torch.equal(pairs[0].A.grad, grads[0])


def test_outcome_counters_add_up_over_actions_and_survive_save_and_load(tmp_path):
    """Refactored / rank-deficient / non-finite: the last action's figures and the totals over actions, kept on the
    device between logging steps, and the same after save + load into a fresh Refactorer."""
    model = lora_model(seed=2, warm=False)  # B = 0: the first action skips both layers as rank-deficient
    pairs = find_lora_pairs(model)
    ref = Refactorer(model, method="reflora")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ref.attach(opt)
    x, y = data()
    for step in range(3):
        ((model(x) - y) ** 2).mean().backward()
        if step == 2:
            pairs[0].A.grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()
        if step == 0:
            with torch.no_grad():
                for p in pairs:  # full rank from here on
                    p.B.normal_(0, 0.3)
    st = ref.stats(sstar=False)
    assert (st["refactored"], st["skipped_rank_deficient"], st["skipped_nonfinite"]) == (1, 0, 1)
    assert st["skipped_total"] == 2 + 0 + 1  # step 0: 2 rank-deficient; step 1: none; step 2: 1 non-finite
    ref.save(tmp_path)
    fresh = Refactorer(lora_model(seed=2, warm=False), method="reflora")
    fresh.load(tmp_path)
    assert fresh.stats(sstar=False)["skipped_total"] == 3
    assert fresh.state_dict()["totals"] == {"refactored": 3, "skipped_rank_deficient": 2, "skipped_nonfinite": 1}


def test_bf16_parameters_keep_their_dtype_and_follow_float32():
    m32 = lora_model(seed=4)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    grads = {}
    for m in (m32, m16):
        ref = Refactorer(m, method="reflora")
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        ref.attach(opt)
        x, y = data(dtype=next(m.parameters()).dtype)
        ((m(x) - y) ** 2).mean().backward()
        ref._pre_hook(opt, (), {})  # the r x r algebra runs in float32/64 whatever the parameter dtype
        assert ref.stats()["refactored"] == 2
        grads[m is m16] = [t for p in ref.pairs for t in (p.A.grad, p.B.grad)]
    for g32, g16 in zip(grads[False], grads[True]):
        assert g16.dtype == torch.bfloat16 and torch.isfinite(g16).all()
        assert (g16.float() - g32).norm() / g32.norm() < 0.05
    _, _, losses = train(m16, "reflora", steps=4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method,opts", [("reflora", {"warmup_steps": 2}), ("reflora-s", {}),
                                         ("rac-lora", {"chain_every": 2, "p": 0.5}), ("cola", {"chain_every": 2})])
def test_state_round_trip_gives_identical_next_steps(tmp_path, method, opts):
    """Train 3 steps, save model LoRA weights + optimizer + core, reload into fresh objects, continue."""
    full = lora_model(seed=7, warm=False)
    train(full, method, steps=6, **opts)

    part = lora_model(seed=7, warm=False)
    ref, opt, _ = train(part, method, steps=3, **opts)
    ref.save(tmp_path)
    lora_state = lora_params(part)
    opt_state = copy.deepcopy(opt.state_dict())

    fresh = lora_model(seed=7, warm=False)  # pristine base weights, as after loading the base model again
    ref2 = Refactorer(fresh, method=method, **opts)
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    ref2.attach(opt2)
    with torch.no_grad():  # as accelerator.load_state does: after prepare/attach
        for n, p in fresh.named_parameters():
            if n in lora_state:
                p.copy_(lora_state[n])
    opt2.load_state_dict(opt_state)
    ref2.load(tmp_path)
    assert ref2.step_count == 3
    x, y = data()
    for _ in range(3):
        ((fresh(x) - y) ** 2).mean().backward()
        opt2.step()
        opt2.zero_grad()
    torch.testing.assert_close(fresh(x), full(x), atol=1e-5, rtol=1e-5)
    for (n, a), b in zip(lora_params(full).items(), lora_params(fresh).values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("method", ["rac-lora", "cola"])
def test_chain_exports_as_one_lora_of_rank_K_times_r(method):
    model = lora_model(seed=8, warm=False)
    ref, _, losses = train(model, method, steps=7, chain_every=3, p=0.5) if method == "rac-lora" else \
        train(model, method, steps=7, chain_every=3)
    assert losses[-1] < losses[0]
    factors = ref.effective_factors()
    x, _ = data()
    out = model(x)
    # the exported adapter on the ORIGINAL base model reproduces the trained (merged) model
    torch.manual_seed(8)
    base = Net()
    for name, (A, B, s) in factors.items():
        layer = getattr(base, name.split(".")[-1])
        with torch.no_grad():
            layer.weight += s * B @ A
        assert A.shape[0] == 3 * 4  # two merged links + the current one
    torch.testing.assert_close(base(x), out, atol=1e-5, rtol=1e-5)


def test_rac_lora_trains_one_factor_per_link():
    model = lora_model(seed=9, warm=False)
    ref = Refactorer(model, method="rac-lora", chain_every=10, p=0.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ref.attach(opt)
    frozen_before = [(p.B if not t else p.A).detach().clone() for p, t in zip(ref.pairs, ref.method.trains_b)]
    for p, t in zip(ref.pairs, ref.method.trains_b):
        assert ((p.B if t else p.A) == 0).all()  # the trained factor starts at zero
    x, y = data()
    for _ in range(3):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    for (p, t), before in zip(zip(ref.pairs, ref.method.trains_b), frozen_before):
        assert torch.equal(p.B if not t else p.A, before)
        assert not ((p.B if t else p.A) == 0).all()


def test_lora_plus_matches_peft():
    from peft.optimizers import create_loraplus_optimizer
    m_ours, m_peft = lora_model(seed=11), lora_model(seed=11)
    no_decay = functools.partial(torch.optim.AdamW, weight_decay=0.0)  # peft's LoRA+ default
    train(m_ours, "lora+", steps=4, ratio=8.0, opt_cls=no_decay)
    opt = create_loraplus_optimizer(m_peft, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=8.0)
    x, y = data()
    for _ in range(4):
        ((m_peft(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    for (n, a), b in zip(lora_params(m_ours).items(), lora_params(m_peft).values()):
        torch.testing.assert_close(a, b, msg=n)


def test_lora_plus_groups_feed_an_lr_scheduler():
    model = lora_model()
    ref = Refactorer(model, method="lora+", ratio=4.0)
    opt = ref.attach(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert sorted(g["lr"] for g in opt.param_groups) == [5e-4, 2e-3]
    assert sched.base_lrs == [1e-3, 4e-3]


def test_preclora_matches_peft_riemannian_optimizer():
    from peft.optimizers import create_riemannian_optimizer
    m_ours, m_peft = lora_model(seed=12, dtype=torch.float64), lora_model(seed=12, dtype=torch.float64)
    train(m_ours, "preclora", steps=4, delta=0.05)
    opt = create_riemannian_optimizer(m_peft, torch.optim.AdamW, lr=1e-2, reg=0.05)
    x, y = data(dtype=torch.float64)
    for _ in range(4):
        ((m_peft(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    for (n, a), b in zip(lora_params(m_ours).items(), lora_params(m_peft).values()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=n)


def test_conv_and_embedding_pairs_are_preconditioned_as_matrices():
    model = get_peft_model(Net(conv=True, emb=True), LoraConfig(r=2, target_modules=["conv", "emb", "fc2"]))
    for p in find_lora_pairs(model):
        with torch.no_grad():
            p.A.normal_()
            p.B.normal_()
    ref = Refactorer(model, method="reflora")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ref.attach(opt)
    x = torch.randint(0, 20, (8, 5))
    model(x).pow(2).mean().backward()
    from reflora_diffusion.core import geometric_mean
    expected = {}
    for p in ref.pairs:
        A, B = p.a_matrix(p.A.detach()).double(), p.b_matrix(p.B.detach()).double()
        S_inv, S, _ = geometric_mean((A @ A.T)[None], (B.T @ B)[None])
        expected[p.name] = (S_inv[0].float() @ p.a_matrix(p.A.grad), p.b_matrix(p.B.grad) @ S[0].float())
    ref._pre_hook(opt, (), {})
    assert ref.stats()["refactored"] == 3
    for p in ref.pairs:
        ga, gb = expected[p.name]
        torch.testing.assert_close(p.a_matrix(p.A.grad), ga, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.b_matrix(p.B.grad), gb, rtol=1e-4, atol=1e-6)


def test_accelerate_prepared_optimizer_with_accumulation():
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = lora_model(seed=13)
    ref = Refactorer(model, method="reflora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    ref.attach(opt)  # the AcceleratedOptimizer wrapper
    x, y = data()
    for xb, yb in zip(x.chunk(4), y.chunk(4)):
        with accelerator.accumulate(model):
            accelerator.backward(((model(xb) - yb) ** 2).mean())
            opt.step()
            opt.zero_grad()
    assert ref.step_count == 2
    assert ref.stats()["refactored"] == 2


# ---------------------------------------------------------------- bad input
def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'refloar'.*reflora"):
        Refactorer(lora_model(), method="refloar")


def test_unknown_option():
    with pytest.raises(TypeError, match="unknown option.*'rato'.*ratio"):
        Refactorer(lora_model(), method="lora+", rato=4)


def test_model_without_lora():
    with pytest.raises(ValueError, match="no trainable peft LoRA layers.*add_adapter"):
        Refactorer(Net(), method="reflora")


def test_optimizer_without_lora_params():
    model = lora_model()
    ref = Refactorer(model, method="reflora")
    with pytest.raises(ValueError, match="does not hold the LoRA parameters"):
        ref.attach(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))


def test_rank_larger_than_layer_allows():
    with pytest.raises(ValueError, match="rank 8 of layer .*fc2.* exceeds min\\(d_in, d_out\\) = 6"):
        Refactorer(lora_model(r=8), method="reflora")


def test_every_method_runs_and_lowers_the_loss():
    for name in METHODS:
        opts = {"chain_every": 3} if name in ("rac-lora", "cola") else {}
        _, _, losses = train(lora_model(seed=14, warm=False), name, steps=8, warmup_steps=2, **opts) \
            if name not in ("lora", "lora+", "rac-lora", "cola") else train(lora_model(seed=14, warm=False), name, steps=8, **opts)
        assert losses[-1] < losses[0], name


def test_grad_scaler_hook_sees_unscaled_gradients_and_skipped_steps_do_not_count():
    m_plain, m_amp = lora_model(seed=15), lora_model(seed=15)
    train(m_plain, "reflora", steps=2)
    ref = Refactorer(m_amp, method="reflora")
    opt = torch.optim.AdamW([p for p in m_amp.parameters() if p.requires_grad], lr=1e-2)
    ref.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    x, y = data()
    for _ in range(2):
        scaler.scale(((m_amp(x) - y) ** 2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    for (n, a), b in zip(lora_params(m_plain).items(), lora_params(m_amp).values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    # an overflowing step is skipped by the scaler: the core neither runs nor counts it
    scaler.scale(((m_amp(x) - y) ** 2).mean() * float("inf")).backward()
    scaler.step(opt)
    assert ref.step_count == 2


def test_reinit_keeps_the_output_refactors_from_step_0_and_exports_exactly(tmp_path):
    model = lora_model(seed=16, warm=False)
    x, y = data()
    before = model(x).detach()
    ref = Refactorer(model, method="reflora", reinit=True)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)  # base - s B0 A0 + s B0 A0
    assert all((p.B != 0).any() for p in ref.pairs)
    opt = ref.attach(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    assert ref.stats()["refactored"] == 2  # no warm-up needed
    # the exported LoRA (rank 2r) on the original base weights reproduces the trained model
    torch.manual_seed(16)
    base = Net()
    for name, (A, B, s) in ref.effective_factors().items():
        with torch.no_grad():
            getattr(base, name.split(".")[-1]).weight += s * B @ A
    torch.testing.assert_close(base(x), model(x), atol=1e-5, rtol=1e-5)
    # resuming on a pristine base with reinit=True again does not subtract twice
    ref.save(tmp_path)
    lora_state = lora_params(model)
    fresh = lora_model(seed=16, warm=False)
    ref2 = Refactorer(fresh, method="reflora", reinit=True)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if n in lora_state:
                p.copy_(lora_state[n])
    ref2.load(tmp_path)
    torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5)


def test_attach_twice_to_the_same_optimizer_is_a_no_op():
    from accelerate import Accelerator
    model = lora_model()
    ref = Refactorer(model, method="lora+", ratio=4.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ref.attach(opt)
    _, wrapped = Accelerator(cpu=True).prepare(model, opt)
    ref.attach(wrapped)
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-3, 4e-3]
    assert len(opt._optimizer_step_pre_hooks) == 1


@pytest.mark.parametrize("method", ["reflora", "scaledgd", "preclora", "nora+"])
def test_nonfinite_gradient_passes_through_untouched_and_spares_its_batch(method):
    """One NaN in one layer's gradient: that layer keeps exactly its gradients (no NaN column from the
    matmul), is counted as skipped_nonfinite, and the other layers of the same batched group are
    preconditioned exactly as without it."""

    def equal_layers():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        model = get_peft_model(net, LoraConfig(r=3, lora_alpha=3, target_modules=["0", "2", "4"]))
        with torch.no_grad():
            for p in find_lora_pairs(model):
                p.B.normal_(0, 0.3)
        return model

    results = []
    for poison in (False, True):
        model = equal_layers()
        pairs = find_lora_pairs(model)
        assert len({(p.rank, p.d_in, p.d_out) for p in pairs}) == 1  # one bucket
        ref = Refactorer(model, method=method)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        ref.attach(opt)
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
        (model(x) ** 2).mean().backward()
        if poison:
            pairs[1].A.grad[1, 2] = float("nan")
        before = [(p.A.grad.clone(), p.B.grad.clone()) for p in pairs]
        ref._pre_hook(opt, (), {})
        results.append(([(p.A.grad.clone(), p.B.grad.clone()) for p in pairs], before, ref.stats()))
    (clean, _, _), (poisoned, before, st) = results
    assert st["skipped_nonfinite"] == 1 and st["refactored"] == 2
    ga, gb = poisoned[1]
    assert torch.allclose(ga, before[1][0], equal_nan=True) and torch.equal(gb, before[1][1])
    assert int(torch.isnan(ga).sum()) == 1
    for i in (0, 2):
        assert torch.equal(poisoned[i][0], clean[i][0]) and torch.equal(poisoned[i][1], clean[i][1])
        assert not torch.equal(poisoned[i][0], before[i][0])  # really preconditioned


def test_warmup_covering_the_whole_run_is_warned_in_one_line():
    ref = Refactorer(lora_model(), method="reflora", warmup_steps=100)
    with pytest.warns(UserWarning, match=r"only 100 optimizer steps, so it trains as plain LoRA"):
        assert ref.check_schedule(100)
    assert ref.check_schedule(101) is None
    assert Refactorer(lora_model(), method="lora+", warmup_steps=100).check_schedule(10) is None  # no warm-up there


def test_batched_preconditioning_matches_layer_by_layer_math():
    """One batched pass over the buckets gives each layer's own G_A <- S*^-1 G_A, G_B <- G_B S* (computed here one
    layer at a time), and leaves a layer with a non-finite gradient exactly as it was, sparing its batch."""
    from reflora_diffusion.core.linalg import geometric_mean
    torch.manual_seed(14)
    net = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Linear(12, 6))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4", "5"]))
    with torch.no_grad():
        for p in find_lora_pairs(model):
            p.B.normal_(0, 0.3)
    ref = Refactorer(model, method="reflora")
    assert sorted(len(b.pairs) for b in ref._context().plan.buckets) == [1, 3]  # three equal layers share a bucket
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ref.attach(opt)
    x, y = data()
    ((model(x) - y) ** 2).mean().backward()
    expected = []
    for p in ref.pairs:
        A, B = p.a_matrix(p.A.detach()), p.b_matrix(p.B.detach())
        S_inv, S, ok = geometric_mean((A @ A.T)[None], (B.T @ B)[None])
        assert ok.all()
        expected.append(((S_inv[0] @ p.a_matrix(p.A.grad)).view_as(p.A), (p.b_matrix(p.B.grad) @ S[0]).view_as(p.B)))
    ref.pairs[1].A.grad[0, 0] = float("nan")
    expected[1] = (ref.pairs[1].A.grad.clone(), ref.pairs[1].B.grad.clone())
    ref._pre_hook(opt, (), {})
    assert torch.equal(ref.pairs[1].B.grad, expected[1][1])
    assert ref.stats()["skipped_nonfinite"] == 1 and ref.stats()["refactored"] == len(ref.pairs) - 1
    for p, (ga, gb) in zip(ref.pairs, expected):
        torch.testing.assert_close(p.A.grad, ga, rtol=1e-5, atol=1e-7, equal_nan=True)
        torch.testing.assert_close(p.B.grad, gb, rtol=1e-5, atol=1e-7)
