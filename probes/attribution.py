"""Attribution patching (AtP): the first-order estimate of activation patching, every site from one backward pass.

For a base model with refusal score m and a site activation a (layer ℓ, component, at the matched text
positions p), patching in the donor's activation changes the score by approximately

    Δm(site) ≈ Σ_p (a_donor[p] − a_base[p]) · ∂m/∂a_base[p]

(Nanda 2023, "Attribution patching"; Syed et al. 2023; Kramár et al. 2024, "AtP*"). One forward and one
backward of the base model give the gradient at every site at once, so a whole layer × component grid costs
about three forwards per direction instead of one forward per site. It is an approximation: where the score
responds non-linearly to a site (saturated softmax, attention that switches target, large activation changes in
early layers) it can be far off; `vlsafe locate --method attribution` is a screen, and exact patching of the
layers it ranks first is the confirmation (`benchmarks/bench_locate.py --atp` measures how well the two agree).

Only the `first_token` score is supported (it is one differentiable function of the last-position logits).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from vlsafe.probes import models as M
from vlsafe.probes import scores as S
from vlsafe.probes.interventions import removing_hooks
from vlsafe.probes.patching import Site, site_hook

__all__ = ["site_gradients", "attribution_deltas"]


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters out of the graph for the duration (no weight gradients are built); restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def site_gradients(lm: Any, batch: Any, *, sites: Sequence[Site], rows: torch.Tensor, pos: torch.Tensor,
                   targets: Sequence[int]) -> tuple[torch.Tensor, dict[Site, torch.Tensor]]:
    """(scores `[n]` fp64, ∂(score of each row)/∂(site activation) at the positions `rows, pos` `[M, d]` per site).

    One forward with the graph from the token embeddings on (weights frozen, no vision-tower graph) and one
    backward; rows are independent, so the gradient of the summed score is each row's own."""
    model = lm.model
    acts: dict[Site, torch.Tensor] = {}
    with contextlib.ExitStack() as stack, torch.enable_grad():
        stack.enter_context(_frozen(model))

        def grad_from_here(module: Any, args: Any, output: Any) -> torch.Tensor:
            return output.detach().requires_grad_(True)
        embed = M.embed_tokens(model).register_forward_hook(grad_from_here)
        stack.enter_context(removing_hooks([embed]))
        for site in sites:
            stack.enter_context(site_hook(lm, site, lambda h, site=site: acts.__setitem__(site, h)))
        score = S.first_token_score(S.last_logits(model, batch).float(), targets)
        keys = list(sites)
        grads = torch.autograd.grad(score.sum(), [acts[k] for k in keys], allow_unused=True)
    picked = {}
    for k, g in zip(keys, grads):
        g = torch.zeros_like(acts[k]) if g is None else g
        picked[k] = g[rows.to(g.device), pos.to(g.device)].detach().float().cpu()
    return score.detach().cpu(), picked


def attribution_deltas(grads: dict[Site, torch.Tensor], base_acts: dict[Site, torch.Tensor],
                       donor_acts: dict[Site, torch.Tensor], rows: torch.Tensor, n: int) -> dict[Site, torch.Tensor]:
    """Estimated score change per row `[n]` (fp64) of patching each site: Σ over the row's positions of
    (donor − base) · gradient."""
    out = {}
    for site, g in grads.items():
        per_pos = ((donor_acts[site].float().cpu() - base_acts[site].float().cpu()) * g).sum(-1).double()
        out[site] = torch.zeros(n, dtype=torch.float64).index_add_(0, rows.cpu(), per_pos)
    return out
