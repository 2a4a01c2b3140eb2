"""How the kernels address a [T, B, C, *spatial] tensor, and the tensors they write.

Both implementations of the kernels (Triton in ``lif.py``, C in ``cpu.py``) see every time
step of a [T, B, C, *spatial] (or [T, B, F]) tensor as [B, C, S], S = prod(spatial), and write
their outputs dense, in one of two per-step orders chosen from the input: ``[B, C, S]``
(contiguous) or ``[B, S, C]`` (channels-last, e.g. a BatchNorm2d output in
``torch.channels_last`` unflattened to [T, B, C, H, W]). The functions here decide that order,
allocate the outputs (the custom operators' fake implementations use the same ones, so fake and
real outputs agree in shape, dtype and strides) and make a dense copy where an input cannot be
read in place.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

__all__ = ["StepLayout", "step_layout", "forward_buffers", "backward_buffers", "dense_in", "readable", "empty_in"]


class StepLayout(NamedTuple):
    """A [T, B, C, *spatial] tensor seen as [T, B, C, S]."""

    T: int
    B: int
    C: int
    S: int
    # Element strides (t, b, c, s) of the [T, B, C, S] view; None when the
    # spatial dims do not merge into one stride.
    strides: tuple[int, int, int, int] | None
    # Channels vary faster than positions: the kernels write their outputs as [B, S, C] per step.
    channels_last: bool

    def dense_strides(self) -> tuple[int, int, int, int]:
        """Strides of the dense tensor the kernels write in this layout."""
        C, S = self.C, self.S
        if self.channels_last:
            return self.B * C * S, C * S, 1, C
        return self.B * C * S, C * S, S, 1

    def is_dense(self, *, time: bool = True) -> bool:
        """Laid out as the kernels write (ignoring the time stride unless ``time``)."""
        if self.strides is None:
            return False
        sizes = (self.T if time else 1, self.B, self.C, self.S)
        return all(n == 1 or st == want for n, st, want in zip(sizes, self.strides, self.dense_strides()))


def _merged_stride(sizes, strides) -> int | None:
    """The stride of the spatial dims flattened into one, or None if they do not merge."""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    if not dims:
        return 1
    for (_, outer), (n, inner) in zip(dims, dims[1:]):
        if outer != inner * n:
            return None
    return dims[-1][1]


def step_layout(t: torch.Tensor) -> StepLayout:
    """Shape and strides of a [T, B, C, *spatial] (or [T, B, F]) tensor as [T, B, C, S]. Memoized
    per (shape, strides): a launch asks for two to four layouts, each several microseconds of
    Python; symbolic sizes (torch.compile's fake tensors) are not hashable and are computed."""
    shape, stride = tuple(t.shape), t.stride()
    try:
        return _cached_layout(shape, stride)
    except TypeError:  # a SymInt
        return _layout(shape, stride)


def _layout(shape: tuple, stride: tuple) -> StepLayout:
    T, B, C = shape[:3]
    S = math.prod(shape[3:])
    s_stride = _merged_stride(shape[3:], stride[3:])
    strides = None if s_stride is None else (stride[0], stride[1], stride[2], s_stride)
    channels_last = strides is not None and C > 1 and S > 1 and strides[2] < strides[3]
    return StepLayout(T, B, C, S, strides, channels_last)


_cached_layout = functools.lru_cache(maxsize=1024)(_layout)


def empty_in(shape, channels_last: bool, *, dtype, device, channel_dim: int) -> torch.Tensor:
    """A new dense tensor of ``shape``, channels innermost if ``channels_last``."""
    shape = tuple(shape)
    if not channels_last:
        return torch.empty(shape, dtype=dtype, device=device)
    moved = shape[:channel_dim] + shape[channel_dim + 1:] + shape[channel_dim:channel_dim + 1]
    return torch.empty(moved, dtype=dtype, device=device).movedim(-1, channel_dim)


def dense_in(t: torch.Tensor, channels_last: bool, *, channel_dim: int) -> torch.Tensor:
    """t itself if it is dense in the given order, else a copy that is (one copy). For
    [T, B, C, *spatial] tensors (channel_dim 2) and [B, C, *spatial] states (channel_dim 1)."""
    steps = t if channel_dim == 2 else t.unsqueeze(0)
    if step_layout(steps)._replace(channels_last=channels_last).is_dense():
        return t
    return empty_in(t.shape, channels_last, dtype=t.dtype, device=t.device, channel_dim=channel_dim).copy_(t)


def readable(t: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, StepLayout]:
    """t (read-only by the kernels) and its layout; copied once to the written layout only
    when its spatial dims do not merge into one stride."""
    layout = step_layout(t)
    if layout.strides is None:
        t = empty_in(t.shape, channels_last, dtype=t.dtype, device=t.device, channel_dim=2).copy_(t)
        layout = step_layout(t)
    return t, layout


def forward_buffers(x: torch.Tensor, *, stats: bool, save_state: bool, save_u: bool,
                    layout: StepLayout | None = None):
    """New (spikes, u_saved, mean, var, v_T) for ``lif_forward(x, ...)``: shapes, dtypes and
    strides (the custom operator's fake implementation uses this too). Entries not asked for are None.
    layout: x's, if the caller has it already."""
    layout = layout or step_layout(x)
    cl = layout.channels_last

    def steps():
        return empty_in(x.shape, cl, dtype=x.dtype, device=x.device, channel_dim=2)

    spikes = steps()
    u_saved = steps() if save_u else None
    mean = torch.empty((layout.T, layout.C), dtype=torch.float32, device=x.device) if stats else None
    var = torch.empty_like(mean) if stats else None
    v_T = empty_in(x.shape[1:], cl, dtype=x.dtype, device=x.device, channel_dim=1) if save_state else None
    return spikes, u_saved, mean, var, v_T


def backward_buffers(u_saved: torch.Tensor, *, need_grad_v0: bool):
    """New (grad_x, grad_v0 or None) for ``lif_backward``: grad_x in u_saved's dtype and
    layout, grad_v0 float32."""
    cl = step_layout(u_saved).channels_last
    grad_x = empty_in(u_saved.shape, cl, dtype=u_saved.dtype, device=u_saved.device, channel_dim=2)
    grad_v0 = (empty_in(u_saved.shape[1:], cl, dtype=torch.float32, device=u_saved.device, channel_dim=1)
               if need_grad_v0 else None)
    return grad_x, grad_v0
