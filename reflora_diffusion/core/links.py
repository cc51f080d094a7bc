"""Chain links: LoRA products merged into the base weights (COLA, RAC-LoRA, reinit), kept for export and resume.

A link is the (A, B) of a pair at the moment ``s * B @ A`` was added to the base weight. The exported LoRA
concatenates the links and the current factors, [A_1; ...; A_K] and [B_1 ... B_K]: one LoRA of rank K*r with the
same scaling reproduces base + all links on the original base model.
"""

from __future__ import annotations

import torch

from .pairs import LoraPair


def delta(pair: LoraPair, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """scaling * B @ A laid out like the base layer's weight."""
    base = pair.module.get_base_layer().weight
    dt = torch.promote_types(base.dtype, torch.float32)
    mat = pair.scaling * (pair.b_matrix(B).to(dt) @ pair.a_matrix(A).to(dt))
    if pair.kind == "embedding" or (pair.kind == "linear" and getattr(pair.module, "fan_in_fan_out", False)):
        mat = mat.T
    return mat.reshape(base.shape).to(base.dtype)


def _checksum(pair: LoraPair) -> float:
    return float(pair.module.get_base_layer().weight.double().sum())


class Links:
    """The merged links of every pair (empty until something is merged)."""

    def __init__(self, pairs: list[LoraPair]):
        self.pairs = pairs
        self.links: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in pairs]

    def __bool__(self) -> bool:
        return any(self.links)

    @torch.no_grad()
    def merge(self, factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Add s * B @ A of ``factors`` (default: each pair's current factors) to the base weights, as links."""
        if factors is None:
            factors = [(p.A.detach().clone(), p.B.detach().clone()) for p in self.pairs]
        for pair, pair_links, (A, B) in zip(self.pairs, self.links, factors):
            pair.module.get_base_layer().weight.add_(delta(pair, A, B))
            pair_links.append((A, B))

    def effective_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{pair name: (A, B, scaling)} of the LoRA to export (links and current factors concatenated)."""
        out = {}
        for pair, pair_links in zip(self.pairs, self.links):
            As = [a for a, _ in pair_links] + [pair.A.detach()]
            Bs = [b for _, b in pair_links] + [pair.B.detach()]
            key = pair.name if pair.adapter == "default" else f"{pair.name}[{pair.adapter}]"
            out[key] = (torch.cat(As, dim=0), torch.cat(Bs, dim=1), pair.scaling)
        return out

    def state_dict(self) -> dict:
        if not self:
            return {}
        return {"links": [[(a.cpu(), b.cpu()) for a, b in pl] for pl in self.links],
                "base_checksums": [_checksum(p) for p in self.pairs]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        links = state.get("links")
        if not links:
            return
        if len(links) != len(self.pairs):
            raise ValueError(f"the saved chain has {len(links)} layers, this model {len(self.pairs)}.")
        self.links = [[(a.to(p.A), b.to(p.B)) for a, b in pl] for pl, p in zip(links, self.pairs)]
        # The base weights may come back pristine (only LoRA weights were checkpointed) or already merged
        # (the whole model was): merge the links only where the checksum says they are missing.
        for pair, pl, saved in zip(self.pairs, self.links, state["base_checksums"]):
            weight = pair.module.get_base_layer().weight
            if abs(_checksum(pair) - saved) <= 1e-6 * (1.0 + float(weight.double().abs().sum())):
                continue
            for a, b in pl:
                weight.add_(delta(pair, a, b))
