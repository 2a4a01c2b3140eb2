"""Fused multi-step LIF kernels and their host-side launch functions.

Layout: every time step of a [T, B, C, *spatial] tensor is addressed as
[B, C, S] (S = prod(spatial), S = 1 for [T, B, F] inputs). One program owns a
tile of BLOCK_C channels x BLOCK_B samples x BLOCK_S positions for all T
steps, keeps the membrane state in float32 registers and walks the time loop
(forward) or the reverse time loop (backward).

Memory formats, and when a copy is made:

* The tensors the kernels write (spikes, saved u, grad_x, final state,
  grad of v_init) are dense, in one of two per-step orders chosen from the
  input: ``[B, C, S]`` (contiguous) or ``[B, S, C]`` (channels-last, e.g. a
  BatchNorm2d output in ``torch.channels_last`` unflattened to [T, B, C, H, W]).
  A ``CHANNELS_LAST`` constexpr switches the tile offsets, and the tile shape
  then puts channels innermost so that loads and stores stay coalesced.
* The tensors the kernels only read (x, grad_spikes) are read through their
  strides: any time stride (0 too: an input expanded over T is never
  materialized) and any batch / channel / position strides, as long as the
  spatial dims merge into one stride. Only an input whose spatial dims do
  not merge (e.g. ``x.transpose(3, 4)``) is copied, once, to the contiguous
  format before launch.
* The [B, C, *spatial] state tensors (v_init, the gradient of the final
  state) are copied to the output's order when they are not already in it
  (one copy, 1/T the size of x).

What the forward saves for backward is u = h - V_th in the input dtype, with
the spike encoded in its sign bit: spiking elements store |u| (so -0.0 becomes
+0.0) and silent ones store u < 0, whose sign survives rounding to
float16/bfloat16. The backward reads the spike back from the sign bit, so it
always agrees with the forward, in every dtype.

Statistics (docs/design.md, section 4): for each time step every program reduces the
count, mean and M2 of u over its tile per channel (mean first, then squared
deviations from it, from registers: no second read of h) and writes them to a
[T, P, C] partial buffer (P = number of (B, S) tiles). ``_stats_merge_kernel``
then combines the P partials of each (t, c) in a fixed order with the
pairwise-total form of Chan's formula::

    mean = sum_p n_p mean_p / M,   M2 = sum_p (M2_p + n_p (mean_p - mean)^2)

No atomics: repeated calls are bitwise equal, and the result stays accurate
when |mean| >> std.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..neuron import KernelParams
from ..surrogates import check_surrogate_kind, surrogate_grad
from .layout import (
    StepLayout,
    backward_buffers,
    dense_in,
    forward_buffers,
    readable,
    step_layout,
)

__all__ = ["lif_forward", "lif_backward", "forward_buffers", "backward_buffers", "tile_shape", "KERNELS",
           "SG_PARAM_SCALAR", "SG_PARAM_CHANNEL", "SG_PARAM_STRIDED"]

# Elements per program tile; to be tuned on a GPU (docs/benchmarks.md).
TILE_ELEMENTS = 2048


def tile_shape(B: int, C: int, S: int, channels_last: bool = False) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_B, BLOCK_S): powers of two, about TILE_ELEMENTS in all; the
    innermost dim of the memory layout gets the largest share."""
    if channels_last:
        block_c = min(triton.next_power_of_2(C), TILE_ELEMENTS)
        block_s = min(triton.next_power_of_2(S), max(1, TILE_ELEMENTS // block_c))
    else:
        block_s = min(triton.next_power_of_2(S), TILE_ELEMENTS)
        block_c = min(triton.next_power_of_2(C), max(1, TILE_ELEMENTS // block_s))
    block_b = min(triton.next_power_of_2(B), max(1, TILE_ELEMENTS // (block_s * block_c)))
    return block_c, block_b, block_s


# ---------------------------------------------------------------- kernels


@triton.jit
def _tile(B, C, S, in_stride_b, in_stride_c, in_stride_s, CHANNELS_LAST: tl.constexpr, IN_DENSE: tl.constexpr,
          BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's tile: offsets (int64, within one time step) in the layout the kernels
    write and in the tensor they read through its strides (the same offsets when that one is
    dense in this layout), mask, channel indices and elements per channel."""
    pid_p = tl.program_id(0)
    n_s_tiles = tl.cdiv(S, BLOCK_S)
    pid_b = pid_p // n_s_tiles
    pid_s = pid_p % n_s_tiles
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c3 = c[:, None, None]
    b3 = b[None, :, None]
    s3 = s[None, None, :]
    if CHANNELS_LAST:
        offs = b3.to(tl.int64) * C * S + s3 * C + c3
    else:
        offs = b3.to(tl.int64) * C * S + c3 * S + s3
    if IN_DENSE:
        in_offs = offs
    else:
        in_offs = c3.to(tl.int64) * in_stride_c + b3.to(tl.int64) * in_stride_b + s3.to(tl.int64) * in_stride_s
    mask = (c3 < C) & (b3 < B) & (s3 < S)
    # Elements per channel in this tile (the same for every channel).
    count = (tl.minimum(B - pid_b * BLOCK_B, BLOCK_B) * tl.minimum(S - pid_s * BLOCK_S, BLOCK_S)).to(tl.float32)
    return offs, in_offs, mask, c, count


@triton.jit(do_not_specialize=["T"])
def _lif_fwd_kernel(
    x_ptr, s_ptr, u_ptr, v0_ptr, vT_ptr, pmean_ptr, pm2_ptr,
    T, B, C, S, N, P,
    x_stride_t, x_stride_b, x_stride_c, x_stride_s,
    inv_tau, v_th, v_rest,
    DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr,
    HAS_V0: tl.constexpr, SAVE_U: tl.constexpr, SAVE_VT: tl.constexpr, STATS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, X_DENSE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
):
    offs, x_offs, mask, c, count = _tile(B, C, S, x_stride_b, x_stride_c, x_stride_s, CHANNELS_LAST, X_DENSE,
                                         BLOCK_C, BLOCK_B, BLOCK_S)
    inv_tau = tl.cast(inv_tau, tl.float32)
    v_th = tl.cast(v_th, tl.float32)
    v_rest = tl.cast(v_rest, tl.float32)
    if HAS_V0:
        v = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros([BLOCK_C, BLOCK_B, BLOCK_S], dtype=tl.float32) + v_rest
    stat_offs = tl.program_id(0) * C + c  # this tile's row of the [T, P, C] partials
    stat_mask = c < C
    for t in range(T):
        t_off = tl.cast(t, tl.int64) * N
        x = tl.load(x_ptr + tl.cast(t, tl.int64) * x_stride_t + x_offs, mask=mask, other=0.0).to(tl.float32)
        if DECAY_INPUT:
            h = v + (x - (v - v_rest)) * inv_tau
        else:
            h = v - (v - v_rest) * inv_tau + x
        u = h - v_th
        spike = u >= 0.0
        spike_f = spike.to(tl.float32)
        if HARD_RESET:
            v = tl.where(spike, v_rest, h)
        else:
            v = h - v_th * spike_f
        # bool -> float32 -> output dtype (the interpreter has no direct bool -> bfloat16 cast)
        tl.store(s_ptr + t_off + offs, spike_f.to(s_ptr.dtype.element_ty), mask=mask)
        if SAVE_U:
            tl.store(u_ptr + t_off + offs, tl.where(spike, tl.abs(u), u).to(u_ptr.dtype.element_ty), mask=mask)
        if STATS:
            u_in = tl.where(mask, u, 0.0)
            mean = tl.sum(tl.sum(u_in, axis=2), axis=1) / count
            dev = tl.where(mask, u - mean[:, None, None], 0.0)
            m2 = tl.sum(tl.sum(dev * dev, axis=2), axis=1)
            part = tl.cast(t, tl.int64) * P * C + stat_offs
            tl.store(pmean_ptr + part, mean, mask=stat_mask)
            tl.store(pm2_ptr + part, m2, mask=stat_mask)
    if SAVE_VT:
        tl.store(vT_ptr + offs, v.to(vT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stats_merge_kernel(
    pmean_ptr, pm2_ptr, mean_ptr, var_ptr,
    B, C, S, P,
    TILE_B: tl.constexpr, TILE_S: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Combine the P per-tile partials of each (t, c) in a fixed order (Chan, total form)."""
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    base = tl.cast(t, tl.int64) * P * C
    n_s_tiles = tl.cdiv(S, TILE_S)
    total = (B * S).to(tl.float32)

    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        n_p = (tl.minimum(B - (p // n_s_tiles) * TILE_B, TILE_B) * tl.minimum(S - (p % n_s_tiles) * TILE_S, TILE_S))
        n_p = tl.where(p < P, n_p, 0).to(tl.float32)
        m = tl.load(pmean_ptr + base + p[:, None] * C + c[None, :], mask=(p[:, None] < P) & c_mask[None, :], other=0.0)
        acc += tl.sum(n_p[:, None] * m, axis=0)
    mean = acc / total

    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        n_p = (tl.minimum(B - (p // n_s_tiles) * TILE_B, TILE_B) * tl.minimum(S - (p % n_s_tiles) * TILE_S, TILE_S))
        n_p = tl.where(p < P, n_p, 0).to(tl.float32)
        mask = (p[:, None] < P) & c_mask[None, :]
        m = tl.load(pmean_ptr + base + p[:, None] * C + c[None, :], mask=mask, other=0.0)
        m2 = tl.load(pm2_ptr + base + p[:, None] * C + c[None, :], mask=mask, other=0.0)
        d = m - mean[None, :]
        acc += tl.sum(m2 + n_p[:, None] * d * d, axis=0)

    tl.store(mean_ptr + t * C + c, mean, mask=c_mask)
    tl.store(var_ptr + t * C + c, acc / total, mask=c_mask)


@triton.jit(do_not_specialize=["T"])
def _lif_bwd_kernel(
    gs_ptr, u_ptr, a_ptr, b_ptr, gvT_ptr, gx_ptr, gv0_ptr, sgp_ptr,
    T, B, C, S, N,
    gs_stride_t, gs_stride_b, gs_stride_c, gs_stride_s,
    sgp_stride_t, sgp_stride_b, sgp_stride_c, sgp_stride_s,
    inv_tau, v_th, v_rest, surrogate_param,
    SURROGATE_KIND: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr, HAS_GRAD_S: tl.constexpr, MPD: tl.constexpr,
    HAS_GRAD_VT: tl.constexpr, WRITE_GRAD_V0: tl.constexpr, U_BITS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, GS_DENSE: tl.constexpr, SG_PARAM: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
):
    offs, gs_offs, mask, c, _ = _tile(B, C, S, gs_stride_b, gs_stride_c, gs_stride_s, CHANNELS_LAST, GS_DENSE,
                                      BLOCK_C, BLOCK_B, BLOCK_S)
    inv_tau = tl.cast(inv_tau, tl.float32)
    v_th = tl.cast(v_th, tl.float32)
    v_rest = tl.cast(v_rest, tl.float32)
    c_mask = c < C
    # The surrogate's parameter: the scalar (SG_PARAM_SCALAR), one per channel loaded once
    # (SG_PARAM_CHANNEL, like the MPD terms), or one per element read through its strides
    # every step (SG_PARAM_STRIDED). Masked lanes get 1.0 so no formula divides by zero.
    if SG_PARAM == 1:
        surrogate_param = tl.load(sgp_ptr + c, mask=c_mask, other=1.0).to(tl.float32)[:, None, None]
    elif SG_PARAM == 2:
        _, sgp_offs, _, _, _ = _tile(B, C, S, sgp_stride_b, sgp_stride_c, sgp_stride_s, CHANNELS_LAST, False,
                                     BLOCK_C, BLOCK_B, BLOCK_S)
    else:
        surrogate_param = tl.cast(surrogate_param, tl.float32)
    if HAS_GRAD_VT:
        gv = tl.load(gvT_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        gv = tl.zeros([BLOCK_C, BLOCK_B, BLOCK_S], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        t_off = tl.cast(t, tl.int64) * N
        raw = tl.load(u_ptr + t_off + offs, mask=mask, other=0.0)
        if U_BITS == 16:
            silent = raw.to(tl.int16, bitcast=True) < 0
        else:
            silent = raw.to(tl.int32, bitcast=True) < 0
        u = raw.to(tl.float32)
        if SG_PARAM == 2:
            param = tl.load(sgp_ptr + tl.cast(t, tl.int64) * sgp_stride_t + sgp_offs, mask=mask,
                            other=1.0).to(tl.float32)
        else:
            param = surrogate_param
        g = surrogate_grad(u, param, SURROGATE_KIND)
        # dv_t/dh_t
        if HARD_RESET:
            dv_dh = tl.where(silent, 1.0, 0.0)
            if not DETACH_RESET:
                dv_dh += (v_rest - v_th - u) * g
        else:
            dv_dh = tl.zeros([BLOCK_C, BLOCK_B, BLOCK_S], dtype=tl.float32) + 1.0
            if not DETACH_RESET:
                dv_dh -= v_th * g
        e = gv * dv_dh
        if HAS_GRAD_S:
            gs = tl.load(gs_ptr + tl.cast(t, tl.int64) * gs_stride_t + gs_offs, mask=mask, other=0.0).to(tl.float32)
            e += gs * g
        if MPD:
            # dL/du from the statistics: a[t, c] + b[t, c] * u (see lif_backward)
            a = tl.load(a_ptr + t * C + c, mask=c_mask, other=0.0)
            b = tl.load(b_ptr + t * C + c, mask=c_mask, other=0.0)
            e += a[:, None, None] + b[:, None, None] * u
        if DECAY_INPUT:
            gx = e * inv_tau
        else:
            gx = e
        tl.store(gx_ptr + t_off + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        gv = e * (1.0 - inv_tau)
    if WRITE_GRAD_V0:
        tl.store(gv0_ptr + offs, gv, mask=mask)


# The kernels the launchers run, by role. Tools that build them another way (bench/aot.py
# compiles each variant for a GPU it does not have) swap entries here, by these names.
KERNELS = {"forward": _lif_fwd_kernel, "stats_merge": _stats_merge_kernel, "backward": _lif_bwd_kernel}


# ---------------------------------------------------------------- launchers


def _grid(layout: StepLayout):
    B, C, S = layout.B, layout.C, layout.S
    block_c, block_b, block_s = tile_shape(B, C, S, layout.channels_last)
    P = triton.cdiv(B, block_b) * triton.cdiv(S, block_s)
    return (P, triton.cdiv(C, block_c)), P, (block_c, block_b, block_s)


def lif_forward(
    x: torch.Tensor,
    params: KernelParams,
    *,
    v_init: torch.Tensor | None = None,
    stats: bool = False,
    save_state: bool = False,
    save_u: bool = True,
):
    """Run the forward kernel on x [T, B, C, *spatial] (or [T, B, F]), read through its strides.

    Returns (spikes, u_saved, mean, var, v_T) as made by ``forward_buffers``:
    spikes and u_saved have x's shape, in x's memory format (contiguous or
    channels-last); u_saved is None unless save_u (only backward needs it),
    mean/var are float32 [T, C] or None, v_T is x.shape[1:] in x.dtype or None.
    """
    x, layout = readable(x, channels_last=False)
    T, B, C, S = layout.T, layout.B, layout.C, layout.S
    grid, P, (block_c, block_b, block_s) = _grid(layout)
    spikes, u_saved, mean, var, v_T = forward_buffers(x, stats=stats, save_state=save_state, save_u=save_u)
    if v_init is not None:
        v_init = dense_in(v_init, layout.channels_last, channel_dim=1)
    if stats:
        pmean = torch.empty((T, P, C), dtype=torch.float32, device=x.device)
        pm2 = torch.empty_like(pmean)
    else:
        pmean = pm2 = None
    KERNELS["forward"][grid](
        x, spikes, u_saved, v_init, v_T, pmean, pm2,
        T, B, C, S, B * C * S, P,
        *layout.strides,
        params.inv_tau, params.v_th, params.v_rest,
        DECAY_INPUT=params.decay_input, HARD_RESET=params.hard_reset,
        HAS_V0=v_init is not None, SAVE_U=save_u, SAVE_VT=save_state, STATS=stats,
        CHANNELS_LAST=layout.channels_last, X_DENSE=layout.is_dense(time=False),
        BLOCK_C=block_c, BLOCK_B=block_b, BLOCK_S=block_s,
    )
    if stats:
        merge_block_c = min(triton.next_power_of_2(C), 64)
        KERNELS["stats_merge"][(T, triton.cdiv(C, merge_block_c))](
            pmean, pm2, mean, var, B, C, S, P,
            TILE_B=block_b, TILE_S=block_s,
            BLOCK_C=merge_block_c, BLOCK_P=min(triton.next_power_of_2(P), 64),
        )
    return spikes, u_saved, mean, var, v_T


def lif_backward(
    grad_spikes: torch.Tensor | None,
    u_saved: torch.Tensor,
    params: KernelParams,
    *,
    mpd_a: torch.Tensor | None = None,
    mpd_b: torch.Tensor | None = None,
    grad_v_T: torch.Tensor | None = None,
    need_grad_v0: bool = False,
    surrogate_param: torch.Tensor | None = None,
):
    """Reverse time loop over u_saved (as written by ``lif_forward``); grad_spikes is read
    through its strides.

    mpd_a, mpd_b: float32 [T, C] with dL/du = a + b * u from the statistics'
    gradients (or both None). surrogate_param: None (the surrogate's scalar
    ``params.surrogate_param``), a float32 [C] tensor (one value per channel), or a
    float32 tensor of u_saved's rank whose dims are 1 or u_saved's (per element,
    broadcast, read through its strides). Returns (grad_x in u_saved's dtype and
    layout, grad_v0 float32 or None).
    """
    check_surrogate_kind(params.surrogate_kind)
    layout = step_layout(u_saved)
    u_saved = dense_in(u_saved, layout.channels_last, channel_dim=2)  # as lif_forward wrote it: no copy
    layout = step_layout(u_saved)
    T, B, C, S = layout.T, layout.B, layout.C, layout.S
    grid, _, (block_c, block_b, block_s) = _grid(layout)
    if grad_spikes is not None:
        grad_spikes, gs_layout = readable(grad_spikes, layout.channels_last)
        gs_strides, gs_dense = gs_layout.strides, gs_layout._replace(channels_last=layout.channels_last).is_dense(
            time=False)
    else:
        gs_strides, gs_dense = (0, 0, 0, 0), True
    if grad_v_T is not None:
        grad_v_T = dense_in(grad_v_T, layout.channels_last, channel_dim=1)
    sg_mode, sgp, sgp_strides = _surrogate_param_operand(surrogate_param, u_saved, layout.channels_last)
    grad_x, grad_v0 = backward_buffers(u_saved, need_grad_v0=need_grad_v0)
    KERNELS["backward"][grid](
        grad_spikes, u_saved, mpd_a, mpd_b, grad_v_T, grad_x, grad_v0, sgp,
        T, B, C, S, B * C * S,
        *gs_strides, *sgp_strides,
        params.inv_tau, params.v_th, params.v_rest, params.surrogate_param,
        SURROGATE_KIND=params.surrogate_kind, DECAY_INPUT=params.decay_input, HARD_RESET=params.hard_reset,
        DETACH_RESET=params.detach_reset, HAS_GRAD_S=grad_spikes is not None, MPD=mpd_a is not None,
        HAS_GRAD_VT=grad_v_T is not None, WRITE_GRAD_V0=need_grad_v0,
        U_BITS=u_saved.element_size() * 8,
        CHANNELS_LAST=layout.channels_last, GS_DENSE=gs_dense, SG_PARAM=sg_mode,
        BLOCK_C=block_c, BLOCK_B=block_b, BLOCK_S=block_s,
    )
    return grad_x, grad_v0


# The backward kernel's SG_PARAM modes: where the surrogate's parameter comes from.
SG_PARAM_SCALAR, SG_PARAM_CHANNEL, SG_PARAM_STRIDED = 0, 1, 2


def _surrogate_param_operand(surrogate_param: torch.Tensor | None, u_saved: torch.Tensor, channels_last: bool):
    """(SG_PARAM mode, tensor or None, its (t, b, c, s) element strides) for the backward kernel."""
    if surrogate_param is None:
        return SG_PARAM_SCALAR, None, (0, 0, 0, 0)
    p = surrogate_param.to(torch.float32)
    if p.dim() == 1:  # [C]: loaded once per program
        return SG_PARAM_CHANNEL, p.contiguous(), (0, 0, 0, 0)
    # Broadcast to u's shape without copying (stride 0 on the dims of size 1); copied once only
    # when the spatial dims of the expanded view do not merge into one stride.
    p, p_layout = readable(p.expand(u_saved.shape), channels_last)
    return SG_PARAM_STRIDED, p, p_layout.strides


