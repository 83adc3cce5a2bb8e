"""LARS (You et al. 2017) as MoCo v3 / the official MAE linear probe use it: SGD with momentum whose update of
each matrix is rescaled by trust * ||w|| / ||g + wd * w||; biases and norm parameters (<= 1-D) get neither
the rescaling nor weight decay."""

from __future__ import annotations

from typing import Iterable

import torch


class LARS(torch.optim.Optimizer):
    """LARS with momentum 0.9 and trust coefficient 0.001 by default (the official util/lars.py maths)."""

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - the Optimizer API
        """One update of every parameter with a gradient."""
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=g["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(update)
                    # a zero weight or zero update keeps the plain step (ratio 1), as the reference
                    ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                        g["trust_coefficient"] * w_norm / u_norm.clamp_min(1e-30),
                                        torch.ones_like(w_norm))
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-g["lr"])
        return loss
