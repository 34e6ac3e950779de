/* Multi-LoRA for short runs of tokens (decode), fp32, on the CPU.
 *
 * Semantics: for each run (slot, start, end) and token t in [start, end),
 *   h = scale[slot] * A[slot, :rank[slot]] @ x[t]
 *   y[t] += h @ b_t[slot, :rank[slot]]
 * Shape: x: [num_tokens, in] (row stride x_stride); y: [num_tokens, out] (row stride
 *        y_stride); a: [num_slots, max_rank, in]; b_t: [num_slots, max_rank, out], both
 *        contiguous; scale: [num_slots]; ranks: [num_slots] int64; runs: [num_runs, 3]
 *        int64; in and out multiples of 16; at most MAX_RUN_TOKENS tokens per run.
 *
 * Each run reads its slot's A and B rows once for all its tokens, which is what a
 * decode step costs: the adapters' weights streamed from memory, one pass. Runs are
 * spread over torch's OpenMP threads (see decode_attention.c).
 */
#include <stdint.h>
#include <string.h>

#define MAX_RUN_TOKENS 64
#define MAX_RANK 256

typedef float v16 __attribute__((vector_size(64)));
/* Unaligned access through a may_alias type: one vector load or store, where a memcpy into
 * a vector was lowered to two half-width stores and a full-width reload (a store-forwarding
 * stall per load, measured at most of the time). */
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

static inline v16 load16(const float *p) { return *(const v16u *)p; }
static inline void store16(float *p, v16 v) { *(v16u *)p = v; }

static inline float hsum(v16 x) {
    float lanes[16];
    memcpy(lanes, &x, sizeof lanes);
    float a = 0.f, b = 0.f, c = 0.f, d = 0.f;
    for (int i = 0; i < 16; i += 4) a += lanes[i], b += lanes[i + 1], c += lanes[i + 2], d += lanes[i + 3];
    return (a + b) + (c + d);
}

/* h[t][k] = scale * dot(A row k, x[t]) for NT tokens at once: each A row is loaded once
 * for the NT tokens, and two accumulators per token keep NT * 2 FMA chains in flight. */
static inline __attribute__((always_inline)) void shrink_tokens(
    const float *x, int64_t x_stride, const float *a, float scale, int64_t rank, int64_t in,
    int64_t t0, const int NT, float h[][MAX_RANK]) {
    for (int64_t k = 0; k < rank; k++) {
        const float *ak = a + k * in;
        v16 even[4] = {{0}}, odd[4] = {{0}};
        int64_t i = 0;
        for (; i + 32 <= in; i += 32) {
            const v16 a0 = load16(ak + i), a1 = load16(ak + i + 16);
            __builtin_prefetch(ak + 2 * in + i);  /* two rows ahead: the weights stream */
            __builtin_prefetch(ak + 2 * in + i + 16);
            for (int t = 0; t < NT; t++) {
                const float *xt = x + (t0 + t) * x_stride + i;
                even[t] += a0 * load16(xt);
                odd[t] += a1 * load16(xt + 16);
            }
        }
        if (i < in) {
            const v16 a0 = load16(ak + i);
            for (int t = 0; t < NT; t++) even[t] += a0 * load16(x + (t0 + t) * x_stride + i);
        }
        for (int t = 0; t < NT; t++) h[t0 + t][k] = scale * hsum(even[t] + odd[t]);
    }
}

static void run_one(const float *x, int64_t x_stride, float *y, int64_t y_stride,
                    const float *a, const float *b_t, float scale, int64_t rank, int64_t in,
                    int64_t out, int64_t start, int64_t n) {
    float h[MAX_RUN_TOKENS][MAX_RANK];
    const float *xs = x + start * x_stride;
    for (int64_t k = 0; k < rank; k++)  /* B arrives while the shrink runs */
        for (int64_t o = 0; o < out; o += 16) __builtin_prefetch(b_t + k * out + o);
    for (int64_t t0 = 0; t0 < n; t0 += 4) {  /* shrink, four tokens per pass over A */
        switch (n - t0 < 4 ? n - t0 : 4) {
        case 1: shrink_tokens(xs, x_stride, a, scale, rank, in, t0, 1, h); break;
        case 2: shrink_tokens(xs, x_stride, a, scale, rank, in, t0, 2, h); break;
        case 3: shrink_tokens(xs, x_stride, a, scale, rank, in, t0, 3, h); break;
        default: shrink_tokens(xs, x_stride, a, scale, rank, in, t0, 4, h); break;
        }
    }
    for (int64_t t = 0; t < n; t++) {  /* expand: B rows stay in cache across the tokens */
        float *yt = y + (start + t) * y_stride;
        for (int64_t o = 0; o < out; o += 16) {
            v16 acc = load16(yt + o);
            for (int64_t k = 0; k < rank; k++) acc += h[t][k] * load16(b_t + k * out + o);
            store16(yt + o, acc);
        }
    }
}

int lora_runs(const float *x, int64_t x_stride, float *y, int64_t y_stride, const float *a,
              const float *b_t, const float *scale, const int64_t *ranks, const int64_t *runs,
              int64_t num_runs, int64_t max_rank, int64_t in, int64_t out, int num_threads) {
    if (in % 16 || out % 16 || max_rank > MAX_RANK) return -1;
    for (int64_t r = 0; r < num_runs; r++)
        if (runs[3 * r + 2] - runs[3 * r + 1] > MAX_RUN_TOKENS) return -1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads > 0 ? num_threads : 1)
    for (int64_t r = 0; r < num_runs; r++) {
        const int64_t slot = runs[3 * r], start = runs[3 * r + 1], n = runs[3 * r + 2] - start;
        const int64_t rank = ranks[slot];
        if (rank == 0) continue;
        run_one(x, x_stride, y, y_stride, a + slot * max_rank * in, b_t + slot * max_rank * out,
                scale[slot], rank, in, out, start, n);
    }
    return 0;
}
