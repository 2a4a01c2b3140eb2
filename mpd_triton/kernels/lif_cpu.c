/* Fused multi-step LIF for the CPU: the same forward and BPTT as the Triton kernels
 * (mpd_triton/kernels/lif.py), compiled on first use by mpd_triton/kernels/cpu.py and
 * called through ctypes (which releases the GIL). lif_fwd_mt / lif_bwd_mt split the tiles over
 * threads of their own (run_ranges).
 *
 * Layout: the tensors the kernels write are dense [T, B, C, S]; the input (x in the
 * forward, grad_spikes in the backward) needs dense [C, S] per sample only, with any time
 * and batch strides, 0 included (an input expanded over T). One call runs tiles [tile_begin, tile_end) of block_b samples x
 * block_c channels x all S positions, each for all T steps, with the tile's membrane state
 * (forward) or dL/dv (backward) kept in float32 in `scratch`, so each element of the big
 * tensors is read or written once per pass.
 *
 * Statistics (docs/design.md, section 4): per tile and time step, the mean of u
 * over the tile's (b, s) for each channel, summed by the forward's loop as it computes u (SUMS_*),
 * then the sum of squared deviations from it, from the tile's u still in `scratch` (no second read
 * of memory), accumulated in double;
 * lif_stats_merge combines the per-tile partials in a fixed order with Chan's formula.
 * No atomics, no reduction whose order depends on the threads: results are bitwise
 * repeatable.
 *
 * Arithmetic is written in the same order as the PyTorch reference (mpd_triton/reference.py)
 * and compiled without floating-point contraction (-ffp-contract=off), so in float32 the
 * spikes are bit for bit those of the reference.
 *
 * This file holds what does not depend on the dtype; lif_cpu_body.h is included once per
 * dtype (float32, bfloat16, float16) and defines lif_fwd_<dtype> and lif_bwd_<dtype>.
 */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define RESTRICT __restrict__
#define INLINE static inline __attribute__((always_inline))

/* Surrogate ids: the `kind` of the classes in mpd_triton/surrogates.py. */
enum { SG_TRIANGLE = 0, SG_RECTANGULAR = 1, SG_SIGMOID = 2, SG_ATAN = 3, SG_SUPERSPIKE = 4, SG_COUNT = 5 };

/* Bumped whenever an exported signature changes (cpu.py checks it). */
int64_t lif_cpu_abi_version(void) { return 9; }
int64_t lif_cpu_surrogate_count(void) { return SG_COUNT; }

/* g(u) for surrogate `kind` with parameter p (gamma or alpha), as in surrogates.py. */
INLINE float surrogate_grad(const int kind, float u, float p) {
    switch (kind) {
    case SG_TRIANGLE:
        {
        const float d = p - fabsf(u);
        return (d < 0.0f ? 0.0f : d) / (p * p); /* not fmaxf: it would not vectorize */
    }
    case SG_RECTANGULAR:
        return fabsf(u) < p ? 1.0f / (2.0f * p) : 0.0f;
    case SG_SIGMOID: {
        float sg = 1.0f / (1.0f + expf(-(p * u)));
        return p * sg * (1.0f - sg);
    }
    case SG_ATAN: {
        float z = 1.5707963267948966f * p * u;
        return (p * 0.5f) / (1.0f + z * z);
    }
    default: { /* SG_SUPERSPIKE: the launchers pass only known ids */
        float d = 1.0f + p * fabsf(u);
        return 1.0f / (d * d);
    }
    }
}

/* Sum of a row and sum of squared deviations from `mean`, in LANES float accumulators
 * (independent, so the loop vectorizes without reassociating), added up pairwise at the end
 * of the row (a short tree, not a serial chain: rows are short) and returned in double. A
 * row has at most TILE_ELEMENTS values, LANES-way split: each lane sums a few hundred. */
#define LANES 16
static inline float lanes_total(float* acc) {
    for (int j = 0; j < 8; j++) acc[j] += acc[j + 8];
    for (int j = 0; j < 4; j++) acc[j] += acc[j + 4];
    return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

static double row_sum(const float* RESTRICT u, int64_t n) {
    float acc[LANES] = {0.0f};
    int64_t s = 0;
    for (; s + LANES <= n; s += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += u[s + j];
    double total = (double)lanes_total(acc);
    for (; s < n; s++) total += (double)u[s];
    return total;
}

static double row_m2(const float* RESTRICT u, int64_t n, float mean) {
    float acc[LANES] = {0.0f};
    int64_t s = 0;
    for (; s + LANES <= n; s += LANES)
        for (int j = 0; j < LANES; j++) {
            const float d = u[s + j] - mean;
            acc[j] += d * d;
        }
    double total = (double)lanes_total(acc);
    for (; s < n; s++) {
        const double d = (double)u[s] - (double)mean;
        total += d * d;
    }
    return total;
}

/* S == 1 (channels innermost, as channels-last): the tile's u is n_b rows of n_c channels, one
 * contiguous block. It is summed in chunks of STATS_FOLD floats (FOLD / n_c whole rows; one row if
 * n_c is larger): part[j] += chunk[j], a long vector loop, then part is folded onto the channels
 * (j % n_c) in double. Each part[j] sums at most 64 values of one channel in float (a tile has at
 * most TILE_ELEMENTS elements). cpu.py's _scratch_floats leaves room for 2 STATS_FOLD floats. */
#define STATS_FOLD 256

/* Who sums the tile's u for the means (the first of tile_stats' two passes): tile_stats itself
 * (SUMS_NONE), or, where a row is channels of S >= LANES positions, the forward's loop as it computes
 * u (SUMS_LANES, fwd_rows: each row's whole LANES-chunks of a channel in LANES float lanes, their
 * lanes_total in `rowsum`; tile_stats adds the remainder), which saves one pass over the tile. The
 * same additions in the same order either way. (Channels innermost, S = 1, the STATS_FOLD chunks'
 * sums moved into the forward's loop gave no measurable gain, docs/benchmarks.md: tile_stats keeps them.) */
enum { SUMS_NONE = 0, SUMS_LANES = 1 };

/* Where the forward's row sums live in the statistics' scratch `acc` (n_c doubles first): after them. */
static inline double* stats_rowsum(double* acc, int64_t n_c) { return acc + n_c; }

/* Per-(t, c) partials of one tile, from its u in scratch: mean and M2 over n_b rows of
 * n_row = n_c * S values (channel cc occupies [cc * S, (cc + 1) * S) of each row). Two
 * passes over the tile's u while it is in cache: the mean (its sums already taken by the
 * forward's loop with SUMS_LANES), then squared deviations from it (accurate when
 * |mean| >> std, unlike sum and sum of squares). */
static void tile_stats(const float* RESTRICT u, int64_t n_b, int64_t n_c, int64_t S, double* RESTRICT mean_out,
                       double* RESTRICT m2_out, double* acc, int sums) {
    const int64_t n_row = n_c * S;
    const double count = (double)(n_b * S);
    if (S == 1) {
        const int64_t rows = n_c >= STATS_FOLD ? 1 : STATS_FOLD / n_c;
        const int64_t w = rows * n_c, whole = n_b - n_b % rows;
        float* RESTRICT part = (float*)(acc + n_c);
        float* RESTRICT mean_w = part + w; /* the channels' means, repeated along a chunk */
        for (int64_t j = 0; j < w; j++) part[j] = 0.0f;
        for (int64_t bi = 0; bi < whole; bi += rows)
            for (int64_t j = 0; j < w; j++) part[j] += u[bi * n_c + j];
        for (int64_t cc = 0; cc < n_c; cc++) acc[cc] = 0.0;
        for (int64_t j = 0; j < w; j++) acc[j % n_c] += (double)part[j];
        for (int64_t bi = whole; bi < n_b; bi++)
            for (int64_t cc = 0; cc < n_c; cc++) acc[cc] += (double)u[bi * n_c + cc];
        for (int64_t cc = 0; cc < n_c; cc++) mean_out[cc] = acc[cc] / count;
        for (int64_t j = 0; j < w; j++) {
            mean_w[j] = (float)mean_out[j % n_c];
            part[j] = 0.0f;
        }
        for (int64_t bi = 0; bi < whole; bi += rows)
            for (int64_t j = 0; j < w; j++) {
                const float d = u[bi * n_c + j] - mean_w[j];
                part[j] += d * d;
            }
        for (int64_t cc = 0; cc < n_c; cc++) acc[cc] = 0.0;
        for (int64_t j = 0; j < w; j++) acc[j % n_c] += (double)part[j];
        for (int64_t bi = whole; bi < n_b; bi++)
            for (int64_t cc = 0; cc < n_c; cc++) {
                const float d = u[bi * n_c + cc] - mean_w[cc];
                acc[cc] += (double)(d * d);
            }
        for (int64_t cc = 0; cc < n_c; cc++) m2_out[cc] = acc[cc];
        return;
    }
    const double* RESTRICT rowsum = stats_rowsum(acc, n_c);
    for (int64_t cc = 0; cc < n_c; cc++) { /* positions innermost */
        double total = 0.0;
        for (int64_t bi = 0; bi < n_b; bi++) {
            const float* RESTRICT row = u + bi * n_row + cc * S;
            if (sums != SUMS_LANES) {
                total += row_sum(row, S);
                continue;
            }
            double rest = rowsum[bi * n_c + cc]; /* the forward's lanes; row_sum's remainder */
            for (int64_t s = S - S % LANES; s < S; s++) rest += (double)row[s];
            total += rest;
        }
        const double mean = total / count;
        double m2 = 0.0;
        for (int64_t bi = 0; bi < n_b; bi++) m2 += row_m2(u + bi * n_row + cc * S, S, (float)mean);
        mean_out[cc] = mean;
        m2_out[cc] = m2;
    }
}

/* Combine the per-tile partials [T, P, C] of each (t, c) in tile order (Chan, total form):
 * mean = sum_p n_p mean_p / M,  M2 = sum_p (M2_p + n_p (mean_p - mean)^2),  var = M2 / M. */
void lif_stats_merge(const double* RESTRICT pmean, const double* RESTRICT pm2, float* RESTRICT mean,
                     float* RESTRICT var, int64_t T, int64_t P, int64_t C, int64_t B, int64_t S, int64_t block_b) {
    const double total = (double)(B * S);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t c = 0; c < C; c++) {
            double acc = 0.0;
            for (int64_t p = 0; p < P; p++) {
                const int64_t rows = (B - p * block_b) < block_b ? (B - p * block_b) : block_b;
                acc += (double)(rows * S) * pmean[(t * P + p) * C + c];
            }
            const double m = acc / total;
            acc = 0.0;
            for (int64_t p = 0; p < P; p++) {
                const int64_t rows = (B - p * block_b) < block_b ? (B - p * block_b) : block_b;
                const double d = pmean[(t * P + p) * C + c] - m;
                acc += pm2[(t * P + p) * C + c] + (double)(rows * S) * d * d;
            }
            mean[t * C + c] = (float)m;
            var[t * C + c] = (float)(acc / total);
        }
    }
}

/* MPD-SGR's Gaussian overlap of n float32 cells (mpd_triton/mpd.py, _Overlap), forward and backward
 * in one loop each instead of a dozen small torch operations (each of which opens an OpenMP region
 * and costs microseconds). The arithmetic is mpd.py's, in float32:
 *   sigma = sqrt(var + eps), m = |mean|, z1 = (gamma - m) / sigma, z2 = (-gamma - m) / sigma,
 *   Omega = Phi(z1) - Phi(z2), Phi(z) = erfc(-z / sqrt 2) / 2 (both lower tails far outside),
 *   dOmega/dmean = g (phi(z2) - phi(z1)) sign(mean),  dOmega/dvar = g (z2 phi(z2) - z1 phi(z1)) / (2 sigma)
 * with g = grad / sigma and phi the standard normal density. grad_stride 0 reads one gradient for every
 * cell (the expanded gradient of a mean); grad_mean or grad_var may be NULL.
 *
 * exp and erfc are written out below (no libm call) so that both loops vectorize: libm's expf and
 * erfcf are scalar calls, about 15 ns each, which made Omega of a [8, 128] layer cost 30-40 us. */

/* 2^k for an integer-valued float k in [-126, 127], built in the exponent bits. */
INLINE float pow2i(float k) {
    const int32_t bits = ((int32_t)k + 127) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* exp(x) for x <= 0 (larger x is not asked for here), relative error below 3e-7 (tests/library/test_cpu_kernels.py),
 * subnormal results included: x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 in two parts, as in Cephes'
 * expf), exp(r) by Cephes' degree-7 polynomial, 2^n as two normal factors (n down to -150). */
INLINE float exp_nonpositive(float x) {
    x = x < -104.0f ? -104.0f : x; /* exp(-104) is below half the smallest subnormal: 0 */
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const float half = truncf(n * 0.5f); /* n = half + (n - half), both in [-75, 0] */
    return p * pow2i(half) * pow2i(n - half);
}

/* erfc(x), relative error below about 1e-6 in float32 over the whole range (in exact arithmetic the
 * approximation's own is 1.2e-7: the Chebyshev-fitted erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2),
 * of Numerical Recipes, 2nd ed., section 6.2); erfc(-z) = 2 - erfc(z). */
INLINE float erfc_approx(float x) {
    const float z = fabsf(x);
    const float t = 1.0f / (1.0f + 0.5f * z);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    const float e = exp_nonpositive(p - z * z);
    const float ans = t * e;
    return x >= 0.0f ? ans : 2.0f - ans;
}

INLINE float normal_cdf(float z) { return 0.5f * erfc_approx(-z * 0.70710678118654752f); }

void mpd_overlap_fwd(const float* RESTRICT mean, const float* RESTRICT var, float* RESTRICT omega, int64_t n,
                     float gamma, float eps) {
    for (int64_t i = 0; i < n; i++) {
        const float sigma = sqrtf(var[i] + eps);
        const float m = fabsf(mean[i]);
        omega[i] = normal_cdf((gamma - m) / sigma) - normal_cdf((-gamma - m) / sigma);
    }
}

void mpd_overlap_bwd(const float* RESTRICT mean, const float* RESTRICT var, const float* RESTRICT grad,
                     int64_t grad_stride, float* RESTRICT grad_mean, float* RESTRICT grad_var, int64_t n,
                     float gamma, float eps) {
    const float inv_sqrt_2pi = 0.3989422804014327f;
    for (int64_t i = 0; i < n; i++) {
        const float sigma = sqrtf(var[i] + eps);
        const float m = fabsf(mean[i]);
        const float z1 = (gamma - m) / sigma, z2 = (-gamma - m) / sigma;
        const float phi1 = exp_nonpositive(-0.5f * z1 * z1) * inv_sqrt_2pi;
        const float phi2 = exp_nonpositive(-0.5f * z2 * z2) * inv_sqrt_2pi;
        const float g = grad[i * grad_stride] / sigma;
        const float sign = mean[i] > 0.0f ? 1.0f : (mean[i] < 0.0f ? -1.0f : 0.0f);
        const float gm = g * (phi2 - phi1) * sign;
        const float gv = g * (z2 * phi2 - z1 * phi1) / (2.0f * sigma);
        if (grad_mean) grad_mean[i] = gm;
        if (grad_var) grad_var[i] = gv;
    }
}

/* MPD-SGR's term of the backward, dL/du = a + b u per (t, c) (ops.py's _mpd_terms, the same float32
 * operations in the same order): b = grad_var * 2 / M, a = grad_mean / M - b * mean, M the count of
 * each statistic; grad_mean or grad_var NULL: zero. */
void mpd_terms(const float* RESTRICT mean, const float* RESTRICT grad_mean, const float* RESTRICT grad_var,
               float* RESTRICT a, float* RESTRICT b, int64_t n, int64_t count) {
    const float M = (float)count;
    for (int64_t i = 0; i < n; i++) {
        const float bi = (grad_var ? grad_var[i] : 0.0f) * 2.0f / M;
        b[i] = bi;
        a[i] = (grad_mean ? grad_mean[i] : 0.0f) / M - bi * mean[i];
    }
}

/* A tile of lif_fwd / lif_bwd: block_b samples x block_c channels (fewer at the ragged edges) x all S
 * positions; pb is its index along the batch (the statistics partials' row). */
typedef struct {
    int64_t pb, b0, c0, n_b, n_c, n_row, offset;
} tile_t;

static inline tile_t tile_at(int64_t tile, int64_t B, int64_t C, int64_t S, int64_t block_b, int64_t block_c) {
    const int64_t n_ctiles = (C + block_c - 1) / block_c;
    tile_t t;
    t.pb = tile / n_ctiles;
    t.b0 = t.pb * block_b;
    t.c0 = (tile % n_ctiles) * block_c;
    t.n_b = (B - t.b0) < block_b ? (B - t.b0) : block_b;
    t.n_c = (C - t.c0) < block_c ? (C - t.c0) : block_c;
    t.n_row = t.n_c * S;
    t.offset = t.b0 * C * S + t.c0 * S; /* of its first element in a dense [B, C, S] step */
    return t;
}

/* The tile's rows of a dense float32 [B, C, S] tensor into scratch (fill where src is NULL), and back. */
static void tile_load(float* RESTRICT dst, const float* RESTRICT src, float fill, tile_t t, int64_t C, int64_t S) {
    for (int64_t bi = 0; bi < t.n_b; bi++)
        for (int64_t k = 0; k < t.n_row; k++) dst[bi * t.n_row + k] = src ? src[t.offset + bi * C * S + k] : fill;
}

/* ---- threads: tiles [0, n_tiles) in `workers` contiguous ranges, the calling thread the first ---- */

typedef void (*range_fn)(const void* call, int64_t begin, int64_t end, float* scratch);

typedef struct {
    range_fn fn;
    const void* call;
    int64_t begin, end;
    float* scratch;
} range_job;

static void* run_job(void* job) {
    const range_job* j = (const range_job*)job;
    j->fn(j->call, j->begin, j->end, j->scratch);
    return NULL;
}

#define MAX_WORKERS 256

#ifdef _OPENMP
#include <omp.h>
/* Built with -fopenmp, the library needs libgomp.so.1, which the loader finds already loaded
 * by torch (same soname): the tiles then run on torch's own OpenMP threads, which no second
 * pool competes with. libgomp cannot be used in a child forked after it started threads:
 * there the pthread path below runs instead. */
static volatile int forked_child = 0;
static void mark_forked_child(void) { forked_child = 1; }
__attribute__((constructor)) static void watch_forks(void) { pthread_atfork(NULL, NULL, mark_forked_child); }
int64_t lif_cpu_openmp(void) { return forked_child ? 0 : 1; }
#else
int64_t lif_cpu_openmp(void) { return 0; }
#endif

/* Ranges whose thread cannot be started run on the calling thread, after its own: the
 * result is the same (each tile writes its own outputs and partials). */
static void run_ranges(range_fn fn, const void* call, int64_t n_tiles, float* scratch, int64_t scratch_stride,
                       int32_t workers) {
    if (workers > MAX_WORKERS) workers = MAX_WORKERS;
    if (workers > n_tiles) workers = (int32_t)n_tiles;
    if (workers < 2) {
        fn(call, 0, n_tiles, scratch);
        return;
    }
#ifdef _OPENMP
    if (!forked_child) {
#pragma omp parallel num_threads(workers)
        {
            const int64_t w = omp_get_thread_num(), n = omp_get_num_threads();
            fn(call, n_tiles * w / n, n_tiles * (w + 1) / n, scratch + w * scratch_stride);
        }
        return;
    }
#endif
    range_job jobs[MAX_WORKERS];
    pthread_t threads[MAX_WORKERS];
    int started[MAX_WORKERS];
    for (int32_t w = 0; w < workers; w++) {
        jobs[w] = (range_job){fn, call, n_tiles * w / workers, n_tiles * (w + 1) / workers, scratch + w * scratch_stride};
        started[w] = w > 0 && pthread_create(&threads[w], NULL, run_job, &jobs[w]) == 0;
    }
    run_job(&jobs[0]);
    for (int32_t w = 1; w < workers; w++) {
        if (started[w]) pthread_join(threads[w], NULL);
        else run_job(&jobs[w]);
    }
}

/* ---- dtypes: load as float32, store from float32 (round to nearest even), sign bit ---- */

INLINE float f32_load(float v) { return v; }
INLINE float f32_store(float v) { return v; }
INLINE int f32_negative(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (int)(bits >> 31);
}

INLINE float bf16_load(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
INLINE uint16_t bf16_store(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return (uint16_t)(((bits & 0x7FFFFFFFu) > 0x7F800000u) ? ((bits >> 16) | 0x40u) : rounded); /* NaN stays NaN */
}
INLINE int bf16_negative(uint16_t v) { return (int)(v >> 15); }

#define LIF_SUFFIX f32
#define LIF_TYPE float
#define LIF_LOAD f32_load
#define LIF_STORE f32_store
#define LIF_NEGATIVE f32_negative
#include "lif_cpu_body.h"

#define LIF_SUFFIX bf16
#define LIF_TYPE uint16_t
#define LIF_LOAD bf16_load
#define LIF_STORE bf16_store
#define LIF_NEGATIVE bf16_negative
#include "lif_cpu_body.h"

#if defined(__FLT16_MAX__) /* _Float16: GCC >= 12, Clang >= 15 on x86-64 and arm64 */
INLINE float f16_load(_Float16 v) { return (float)v; }
INLINE _Float16 f16_store(float v) { return (_Float16)v; }
INLINE int f16_negative(_Float16 v) {
    uint16_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (int)(bits >> 15);
}
int64_t lif_cpu_has_float16(void) { return 1; }
#define LIF_SUFFIX f16
#define LIF_TYPE _Float16
#define LIF_LOAD f16_load
#define LIF_STORE f16_store
#define LIF_NEGATIVE f16_negative
#include "lif_cpu_body.h"
#else
int64_t lif_cpu_has_float16(void) { return 0; }
#endif
