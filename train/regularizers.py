"""Baseline regularizers trained in the same harness as MPD-SGR (``python -m train.run``).

SR, the sparse-gradient regularizer of Liu, Bu, Ding, Yu and Huang, "Enhancing Adversarial
Robustness in SNNs with Sparse Gradients" (ICML 2024): the loss is

    CE + lambda * mean over the batch of ((f(x + h v) - f(x)) / h)^2 / 2

where f is the true class's logit (the model's output, the mean of the logits over T), v the
direction of its input gradient normalized to unit L2 norm (held constant: no second-order
term) and h = 0.01. For a smooth model the finite difference is f's derivative along its own
gradient and the term about half the squared L2 norm of that gradient. A spiking network's
output is piecewise constant in x: there v is the surrogate gradient's direction and the
difference counts the spikes that a step of h along it flips. It costs one input-gradient
backward and a second forward per step; the second forward runs in train mode like the first
(its BatchNorm running statistics are updated twice a step, as in the authors' code). This is
the form of the authors' published training code; their paper motivates it as a bound through
the gradient's L1 norm (sparsity).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["sr_penalty", "replay_state", "SR_H"]

SR_H = 0.01  # the finite-difference step of the SR paper


def sr_penalty(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
               h: float = SR_H, rng_state: dict | None = None) -> torch.Tensor:
    """SR's term (module docstring) for the batch x -> logits = model(x); x must require grad
    and logits keep their graph (the term's gradient flows through both forwards). rng_state
    (``replay_state()`` taken before the forward that made ``logits``): the second forward draws
    the same random numbers (a Poisson encoding's spikes), so the difference is the model's, not
    two encodings', and the global RNG moves on as after the first forward alone."""
    if not x.requires_grad:
        raise ValueError("sr_penalty needs x.requires_grad (the true-class logit's gradient is taken w.r.t. x)")
    if not h > 0:
        raise ValueError(f"h must be > 0, got {h}")
    f = logits.float().gather(1, y[:, None])[:, 0]
    (grad,) = torch.autograd.grad(f.sum(), x, retain_graph=True)
    v = grad.flatten(1)
    v = (v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(x).detach()
    if rng_state is None:
        f_step = model(x.detach() + h * v).float().gather(1, y[:, None])[:, 0]
    else:
        devices = [torch.device("cuda", i) for i in rng_state.get("cuda", {})]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(rng_state["cpu"])
            for i, state in rng_state.get("cuda", {}).items():
                torch.cuda.set_rng_state(state, i)
            f_step = model(x.detach() + h * v).float().gather(1, y[:, None])[:, 0]
    return ((f_step - f) / h).square().mean() / 2


def replay_state(device: torch.device) -> dict:
    """The global RNG state that ``sr_penalty(..., rng_state=...)`` replays for its second forward."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = {device.index or 0: torch.cuda.get_rng_state(device)}
    return state
