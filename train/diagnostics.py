"""Per-layer diagnostics of the membrane potential: what MPD-SGR did to each LIF layer.

For every LIF layer of a model, over a set of images in eval mode:

- ``firing_rate``: the share of (neuron, time step) pairs that spike;
- ``silent``: the share of (image, neuron) pairs that never spike in the T steps (a layer
  whose neurons stop firing lowers Omega without becoming robust: this makes it visible);
- ``in_window``: the share of membrane potentials u = h - V_th inside the surrogate window
  [-gamma, gamma], counted (the quantity MPD-SGR's Gaussian estimate stands for);
- ``omega``: the Gaussian estimate the regularizer minimizes, Omega of N(mean, var) per
  (time step, channel) of each batch, averaged (``mt.mpd_overlap``);
- ``u_mean`` / ``u_std``: mean and standard deviation of u over every element;
- ``cell_std``: the mean over (time step, channel) cells of u's standard deviation, the sigma
  of MPD-SGR's Gaussians (a collapsed variance shows here).

u is recomputed with the reference LIF from each layer's input, captured by a forward hook,
so the figures do not depend on the backend that ran the model.
"""

from __future__ import annotations

import torch
from torch import nn

import mpd_triton as mt

__all__ = ["layer_diagnostics", "DIAGNOSTICS", "diagnostics_table"]

# field -> (column title, format): the order of the report's table.
DIAGNOSTICS = {
    "firing_rate": ("firing rate", "{:.3f}"),
    "silent": ("silent", "{:.3f}"),
    "in_window": ("u in window (counted)", "{:.3f}"),
    "omega": ("Omega (Gaussian)", "{:.3f}"),
    "u_mean": ("mean u", "{:+.3f}"),
    "u_std": ("std u", "{:.3f}"),
    "cell_std": ("std u per (t, c)", "{:.3f}"),
}


@torch.no_grad()
def layer_diagnostics(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> list[dict]:
    """The module docstring's figures for every ``mt.LIF`` layer of ``model`` over ``images``
    ([N, C, H, W] in [0, 1], on the model's device); one dict per layer, in forward order."""
    layers = [m for m in model.modules() if isinstance(m, mt.LIF)]
    if not layers:
        raise ValueError("the model has no mt.LIF layers")
    if images.shape[0] == 0:
        raise ValueError("layer_diagnostics needs at least one image")
    sums = [dict.fromkeys(("spikes", "silent", "in_window", "omega", "u", "u2", "cell_std", "n", "pairs",
                           "cells", "batches"), 0.0) for _ in layers]
    captured: dict[int, torch.Tensor] = {}

    def keep_input(i):
        def hook(module, args, output):  # returns nothing: the output is left as it is
            captured.setdefault(i, args[0].detach())

        return hook

    hooks = [layer.register_forward_hook(keep_input(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            captured.clear()
            model(images[start:start + batch_size])
            for i, layer in enumerate(layers):
                if i not in captured:
                    raise RuntimeError(f"LIF layer {i + 1} was not used in the forward pass")
                _accumulate(sums[i], captured[i].float(), layer)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out = []
    for i, (s, layer) in enumerate(zip(sums, layers)):
        mean = s["u"] / s["n"]
        out.append({"layer": i + 1, "window": layer.surrogate.window, "firing_rate": s["spikes"] / s["n"],
                    "silent": s["silent"] / s["pairs"], "in_window": s["in_window"] / s["n"],
                    "omega": s["omega"] / s["batches"], "u_mean": mean,
                    "u_std": max(s["u2"] / s["n"] - mean * mean, 0.0) ** 0.5,
                    "cell_std": s["cell_std"] / s["cells"]})
    return out


def _accumulate(s: dict, x: torch.Tensor, layer: mt.LIF) -> None:
    ref = mt.lif_reference(x, layer.config, return_stats=True)
    u, spikes = ref.u.double(), ref.spikes.double()
    window = layer.surrogate.window
    s["spikes"] += float(spikes.sum())
    s["silent"] += float((spikes.sum(0) == 0).sum())  # (image, neuron) pairs with no spike in T steps
    s["pairs"] += spikes[0].numel()
    s["in_window"] += float((u.abs() <= window).sum())
    s["u"] += float(u.sum())
    s["u2"] += float(u.square().sum())
    s["n"] += u.numel()
    s["omega"] += float(mt.mpd_overlap(ref.mean, ref.var, window).mean())
    s["cell_std"] += float(ref.var.double().sqrt().sum())
    s["cells"] += ref.var.numel()
    s["batches"] += 1


def diagnostics_table(diagnostics: dict[str, list[dict]]) -> list[str]:
    """Markdown lines: one row per (run, layer), one column per figure."""
    lines = ["| run | layer | window | " + " | ".join(title for title, _ in DIAGNOSTICS.values()) + " |",
             "|---|---|---|" + "---|" * len(DIAGNOSTICS)]
    for name, layers in diagnostics.items():
        for d in layers:
            lines.append(f"| {name} | {d['layer']} | {d['window']:.3g} | "
                         + " | ".join(fmt.format(d[key]) for key, (_, fmt) in DIAGNOSTICS.items()) + " |")
    return lines
