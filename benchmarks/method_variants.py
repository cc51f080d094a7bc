"""`method@variant` names for the benchmarks: RefLoRA's variants as one method name each, e.g.
`--methods lora reflora reflora@factors reflora-s@reinit`, mapped to the trainers' option names (core/options.py). The
one spelling every benchmark takes."""

from __future__ import annotations

VARIANTS = {  # variant -> MethodOptions fields
    "": {},
    "normalize": {"reflora_normalize": True},  # det S* = 1
    "update": {"reflora_apply_to": "update"},  # S* on the optimizer's step
    "factors": {"reflora_apply_to": "factors"},  # balanced factors, optimizer moments carried
    "reinit": {"reinit": True},  # random full-rank factors at step 0 (base weight compensated), any method
}


def split(name: str) -> tuple[str, dict]:
    """"reflora@factors" -> ("reflora", {"reflora_apply_to": "factors"}); variants combine ("reflora@normalize@reinit");
    a plain method name has no options."""
    method, *variants = name.split("@")
    options = {}
    for variant in variants:
        if variant not in VARIANTS:
            raise SystemExit(f"error: unknown variant {variant!r} in {name!r}; use one of "
                             f"{sorted(v for v in VARIANTS if v)}")
        options.update(VARIANTS[variant])
    return method, options


def flags(options: dict) -> list[str]:
    """The same options as command-line flags."""
    return [f for k, v in options.items() for f in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
