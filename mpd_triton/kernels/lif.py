"""Fused multi-step LIF kernels and their host-side launch functions.

Layout: every time step of the input is viewed as [B, C, S] (S = prod(spatial),
S = 1 for [T, B, F] inputs), contiguous. One program owns a tile of
BLOCK_C channels x BLOCK_B samples x BLOCK_S positions for all T steps, keeps
the membrane state in float32 registers and walks the time loop (forward) or
the reverse time loop (backward).

What the forward saves for backward is u = h - V_th in the input dtype, with
the spike encoded in its sign bit: spiking elements store |u| (so -0.0 becomes
+0.0) and silent ones store u < 0, whose sign survives rounding to
float16/bfloat16. The backward reads the spike back from the sign bit, so it
always agrees with the forward, in every dtype.

Statistics (design section 4): for each time step every program reduces the
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

import contextlib

import torch
import triton
import triton.language as tl

from ..neuron import LIFConfig
from ..surrogates import surrogate_grad

__all__ = ["lif_forward", "lif_backward", "tile_shape", "device_guard", "INTERPRETED"]

# Elements per program tile. Issue 5 tunes this on the GPU.
TILE_ELEMENTS = 2048


def device_guard(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def tile_shape(B: int, C: int, S: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_B, BLOCK_S): powers of two, about TILE_ELEMENTS in all."""
    block_s = min(triton.next_power_of_2(S), TILE_ELEMENTS)
    block_c = min(triton.next_power_of_2(C), max(1, TILE_ELEMENTS // block_s))
    block_b = min(triton.next_power_of_2(B), max(1, TILE_ELEMENTS // (block_s * block_c)))
    return block_c, block_b, block_s


@triton.jit
def _tile(pid_p, pid_c, B, C, S, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets (int64, within one time step), mask and channel indices of a program's tile."""
    n_s_tiles = tl.cdiv(S, BLOCK_S)
    pid_b = pid_p // n_s_tiles
    pid_s = pid_p % n_s_tiles
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c3 = c[:, None, None]
    b3 = b[None, :, None]
    s3 = s[None, None, :]
    offs = b3.to(tl.int64) * C * S + c3 * S + s3
    mask = (c3 < C) & (b3 < B) & (s3 < S)
    # Elements per channel in this tile (the same for every channel).
    count = (tl.minimum(B - pid_b * BLOCK_B, BLOCK_B) * tl.minimum(S - pid_s * BLOCK_S, BLOCK_S)).to(tl.float32)
    return offs, mask, c, count


@triton.jit(do_not_specialize=["T"])
def _lif_fwd_kernel(
    x_ptr, s_ptr, u_ptr, v0_ptr, vT_ptr, pmean_ptr, pm2_ptr,
    T, B, C, S, N, P,
    inv_tau, v_th, v_rest,
    DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr,
    HAS_V0: tl.constexpr, SAVE_U: tl.constexpr, SAVE_VT: tl.constexpr, STATS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs, mask, c, count = _tile(pid_p, pid_c, B, C, S, BLOCK_C, BLOCK_B, BLOCK_S)
    inv_tau = tl.cast(inv_tau, tl.float32)
    v_th = tl.cast(v_th, tl.float32)
    v_rest = tl.cast(v_rest, tl.float32)
    if HAS_V0:
        v = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros([BLOCK_C, BLOCK_B, BLOCK_S], dtype=tl.float32) + v_rest
    stat_offs = pid_p * C + c
    stat_mask = c < C
    for t in range(T):
        t_off = tl.cast(t, tl.int64) * N
        x = tl.load(x_ptr + t_off + offs, mask=mask, other=0.0).to(tl.float32)
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
    gs_ptr, u_ptr, a_ptr, b_ptr, gvT_ptr, gx_ptr, gv0_ptr,
    T, B, C, S, N,
    inv_tau, v_th, v_rest, sg_param,
    SURROGATE: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr, HAS_GRAD_S: tl.constexpr, MPD: tl.constexpr,
    HAS_GRAD_VT: tl.constexpr, WRITE_GRAD_V0: tl.constexpr, U_BITS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs, mask, c, count = _tile(pid_p, pid_c, B, C, S, BLOCK_C, BLOCK_B, BLOCK_S)
    inv_tau = tl.cast(inv_tau, tl.float32)
    v_th = tl.cast(v_th, tl.float32)
    v_rest = tl.cast(v_rest, tl.float32)
    sg_param = tl.cast(sg_param, tl.float32)
    if HAS_GRAD_VT:
        gv = tl.load(gvT_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        gv = tl.zeros([BLOCK_C, BLOCK_B, BLOCK_S], dtype=tl.float32)
    c_mask = c < C
    for i in range(T):
        t = T - 1 - i
        t_off = tl.cast(t, tl.int64) * N
        raw = tl.load(u_ptr + t_off + offs, mask=mask, other=0.0)
        if U_BITS == 16:
            silent = raw.to(tl.int16, bitcast=True) < 0
        else:
            silent = raw.to(tl.int32, bitcast=True) < 0
        u = raw.to(tl.float32)
        g = surrogate_grad(u, sg_param, SURROGATE)
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
            gs = tl.load(gs_ptr + t_off + offs, mask=mask, other=0.0).to(tl.float32)
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


def _grid(B: int, C: int, S: int):
    block_c, block_b, block_s = tile_shape(B, C, S)
    P = triton.cdiv(B, block_b) * triton.cdiv(S, block_s)
    return (P, triton.cdiv(C, block_c)), P, (block_c, block_b, block_s)


def lif_forward(
    x: torch.Tensor,
    cfg: LIFConfig,
    *,
    v_init: torch.Tensor | None = None,
    stats: bool = False,
    save_state: bool = False,
    save_u: bool = True,
):
    """Run the forward kernel on a contiguous x viewed as [T, B, C, S].

    Returns (spikes, u_saved, mean, var, v_T); u_saved is None unless save_u
    (only backward needs it), mean/var are float32 [T, C] or None, v_T is
    [B, C, S] in x.dtype or None.
    """
    T, B, C, S = x.shape
    N = B * C * S
    grid, P, (block_c, block_b, block_s) = _grid(B, C, S)
    spikes = torch.empty_like(x)
    u_saved = torch.empty_like(x) if save_u else None
    v_T = torch.empty((B, C, S), dtype=x.dtype, device=x.device) if save_state else None
    if stats:
        pmean = torch.empty((T, P, C), dtype=torch.float32, device=x.device)
        pm2 = torch.empty_like(pmean)
    else:
        pmean = pm2 = None
    _lif_fwd_kernel[grid](
        x, spikes, u_saved, v_init, v_T, pmean, pm2,
        T, B, C, S, N, P,
        cfg.inv_tau, cfg.v_th, cfg.v_rest,
        DECAY_INPUT=cfg.decay_input, HARD_RESET=cfg.hard_reset,
        HAS_V0=v_init is not None, SAVE_U=save_u, SAVE_VT=save_state, STATS=stats,
        BLOCK_C=block_c, BLOCK_B=block_b, BLOCK_S=block_s,
    )
    mean = var = None
    if stats:
        mean = torch.empty((T, C), dtype=torch.float32, device=x.device)
        var = torch.empty_like(mean)
        merge_block_c = min(triton.next_power_of_2(C), 64)
        _stats_merge_kernel[(T, triton.cdiv(C, merge_block_c))](
            pmean, pm2, mean, var, B, C, S, P,
            TILE_B=block_b, TILE_S=block_s,
            BLOCK_C=merge_block_c, BLOCK_P=min(triton.next_power_of_2(P), 64),
        )
    return spikes, u_saved, mean, var, v_T


def lif_backward(
    grad_spikes: torch.Tensor | None,
    u_saved: torch.Tensor,
    cfg: LIFConfig,
    *,
    mpd_a: torch.Tensor | None = None,
    mpd_b: torch.Tensor | None = None,
    grad_v_T: torch.Tensor | None = None,
    need_grad_v0: bool = False,
):
    """Reverse time loop. All tensors contiguous, viewed as [T, B, C, S].

    mpd_a, mpd_b: float32 [T, C] with dL/du = a + b * u from the statistics'
    gradients (or both None). Returns (grad_x in u_saved.dtype, grad_v0 float32 or None).
    """
    T, B, C, S = u_saved.shape
    N = B * C * S
    grid, _, (block_c, block_b, block_s) = _grid(B, C, S)
    grad_x = torch.empty_like(u_saved)
    grad_v0 = torch.empty((B, C, S), dtype=torch.float32, device=u_saved.device) if need_grad_v0 else None
    sg = cfg.surrogate
    _lif_bwd_kernel[grid](
        grad_spikes, u_saved, mpd_a, mpd_b, grad_v_T, grad_x, grad_v0,
        T, B, C, S, N,
        cfg.inv_tau, cfg.v_th, cfg.v_rest, sg.param,
        SURROGATE=sg.kind, DECAY_INPUT=cfg.decay_input, HARD_RESET=cfg.hard_reset,
        DETACH_RESET=cfg.detach_reset, HAS_GRAD_S=grad_spikes is not None, MPD=mpd_a is not None,
        HAS_GRAD_VT=grad_v_T is not None, WRITE_GRAD_V0=need_grad_v0,
        U_BITS=u_saved.element_size() * 8,
        BLOCK_C=block_c, BLOCK_B=block_b, BLOCK_S=block_s,
    )
    return grad_x, grad_v0


def _is_interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


INTERPRETED = _is_interpreted(_lif_fwd_kernel)
