"""How train.run and train.eval run a model fast: ``--compile`` and ``--channels-last``.

The model is compiled whole (``torch.compile(model)``, Inductor): the LIF layers are
opaque custom operators (the fused kernels), and Inductor fuses what surrounds them
(BatchNorm, pooling, the MPD-SGR loss on [T, C] statistics). Two rules keep it cheap:

* Only full batches run compiled: a batch of another size (the last, partial one of an
  epoch or of an evaluation) runs the same module eagerly, so it costs no recompilation
  and no dynamic-shape graph.
* It pays only when the run is long enough: compiling costs seconds to a minute before the
  first step, and saves a fraction of every later step. ``--compile`` / ``--no-compile``
  force it; by default (``auto``) a run compiles when it has at least
  ``COMPILE_MIN_STEPS`` full training steps (measured: docs/benchmarks.md, "CPU").

Inductor caches what it compiled on disk (``TORCHINDUCTOR_CACHE_DIR``, by default under
the system's temporary folder), so a second run of the same model starts faster.

``--channels-last`` stores the model's convolution weights, and so its activations, in
``torch.channels_last``: on the CPU, oneDNN's convolutions and PyTorch's pooling are faster in
that layout, and the LIF kernels read and write it in place. The default (``auto``) is on for
the CPU and off on a GPU, where it has not been measured yet.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["COMPILE_MIN_STEPS", "RECOMPILE_LIMIT", "should_compile", "BatchCompiled", "compile_for_batches",
           "use_channels_last", "to_memory_format"]

# Full training steps from which compiling pays (docs/benchmarks.md, "CPU": on the 2-core CPU the
# quick preset's model compiles in about 20 s and then saves about 10 ms a step).
COMPILE_MIN_STEPS = 3000
# Graphs kept per compiled function: the attacks' surrogates, BPTR and train/eval modes each make one.
RECOMPILE_LIMIT = 64


def should_compile(flag: bool | None, full_steps: int, unit: str = "training steps") -> tuple[bool, str]:
    """(compile?, why) for --compile (True), --no-compile (False) or auto (None); ``unit`` names what
    ``full_steps`` counts in the message (train.eval counts forward-backward passes of its batches)."""
    if flag is not None:
        return flag, "--compile" if flag else "--no-compile"
    if full_steps >= COMPILE_MIN_STEPS:
        return True, f"auto: {full_steps} {unit} >= {COMPILE_MIN_STEPS}, compiling pays"
    return False, f"auto: {full_steps} {unit} < {COMPILE_MIN_STEPS}, compiling would not pay"


def _raise_recompile_limits() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)


class BatchCompiled(nn.Module):
    """``model`` run compiled for batches of ``batch_size`` images and eagerly otherwise.

    The wrapper holds ``model`` as its only submodule (``modules()``, ``parameters()``,
    ``train()`` and the attacks' surrogate swaps reach the same layers); its state dict is
    the model's under the prefix ``model.``: save ``wrapper.model`` instead.
    """

    def __init__(self, model: nn.Module, batch_size: int, retain_graph: bool = False):
        super().__init__()
        self.model = model
        self.batch_size = batch_size
        _raise_recompile_limits()
        if retain_graph:  # a backward compiled with donated buffers refuses retain_graph=True (SR needs it)
            torch._functorch.config.donated_buffer = False
        object.__setattr__(self, "_compiled", torch.compile(model))  # not a submodule: no second parameter copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.batch_size:
            return self._compiled(x)
        return self.model(x)


def compile_for_batches(model: nn.Module, batch_size: int, enabled: bool, retain_graph: bool = False) -> nn.Module:
    """``BatchCompiled(model, batch_size)`` if enabled, else ``model`` itself. retain_graph: the
    training backpropagates twice through a forward (SR's input gradient, then the loss)."""
    return BatchCompiled(model, batch_size, retain_graph) if enabled else model


def use_channels_last(flag: bool | None, device: torch.device) -> bool:
    """--channels-last (True), --no-channels-last (False) or auto (None: on for the CPU)."""
    return flag if flag is not None else device.type == "cpu"


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """The model with its 4-d weights in channels-last (in place, as ``Module.to``), or as it is."""
    return model.to(memory_format=torch.channels_last) if channels_last else model
