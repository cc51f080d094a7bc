"""The core with the optimizers LoRA trainers use beyond AdamW: Adafactor (factored second moment), schedule-free
AdamW (a second point z) and Prodigy (a global step-size estimate). RefLoRA-S carries the state it can prove and the
rest is refused in one line."""

import pytest
import torch

from reflora_diffusion.core import Refactorer, find_lora_pairs

from test_core_refactorer import data, lora_model


def make(name, params):
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "schedulefree":
        import schedulefree

        opt = schedulefree.AdamWScheduleFree(params, lr=1e-2)
        opt.train()
        return opt
    import prodigyopt

    return prodigyopt.Prodigy(params, lr=1.0)


def steps(model, opt, n):
    x, y = data()
    for _ in range(n):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", ["adafactor", "schedulefree"])
def test_reflora_s_rescales_the_state_each_optimizer_keeps(name):
    """A <- pA, B <- B/p (p^2 = ||B|| / ||A||) and the state as the same history in the new coordinates would have it:
    Adafactor's row and column second moments by 1/p^2 (A) and p^2 (B), schedule-free's z like the factor itself
    (so its averaged point x, the one evaluated and exported, moves like the factors: the product B A is unchanged)."""
    model = lora_model(seed=5)
    ref = Refactorer(model, method="reflora-s", warmup_steps=100)  # plain steps, then one rescaling by hand
    opt = make(name, [p for p in model.parameters() if p.requires_grad])
    ref.attach(opt)
    steps(model, opt, 3)
    pairs = find_lora_pairs(model)
    before = {id(t): {k: v.clone() for k, v in opt.state[t].items() if torch.is_tensor(v) and v.dim()}
              for p in pairs for t in (p.A, p.B)}
    if name == "schedulefree":
        opt.eval()
        x_before = [(p.B @ p.A).detach().clone() for p in pairs]
        opt.train()
    scale = {id(p.A): (p.B.norm() / p.A.norm()).item() for p in pairs}
    ref.method._balance(ref._context())
    for p in pairs:
        s = scale[id(p.A)]
        assert p.A.norm().item() == pytest.approx(p.B.norm().item(), rel=1e-5)
        for t, factor, quad in ((p.A, s ** 0.5, 1 / s), (p.B, s ** -0.5, s)):
            st, old = opt.state[t], before[id(t)]
            if name == "adafactor":
                for k in ("exp_avg_sq_row", "exp_avg_sq_col"):
                    torch.testing.assert_close(st[k], old[k] * quad, rtol=1e-5, atol=0)
            else:
                torch.testing.assert_close(st["z"], old["z"] * factor, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(st["exp_avg_sq"], old["exp_avg_sq"] * quad, rtol=1e-5, atol=0)
    if name == "schedulefree":
        opt.eval()
        for p, x in zip(pairs, x_before):
            torch.testing.assert_close(p.B @ p.A, x, rtol=1e-5, atol=1e-6)
        opt.train()
    steps(model, opt, 2)  # and training goes on with finite numbers
    assert all(torch.isfinite(t).all() for p in pairs for t in (p.A, p.B))


@pytest.mark.parametrize("method,options,optimizer,message", [
    ("reflora-s", {}, "prodigy", "reflora-s rescales the factors and their optimizer state, which Prodigy"),
    ("reflora", {"apply_to": "factors"}, "prodigy", "Prodigy's step-size estimate"),
    ("reflora", {"apply_to": "factors"}, "adafactor", "Adafactor's factored second moment cannot carry"),
])
def test_state_the_method_cannot_carry_is_refused_in_one_line(method, options, optimizer, message):
    model = lora_model()
    ref = Refactorer(model, method=method, **options)
    with pytest.raises(ValueError, match=message) as e:
        ref.attach(make(optimizer, [p for p in model.parameters() if p.requires_grad]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["adafactor", "schedulefree", "prodigy"])
def test_reflora_preconditions_the_gradient_any_optimizer_reads(name):
    """RefLoRA changes only the gradients, so every optimizer runs with it; the loss goes down."""
    model = lora_model(seed=2)
    ref = Refactorer(model, method="reflora")
    opt = make(name, [p for p in model.parameters() if p.requires_grad])
    ref.attach(opt)
    x, y = data()
    first = ((model(x) - y) ** 2).mean().item()
    steps(model, opt, 15)
    last = ((model(x) - y) ** 2).mean().item()
    assert last < first and ref.stats()["refactored"] == len(ref.pairs)
