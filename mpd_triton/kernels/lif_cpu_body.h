/* The dtype-dependent half of lif_cpu.c, included once per dtype with
 *   LIF_SUFFIX   the name suffix (f32, bf16, f16)
 *   LIF_TYPE     the element type of x, spikes, u_saved, grad_spikes and grad_x
 *   LIF_LOAD     LIF_TYPE -> float;  LIF_STORE: float -> LIF_TYPE;  LIF_NEGATIVE: the sign bit
 * and #undef-ing them at the end. Exported: lif_fwd_<suffix>, lif_bwd_<suffix>.
 */

#ifndef LIF_CPU_NAMES
#define LIF_CPU_NAMES
#define LIF_CAT_(a, b) a##_##b
#define LIF_CAT(a, b) LIF_CAT_(a, b)
#define LIF_NAME(name) LIF_CAT(name, LIF_SUFFIX)
#endif

/* One element of fwd_rows: the state update at index K, u = h - v_th left in `u` (and kept in kr). A
 * macro over the row's restrict pointers rather than a function: through a function's parameters GCC
 * loses that the rows do not overlap and guards every row's loop with overlap checks, which on rows of
 * a few channels (channels-last) cost more than the row. */
#define LIF_FWD_ONE(K)                                                                                          \
    const float xv = LIF_LOAD(xr[K]);                                                                           \
    const float vv = vr[K];                                                                                     \
    const float h = decay ? vv + (xv - (vv - v_rest)) * inv_tau : vv - (vv - v_rest) * inv_tau + xv;            \
    const float u = h - v_th;                                                                                   \
    const int spike = u >= 0.0f;                                                                                \
    const float sf = spike ? 1.0f : 0.0f;                                                                       \
    vr[K] = hard ? (spike ? v_rest : h) : h - v_th * sf;                                                        \
    sr[K] = LIF_STORE(sf);                                                                                      \
    if (save_u) ur[K] = LIF_STORE(spike ? fabsf(u) : u); /* the spike in the sign bit */                        \
    kr[K] = u;

/* One time step of a tile: `rows` rows of n contiguous elements; row r of x starts at
 * x + r * x_rs, of the outputs (s, us) at r * o_rs, of the state and u in scratch at r * n.
 * decay, save_u and sums are compile-time constants at every call site. sums == SUMS_LANES (S >= LANES;
 * a row is n_c channels of S positions): the first pass of tile_stats done here, on u as it is computed
 * (the same additions in the same order, so the same bits): each channel's whole LANES-chunks summed in
 * LANES float lanes, rowsum[r * n_c + cc] = their lanes_total. */
INLINE void LIF_NAME(fwd_rows)(const LIF_TYPE* RESTRICT x, int64_t x_rs, LIF_TYPE* RESTRICT s,
                               LIF_TYPE* RESTRICT us, int64_t o_rs, float* RESTRICT v, float* RESTRICT u_keep,
                               int64_t rows, int64_t n, float inv_tau, float v_th, float v_rest, int hard,
                               const int decay, const int save_u, const int sums, int64_t S, int64_t n_c,
                               double* RESTRICT rowsum) {
    for (int64_t r = 0; r < rows; r++) {
        const LIF_TYPE* RESTRICT xr = x + r * x_rs;
        LIF_TYPE* RESTRICT sr = s + r * o_rs;
        LIF_TYPE* RESTRICT ur = save_u ? us + r * o_rs : us;
        float* RESTRICT vr = v + r * n;
        float* RESTRICT kr = u_keep + r * n;
        if (sums == SUMS_LANES) {
            for (int64_t cc = 0; cc < n_c; cc++) {
                float acc[LANES] = {0.0f};
                int64_t p = cc * S;
                const int64_t end = p + S - S % LANES;
                for (; p < end; p += LANES)
                    for (int j = 0; j < LANES; j++) {
                        LIF_FWD_ONE(p + j)
                        acc[j] += u;
                    }
                for (; p < (cc + 1) * S; p++) {
                    LIF_FWD_ONE(p)
                }
                rowsum[r * n_c + cc] = (double)lanes_total(acc);
            }
        } else {
            for (int64_t k = 0; k < n; k++) {
                LIF_FWD_ONE(k)
            }
        }
    }
}
#undef LIF_FWD_ONE

static void LIF_NAME(fwd_dispatch)(const LIF_TYPE* x, int64_t x_rs, LIF_TYPE* s, LIF_TYPE* us, int64_t o_rs, float* v,
                                   float* u_keep, int64_t rows, int64_t n, float inv_tau, float v_th, float v_rest,
                                   int hard, int decay, int sums, int64_t S, int64_t n_c, double* rowsum) {
#define LIF_FWD_CALL(DECAY, SAVE_U, SUMS)                                                                       \
    LIF_NAME(fwd_rows)(x, x_rs, s, us, o_rs, v, u_keep, rows, n, inv_tau, v_th, v_rest, hard, DECAY, SAVE_U, SUMS, \
                       S, n_c, rowsum)
#define LIF_FWD_SUMS(DECAY, SAVE_U)                                   \
    if (sums == SUMS_LANES) LIF_FWD_CALL(DECAY, SAVE_U, SUMS_LANES); \
    else LIF_FWD_CALL(DECAY, SAVE_U, SUMS_NONE);
    if (decay) {
        if (us) { LIF_FWD_SUMS(1, 1) }
        else { LIF_FWD_SUMS(1, 0) }
    } else {
        if (us) { LIF_FWD_SUMS(0, 1) }
        else { LIF_FWD_SUMS(0, 0) }
    }
#undef LIF_FWD_SUMS
#undef LIF_FWD_CALL
}

/* Forward over tiles [tile_begin, tile_end). x: [T, B, C, S] with dense [C, S] per sample,
 * time and batch strides x_stride_t, x_stride_b (elements; 0 allowed); spikes, u_saved (or NULL): dense [T, B, C, S]; v0 (or
 * NULL: v_rest): float32 [B, C, S]; vT (or NULL): [B, C, S]; pmean, pm2 (or NULL): [T, P, C] partials,
 * P = ceil(B / block_b). scratch: lif_cpu_scratch_floats(block_b, block_c, S) floats. */
void LIF_NAME(lif_fwd)(const LIF_TYPE* x, int64_t x_stride_t, int64_t x_stride_b, LIF_TYPE* spikes, LIF_TYPE* u_saved, const float* v0,
                       LIF_TYPE* vT, double* pmean, double* pm2, int64_t T, int64_t B, int64_t C, int64_t S,
                       int64_t block_b, int64_t block_c, float inv_tau, float v_th, float v_rest, int32_t decay_input,
                       int32_t hard_reset, int64_t tile_begin, int64_t tile_end, float* scratch) {
    const int64_t N = B * C * S;
    const int64_t P = (B + block_b - 1) / block_b;
    const int64_t tile_elems = block_b * block_c * S;
    float* v = scratch;
    float* u = scratch + tile_elems;
    double* acc = (double*)(scratch + 2 * tile_elems + (tile_elems & 1)); /* 8-byte aligned */
    for (int64_t tile = tile_begin; tile < tile_end; tile++) {
        const tile_t tl = tile_at(tile, B, C, S, block_b, block_c);
        const int64_t pb = tl.pb, b0 = tl.b0, c0 = tl.c0, n_b = tl.n_b, n_c = tl.n_c, n_row = tl.n_row;
        const int64_t off = tl.offset;
        tile_load(v, v0, v_rest, tl, C, S);
        const int sums = pmean && S >= LANES ? SUMS_LANES : SUMS_NONE;
        for (int64_t t = 0; t < T; t++) {
            LIF_NAME(fwd_dispatch)(x + t * x_stride_t + b0 * x_stride_b + c0 * S, x_stride_b, spikes + t * N + off,
                                   u_saved ? u_saved + t * N + off : NULL, C * S, v, u, n_b, n_row, inv_tau, v_th,
                                   v_rest, hard_reset, decay_input, sums, S, n_c, stats_rowsum(acc, n_c));
            if (pmean) {
                const int64_t part = (t * P + pb) * C + c0;
                tile_stats(u, n_b, n_c, S, pmean + part, pm2 + part, acc, sums);
            }
        }
        if (vT)
            for (int64_t bi = 0; bi < n_b; bi++)
                for (int64_t k = 0; k < n_row; k++) vT[off + bi * C * S + k] = LIF_STORE(v[bi * n_row + k]);
    }
}

/* One time step of a tile, in reverse time: `rows` rows of n contiguous elements; row r of
 * grad_spikes starts at gs + r * gs_rs (gs_rs = 0 and gs a row of zeros when the spikes have
 * no gradient), of u_saved and grad_x at r * o_rs, of dL/dv in scratch at r * gv_rs, of the
 * surrogate's parameter at p + r * p_rs (p_rs = 0: the same row for every sample). a and b
 * (the MPD-SGR term dL/du = a + b u) are per element of a row (step = 1: a row walks
 * channels) or one value (step = 0: a row is one channel's positions). kind and step are
 * compile-time constants at every call site. */
INLINE void LIF_NAME(bwd_rows)(const LIF_TYPE* RESTRICT gs, int64_t gs_rs, const LIF_TYPE* RESTRICT us,
                               LIF_TYPE* RESTRICT gx, int64_t o_rs, float* RESTRICT gv, int64_t gv_rs, int64_t rows,
                               int64_t n, const float* RESTRICT a, const float* RESTRICT b, const float* RESTRICT p,
                               int64_t p_rs, float gx_scale, float keep, float v_th, float v_rest, int hard,
                               int detach, const int kind, const int step) {
    const float hard_w = hard ? 1.0f : 0.0f, soft_w = 1.0f - hard_w, attached = detach ? 0.0f : 1.0f;
    for (int64_t r = 0; r < rows; r++) {
        const LIF_TYPE* RESTRICT gsr = gs + r * gs_rs;
        const LIF_TYPE* RESTRICT usr = us + r * o_rs;
        LIF_TYPE* RESTRICT gxr = gx + r * o_rs;
        float* RESTRICT gvr = gv + r * gv_rs;
        const float* RESTRICT pr = p + r * p_rs;
        for (int64_t k = 0; k < n; k++) {
            const LIF_TYPE raw = usr[k];
            const int silent = LIF_NEGATIVE(raw);
            const float u = LIF_LOAD(raw);
            const int64_t j = step ? k : 0;
            const float g = surrogate_grad(kind, u, pr[k]);
            /* dv_t / dh_t of both resets, blended by 0/1 weights (exact: x * 1 + y * 0 = x for
             * finite y), so that the loop has no branch on the runtime flags and vectorizes */
            const float dv_hard = (float)silent + attached * ((v_rest - v_th - u) * g);
            const float dv_soft = 1.0f - attached * (v_th * g);
            float e = gvr[k] * (hard_w * dv_hard + soft_w * dv_soft);
            e += LIF_LOAD(gsr[k]) * g;
            e += a[j] + b[j] * u;
            gxr[k] = LIF_STORE(e * gx_scale);
            gvr[k] = e * keep;
        }
    }
}

static void LIF_NAME(bwd_dispatch)(const LIF_TYPE* gs, int64_t gs_rs, const LIF_TYPE* us, LIF_TYPE* gx, int64_t o_rs,
                                   float* gv, int64_t gv_rs, int64_t rows, int64_t n, const float* a, const float* b,
                                   int step, const float* p, int64_t p_rs, float gx_scale, float keep, float v_th,
                                   float v_rest, int hard, int detach, int kind) {
#define LIF_BWD_CALL(KIND)                                                                                      \
    if (step)                                                                                                   \
        LIF_NAME(bwd_rows)(gs, gs_rs, us, gx, o_rs, gv, gv_rs, rows, n, a, b, p, p_rs, gx_scale, keep, v_th,     \
                           v_rest, hard, detach, KIND, 1);                                                      \
    else                                                                                                        \
        LIF_NAME(bwd_rows)(gs, gs_rs, us, gx, o_rs, gv, gv_rs, rows, n, a, b, p, p_rs, gx_scale, keep, v_th,     \
                           v_rest, hard, detach, KIND, 0);                                                      \
    break;
    switch (kind) {
    case SG_TRIANGLE: LIF_BWD_CALL(SG_TRIANGLE)
    case SG_RECTANGULAR: LIF_BWD_CALL(SG_RECTANGULAR)
    case SG_SIGMOID: LIF_BWD_CALL(SG_SIGMOID)
    case SG_ATAN: LIF_BWD_CALL(SG_ATAN)
    default: LIF_BWD_CALL(SG_SUPERSPIKE)
    }
#undef LIF_BWD_CALL
}

/* Reverse time loop over tiles [tile_begin, tile_end). grad_spikes (or NULL): [T, B, C, S]
 * with dense [C, S] per sample, time and batch strides gs_stride_t, gs_stride_b; u_saved as
 * lif_fwd wrote it; mpd_a, mpd_b (or NULL): float32 [T, C]. The surrogate's parameter:
 * surrogate_param_e (per element: float32 dense [B, C, S] per step, time stride surrogate_param_stride_t, 0
 * allowed), else surrogate_param_c (per channel: float32 [C]), else the scalar surrogate_param. gvT (or
 * NULL) and gv0 (or NULL): float32 [B, C, S]; grad_x: dense [T, B, C, S]. */
void LIF_NAME(lif_bwd)(const LIF_TYPE* grad_spikes, int64_t gs_stride_t, int64_t gs_stride_b, const LIF_TYPE* u_saved,
                       const float* mpd_a, const float* mpd_b, const float* surrogate_param_c, const float* surrogate_param_e,
                       int64_t surrogate_param_stride_t, const float* gvT, LIF_TYPE* grad_x, float* gv0, int64_t T, int64_t B,
                       int64_t C, int64_t S, int64_t block_b, int64_t block_c, float inv_tau, float v_th,
                       float v_rest, float surrogate_param, int32_t surrogate_kind, int32_t decay_input, int32_t hard_reset,
                       int32_t detach_reset, int64_t tile_begin, int64_t tile_end, float* scratch) {
    const int64_t N = B * C * S;
    const int64_t tile_elems = block_b * block_c * S;
    const float gx_scale = decay_input ? inv_tau : 1.0f;
    const float keep = 1.0f - inv_tau;
    float* gv = scratch;
    float* zeros = scratch + tile_elems;  /* a tile of zeros: grad_spikes, a and b when absent */
    float* params = zeros + tile_elems;   /* the tile's [n_c, S] parameters when not per element */
    for (int64_t k = 0; k < tile_elems; k++) zeros[k] = 0.0f;
    for (int64_t tile = tile_begin; tile < tile_end; tile++) {
        const tile_t tl = tile_at(tile, B, C, S, block_b, block_c);
        const int64_t b0 = tl.b0, c0 = tl.c0, n_b = tl.n_b, n_c = tl.n_c, n_row = tl.n_row;
        tile_load(gv, gvT, 0.0f, tl, C, S);
        if (!surrogate_param_e) /* one row of parameters, the same for every sample and step */
            for (int64_t cc = 0; cc < n_c; cc++) {
                const float value = surrogate_param_c ? surrogate_param_c[c0 + cc] : surrogate_param;
                for (int64_t s = 0; s < S; s++) params[cc * S + s] = value;
            }
        const int64_t off = tl.offset;
        for (int64_t i = 0; i < T; i++) {
            const int64_t t = T - 1 - i;
            const LIF_TYPE* gs = grad_spikes ? grad_spikes + t * gs_stride_t + b0 * gs_stride_b + c0 * S
                                             : (const LIF_TYPE*)zeros;
            const int64_t gs_rs = grad_spikes ? gs_stride_b : 0;
            const float* p = surrogate_param_e ? surrogate_param_e + t * surrogate_param_stride_t + off : params;
            const int64_t p_rs = surrogate_param_e ? C * S : 0;
            if (S == 1) { /* a row per sample, walking the tile's channels */
                const float* a = mpd_a ? mpd_a + t * C + c0 : zeros;
                const float* b = mpd_b ? mpd_b + t * C + c0 : zeros;
                LIF_NAME(bwd_dispatch)(gs, gs_rs, u_saved + t * N + off, grad_x + t * N + off, C * S, gv, n_row, n_b,
                                       n_row, a, b, 1, p, p_rs, gx_scale, keep, v_th, v_rest, hard_reset,
                                       detach_reset, surrogate_kind);
                continue;
            }
            for (int64_t cc = 0; cc < n_c; cc++) { /* a row per sample, one channel's positions */
                const int64_t c = c0 + cc;
                const float a = mpd_a ? mpd_a[t * C + c] : 0.0f;
                const float b = mpd_b ? mpd_b[t * C + c] : 0.0f;
                LIF_NAME(bwd_dispatch)(grad_spikes ? gs + cc * S : gs, gs_rs, u_saved + t * N + off + cc * S,
                                       grad_x + t * N + off + cc * S, C * S, gv + cc * S, n_row, n_b, S, &a, &b, 0,
                                       p + cc * S, p_rs, gx_scale, keep, v_th, v_rest, hard_reset, detach_reset,
                                       surrogate_kind);
            }
        }
        if (gv0)
            for (int64_t bi = 0; bi < n_b; bi++)
                for (int64_t k = 0; k < n_row; k++) gv0[off + bi * C * S + k] = gv[bi * n_row + k];
    }
}

/* lif_fwd / lif_bwd over all n_tiles tiles split into `workers` contiguous ranges, one per
 * thread (the calling thread takes the first): the same arguments as the single-range
 * functions, with (n_tiles, scratch, scratch_stride, workers) in place of (tile_begin,
 * tile_end, scratch); worker w uses scratch + w * scratch_stride. The threads live for one
 * call: no Python and no GIL in the hand-off. */
typedef struct {
    const LIF_TYPE* x; int64_t x_stride_t, x_stride_b; LIF_TYPE *spikes, *u_saved; const float* v0; LIF_TYPE* vT;
    double *pmean, *pm2; int64_t T, B, C, S, block_b, block_c; float inv_tau, v_th, v_rest;
    int32_t decay_input, hard_reset;
} LIF_NAME(fwd_call);

static void LIF_NAME(fwd_range)(const void* call, int64_t begin, int64_t end, float* scratch) {
    const LIF_NAME(fwd_call)* a = (const LIF_NAME(fwd_call)*)call;
    LIF_NAME(lif_fwd)(a->x, a->x_stride_t, a->x_stride_b, a->spikes, a->u_saved, a->v0, a->vT, a->pmean, a->pm2, a->T,
                      a->B, a->C, a->S, a->block_b, a->block_c, a->inv_tau, a->v_th, a->v_rest, a->decay_input,
                      a->hard_reset, begin, end, scratch);
}

void LIF_NAME(lif_fwd_mt)(const LIF_TYPE* x, int64_t x_stride_t, int64_t x_stride_b, LIF_TYPE* spikes, LIF_TYPE* u_saved,
                          const float* v0, LIF_TYPE* vT, double* pmean, double* pm2, int64_t T, int64_t B, int64_t C,
                          int64_t S, int64_t block_b, int64_t block_c, float inv_tau, float v_th, float v_rest,
                          int32_t decay_input, int32_t hard_reset, int64_t n_tiles, float* scratch,
                          int64_t scratch_stride, int32_t workers) {
    const LIF_NAME(fwd_call) call = {x, x_stride_t, x_stride_b, spikes, u_saved, v0, vT, pmean, pm2, T, B, C, S,
                                     block_b, block_c, inv_tau, v_th, v_rest, decay_input, hard_reset};
    run_ranges(LIF_NAME(fwd_range), &call, n_tiles, scratch, scratch_stride, workers);
}

typedef struct {
    const LIF_TYPE* grad_spikes; int64_t gs_stride_t, gs_stride_b; const LIF_TYPE* u_saved; const float *mpd_a, *mpd_b;
    const float *surrogate_param_c, *surrogate_param_e; int64_t surrogate_param_stride_t; const float* gvT;
    LIF_TYPE* grad_x; float* gv0; int64_t T, B, C, S, block_b, block_c; float inv_tau, v_th, v_rest, surrogate_param;
    int32_t surrogate_kind, decay_input, hard_reset, detach_reset;
} LIF_NAME(bwd_call);

static void LIF_NAME(bwd_range)(const void* call, int64_t begin, int64_t end, float* scratch) {
    const LIF_NAME(bwd_call)* a = (const LIF_NAME(bwd_call)*)call;
    LIF_NAME(lif_bwd)(a->grad_spikes, a->gs_stride_t, a->gs_stride_b, a->u_saved, a->mpd_a, a->mpd_b,
                      a->surrogate_param_c, a->surrogate_param_e, a->surrogate_param_stride_t, a->gvT, a->grad_x, a->gv0,
                      a->T, a->B, a->C, a->S, a->block_b, a->block_c, a->inv_tau, a->v_th, a->v_rest,
                      a->surrogate_param, a->surrogate_kind, a->decay_input, a->hard_reset, a->detach_reset, begin, end,
                      scratch);
}

void LIF_NAME(lif_bwd_mt)(const LIF_TYPE* grad_spikes, int64_t gs_stride_t, int64_t gs_stride_b, const LIF_TYPE* u_saved,
                          const float* mpd_a, const float* mpd_b, const float* surrogate_param_c,
                          const float* surrogate_param_e, int64_t surrogate_param_stride_t, const float* gvT,
                          LIF_TYPE* grad_x, float* gv0, int64_t T, int64_t B, int64_t C, int64_t S, int64_t block_b,
                          int64_t block_c, float inv_tau, float v_th, float v_rest, float surrogate_param,
                          int32_t surrogate_kind, int32_t decay_input, int32_t hard_reset, int32_t detach_reset,
                          int64_t n_tiles, float* scratch, int64_t scratch_stride, int32_t workers) {
    const LIF_NAME(bwd_call) call = {grad_spikes, gs_stride_t, gs_stride_b, u_saved, mpd_a, mpd_b, surrogate_param_c,
                                     surrogate_param_e, surrogate_param_stride_t, gvT, grad_x, gv0, T, B, C, S, block_b,
                                     block_c, inv_tau, v_th, v_rest, surrogate_param, surrogate_kind, decay_input,
                                     hard_reset, detach_reset};
    run_ranges(LIF_NAME(bwd_range), &call, n_tiles, scratch, scratch_stride, workers);
}

#undef LIF_SUFFIX
#undef LIF_TYPE
#undef LIF_LOAD
#undef LIF_STORE
#undef LIF_NEGATIVE
