"""Per-layer diagnostics of the membrane potential: what MPD-SGR did to each LIF layer.

For every LIF layer of a model, over a set of images in eval mode:

- ``firing_rate``: the share of (neuron, time step) pairs that spike;
- ``silent``: the share of (image, neuron) pairs that never spike in the T steps (a layer
  whose neurons stop firing lowers Omega without becoming robust: this makes it visible);
- ``in_window``: the share of membrane potentials u = h - V_th inside the window, counted (the
  quantity MPD-SGR's Gaussian estimate stands for): the surrogate's [-gamma, gamma] (or the run's
  --gamma), or with the relative window [-k sigma, k sigma] of each cell's sigma;
- ``omega``: the Gaussian estimate the regularizer minimizes, with the run's window and
  granularity, per batch, averaged over the images (``mt.window_overlap``);
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
def layer_diagnostics(model: nn.Module, images: torch.Tensor, batch_size: int = 250,
                      options: mt.MPDOptions | None = None) -> list[dict]:
    """The module docstring's figures for every ``mt.LIF`` layer of ``model`` over ``images``
    ([N, C, H, W] in [0, 1], on the model's device); one dict per layer, in forward order.
    options: those of the run's ``mt.MPDSGR`` (default: the paper's, ``mt.MPDOptions()``)."""
    options = mt.MPDOptions() if options is None else options
    layers = [m for m in model.modules() if isinstance(m, mt.LIF)]
    if not layers:
        raise ValueError("the model has no mt.LIF layers")
    if images.shape[0] == 0:
        raise ValueError("layer_diagnostics needs at least one image")
    sums = [dict.fromkeys(("spikes", "silent", "in_window", "omega", "u", "u2", "cell_std", "n", "pairs",
                           "cells", "images"), 0.0) for _ in layers]
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
                _accumulate(sums[i], captured[i].float(), layer, options)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out = []
    for i, (s, layer) in enumerate(zip(sums, layers)):
        mean = s["u"] / s["n"]
        shown = f"{options.k:g} sigma" if options.window == "relative" else options.layer_gamma(layer)
        out.append({"layer": i + 1, "window": shown, "firing_rate": s["spikes"] / s["n"],
                    "silent": s["silent"] / s["pairs"], "in_window": s["in_window"] / s["n"],
                    "omega": s["omega"] / s["images"], "u_mean": mean,
                    "u_std": max(s["u2"] / s["n"] - mean * mean, 0.0) ** 0.5,
                    "cell_std": s["cell_std"] / s["cells"]})
    return out


def _accumulate(s: dict, x: torch.Tensor, layer: mt.LIF, options: mt.MPDOptions) -> None:
    ref = mt.lif_reference(x, layer.config, return_stats=True)
    u, spikes = ref.u.double(), ref.spikes.double()
    images = x.shape[1]
    gamma = options.layer_gamma(layer)
    if options.window == "relative":  # each (t, c) cell's k sigma, broadcast over [T, B, C, ...]
        sigma = torch.sqrt(ref.var.double() + options.eps)
        half_width = (options.k * sigma).view(*sigma.shape[:1], 1, sigma.shape[1], *([1] * (u.dim() - 3)))
    else:
        half_width = gamma
    s["spikes"] += float(spikes.sum())
    s["silent"] += float((spikes.sum(0) == 0).sum())  # (image, neuron) pairs with no spike in T steps
    s["pairs"] += spikes[0].numel()
    s["in_window"] += float((u.abs() <= half_width).sum())
    s["u"] += float(u.sum())
    s["u2"] += float(u.square().sum())
    s["n"] += u.numel()
    omega = options.overlap(ref.mean, ref.var, gamma)
    s["omega"] += float(omega.mean()) * images  # weighted by the batch's images
    s["images"] += images
    s["cell_std"] += float(ref.var.double().sqrt().sum())
    s["cells"] += ref.var.numel()


def diagnostics_table(diagnostics: dict[str, list[dict]]) -> list[str]:
    """Markdown lines: one row per (run, layer), one column per figure."""
    lines = ["| run | layer | window | " + " | ".join(title for title, _ in DIAGNOSTICS.values()) + " |",
             "|---|---|---|" + "---|" * len(DIAGNOSTICS)]
    for name, layers in diagnostics.items():
        for d in layers:
            window = d["window"] if isinstance(d["window"], str) else f"{d['window']:.3g}"
            lines.append(f"| {name} | {d['layer']} | {window} | "
                         + " | ".join(fmt.format(d[key]) for key, (_, fmt) in DIAGNOSTICS.items()) + " |")
    return lines


# "Well above chance": a model below this multiple of chance accuracy is reported as at chance.
CHANCE_FACTOR = 1.5


def diagnose(clean: float, num_classes: int, layers: list[dict], n_images: int) -> list[str]:
    """What makes a model's robustness figures meaningless, said before them: clean accuracy not well
    above chance (below CHANCE_FACTOR x chance on ``n_images`` test images), and LIF layers that never fire
    (``layers``: layer_diagnostics' figures). An empty list: nothing found."""
    problems = []
    chance = 1.0 / num_classes
    if clean < CHANCE_FACTOR * chance:
        problems.append(f"the model is at chance: clean accuracy {100 * clean:.1f}% on {n_images} test images, "
                        f"chance {100 * chance:.0f}%")
    silent = [str(d["layer"]) for d in layers if d["firing_rate"] == 0.0]
    mostly = [f"{d['layer']} ({100 * d['silent']:.0f}% of its neurons silent)" for d in layers
              if d["firing_rate"] > 0.0 and d["silent"] >= 0.99]
    if silent:
        problems.append(f"LIF layer{'s' if len(silent) > 1 else ''} {', '.join(silent)} never fire"
                        f"{'s' if len(silent) == 1 else ''}")
    if mostly:
        problems.append(f"LIF layer{'s' if len(mostly) > 1 else ''} {', '.join(mostly)} almost never fire"
                        f"{'s' if len(mostly) == 1 else ''}")
    return problems
