"""`method@variant` names for the benchmarks (issue 9, part 2): RefLoRA's variants as one method name each, e.g.
`--methods lora reflora reflora@factors`, mapped to the trainers' option names (core/options.py)."""

from __future__ import annotations

VARIANTS = {  # variant -> MethodOptions fields
    "": {},
    "normalize": {"reflora_normalize": True},  # det S* = 1
    "update": {"reflora_apply_to": "update"},  # S* on the optimizer's step
    "factors": {"reflora_apply_to": "factors"},  # balanced factors, optimizer moments carried
}


def split(name: str) -> tuple[str, dict]:
    """"reflora@factors" -> ("reflora", {"reflora_apply_to": "factors"}); a plain method name has no options."""
    method, _, variant = name.partition("@")
    if variant not in VARIANTS:
        raise SystemExit(f"error: unknown variant {variant!r} in {name!r}; use one of {sorted(v for v in VARIANTS if v)}")
    return method, dict(VARIANTS[variant])


def flags(options: dict) -> list[str]:
    """The same options as command-line flags."""
    return [f for k, v in options.items() for f in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
