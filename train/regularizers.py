"""Baseline regularizers trained in the same harness as MPD-SGR (``python -m train.run``).

SR, the sparse-gradient regularizer of Liu, Bu, Ding, Yu and Huang, "Enhancing Adversarial
Robustness in SNNs with Sparse Gradients" (ICML 2024): the loss is

    CE + lambda * mean over the batch of ((f(x + h v) - f(x)) / h)^2 / 2

where f is the true class's logit (the model's output, the mean of the logits over T), v the
direction of its input gradient normalized to unit L2 norm (held constant: no second-order
term) and h = 0.01. The finite difference is f's derivative along its own gradient, so the term
is about half the squared L2 norm of the true-class input gradient; it costs one input-gradient
backward and a second forward per step. This is the form of the authors' published training
code; their paper motivates it as a bound through the gradient's L1 norm (sparsity).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["sr_penalty", "SR_H"]

SR_H = 0.01  # the finite-difference step of the SR paper


def sr_penalty(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
               h: float = SR_H) -> torch.Tensor:
    """SR's term (module docstring) for the batch x -> logits = model(x); x must require grad
    and logits keep their graph (the term's gradient flows through both forwards)."""
    if not x.requires_grad:
        raise ValueError("sr_penalty needs x.requires_grad (the true-class logit's gradient is taken w.r.t. x)")
    if not h > 0:
        raise ValueError(f"h must be > 0, got {h}")
    f = logits.float().gather(1, y[:, None])[:, 0]
    (grad,) = torch.autograd.grad(f.sum(), x, retain_graph=True)
    v = grad.flatten(1)
    v = (v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(x).detach()
    f_step = model(x.detach() + h * v).float().gather(1, y[:, None])[:, 0]
    return ((f_step - f) / h).square().mean() / 2
