/* Attention for CPU: each query token against its own contiguous run of KV cache rows,
 * fp32, grouped-query heads sharing each key/value row. A decode token's run is its
 * sequence so far; a prompt token's is the prompt up to and including itself (causal).
 *
 * Semantics: for each query b and head h (kv head h / group),
 *   out[b, h] = softmax(scale * K[start_b : start_b + len_b] @ q[b, h]) @ V[...]
 * Shape: q, out: [num_queries (num_seqs), num_heads, head_dim];
 *        k_cache, v_cache: [num_kv_heads, cache_rows, head_dim] (row-major, contiguous);
 *        starts, lens: [num_seqs] (int64); head_dim a multiple of 16, at most 256.
 *
 * One pass over the keys with an online softmax (flash-decoding): each key and value
 * row is read once and used by every query head of its group, so the kernel runs at
 * the speed of reading the cache. Work items (query, kv head) are
 * spread over torch's OpenMP threads (kernels/build.py): the library links
 * libgomp.so.1, which the loader resolves to the copy torch already loaded, so the
 * kernel runs on torch's own worker threads instead of competing with them while they
 * spin after a matmul (measured: twice the time with a pthread pool of our own).
 */
#include <math.h>

#include "vec16.h"

#define MAX_GROUP 16
#define MAX_CHUNKS 16 /* head_dim / 16 */
#define BLOCK 16      /* keys per online-softmax step: one vector of scores */
#define PREFETCH 8    /* rows ahead; past a sequence's end it only warms its neighbour */

typedef struct {
    const float *q, *k, *v;
    float *out;
    const int64_t *starts, *lens;
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, cache_rows;
    float scale;
} Args;

/* mask ? a : b per lane; mask lanes are all ones or all zeros (a vector comparison) */
static inline v16 select(v16i mask, v16 a, v16 b) {
    v16i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    v16i r = (mask & ai) | (~mask & bi);
    v16 out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline float hmax(v16 x) {
    float lanes[16], best = -INFINITY;
    memcpy(lanes, &x, sizeof lanes);
    for (int i = 0; i < 16; i++) best = lanes[i] > best ? lanes[i] : best;
    return best;
}

/* exp(x) for x <= 0 (Cephes' expf: range reduction by ln 2, degree-5 polynomial), within
 * about one ulp of expf; below -87 it flushes to 0 so masked lanes give exactly 0. */
static inline v16 vexp(v16 x) {
    const v16 lo = splat(-87.0f);
    v16i tiny = x < lo;
    x = select(tiny, lo, x);
    v16 fx = x * 1.44269504088896341f + 0.5f;
    v16i n = __builtin_convertvector(fx, v16i);
    v16 nf = __builtin_convertvector(n, v16);
    v16i above = nf > fx; /* truncation rounded up for negatives: floor() */
    n += above;
    nf = __builtin_convertvector(n, v16);
    x = x - nf * 0.693359375f - nf * -2.12194440e-4f;
    v16 p = splat(1.9875691500e-4f);
    p = p * x + 1.3981999507e-3f;
    p = p * x + 8.3334519073e-3f;
    p = p * x + 4.1665795894e-2f;
    p = p * x + 1.6666665459e-1f;
    p = p * x + 5.0000001201e-1f;
    p = p * x * x + x + 1.0f;
    v16i bits = (n + 127) << 23;
    v16 two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    v16 y = p * two_n;
    return select(tiny, splat(0.f), y);
}

/* One cache row into C vectors, prefetching the row PREFETCH ahead. */
static inline void load_row(v16 *dst, const float *row, int64_t D, int64_t C) {
    for (int64_t c = 0; c < C; c++) {
        __builtin_prefetch(row + PREFETCH * D + c * 16);
        dst[c] = load16(row + c * 16);
    }
}

/* G query heads per kv head, C vectors per head; inlined with constant G and C for the
 * common shapes so that the accumulators stay in registers. */
static inline __attribute__((always_inline)) void attend_group(const Args *a, int64_t b,
                                                               int64_t kvh, const int64_t G,
                                                               const int64_t C) {
    const int64_t D = C * 16;
    const int64_t L = a->lens[b];
    const float *K = a->k + (kvh * a->cache_rows + a->starts[b]) * D;
    const float *V = a->v + (kvh * a->cache_rows + a->starts[b]) * D;
    const float *q = a->q + (b * a->num_heads + kvh * G) * D;
    float *out = a->out + (b * a->num_heads + kvh * G) * D;
    v16 qv[MAX_GROUP][MAX_CHUNKS], acc[MAX_GROUP][MAX_CHUNKS];
    float maxs[MAX_GROUP], sums[MAX_GROUP];
    for (int64_t g = 0; g < G; g++) {
        for (int64_t c = 0; c < C; c++) {
            qv[g][c] = load16(q + g * D + c * 16);
            qv[g][c] *= a->scale;
            acc[g][c] = splat(0.f);
        }
        maxs[g] = -INFINITY, sums[g] = 0.f;
    }
    const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t l0 = 0; l0 < L; l0 += BLOCK) {
        const int64_t n = L - l0 < BLOCK ? L - l0 : BLOCK;
        v16 partial[MAX_GROUP][BLOCK];
        for (int64_t j = 0; j < BLOCK; j++) {  /* K row read once for the group */
            if (j >= n) {
                for (int64_t g = 0; g < G; g++) partial[g][j] = splat(0.f);
                continue;
            }
            v16 kv[MAX_CHUNKS];
            load_row(kv, K + (l0 + j) * D, D, C);
            for (int64_t g = 0; g < G; g++) {
                v16 t = qv[g][0] * kv[0];
                for (int64_t c = 1; c < C; c++) t += qv[g][c] * kv[c];
                partial[g][j] = t;
            }
        }
        float probs[MAX_GROUP][BLOCK];
        for (int64_t g = 0; g < G; g++) {  /* online softmax: rescale what came before */
            v16 s = transpose_sum(partial[g]);
            s = select(lane < (float)n, s, splat(-INFINITY));
            const float m = fmaxf(maxs[g], hmax(s));
            const float correction = expf(maxs[g] - m);
            const v16 p = vexp(s - m);
            sums[g] = sums[g] * correction + hsum(p);
            maxs[g] = m;
            for (int64_t c = 0; c < C; c++) acc[g][c] *= correction;
            store16(probs[g], p);
        }
        for (int64_t j = 0; j < n; j++) {  /* values: V row read once for the group */
            v16 vv[MAX_CHUNKS];
            load_row(vv, V + (l0 + j) * D, D, C);
            for (int64_t g = 0; g < G; g++) {
                const float p = probs[g][j];
                for (int64_t c = 0; c < C; c++) acc[g][c] += p * vv[c];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const float inv = L > 0 ? 1.f / sums[g] : 0.f;
        for (int64_t c = 0; c < C; c++) {
            v16 o = acc[g][c] * inv;
            store16(out + g * D + c * 16, o);
        }
    }
}

static void attend(const Args *a, int64_t b, int64_t kvh) {
    const int64_t G = a->num_heads / a->num_kv_heads, C = a->head_dim / 16;
#define SHAPE(g)                                         \
    if (G == g && C == 4) return attend_group(a, b, kvh, g, 4); \
    if (G == g && C == 8) return attend_group(a, b, kvh, g, 8);
    SHAPE(1) SHAPE(2) SHAPE(3) SHAPE(4) SHAPE(5) SHAPE(6) SHAPE(7) SHAPE(8)
#undef SHAPE
    attend_group(a, b, kvh, G, C);
}

int decode_attention(const float *q, const float *k_cache, const float *v_cache, float *out,
                     const int64_t *starts, const int64_t *lens, int64_t num_seqs,
                     int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     int64_t cache_rows, float scale, int num_threads) {
    if (num_heads % num_kv_heads || num_heads / num_kv_heads > MAX_GROUP) return -1;
    if (head_dim % 16 || head_dim / 16 > MAX_CHUNKS) return -1;
    const Args args = {q, k_cache, v_cache, out, starts, lens, num_seqs, num_heads,
                       num_kv_heads, head_dim, cache_rows, scale};
    const int64_t items = num_seqs * num_kv_heads;
    /* small dynamic chunks: a prompt's later tokens attend to more keys than its first */
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads > 0 ? num_threads : 1)
    for (int64_t i = 0; i < items; i++) attend(&args, i / num_kv_heads, i % num_kv_heads);
    return 0;
}
