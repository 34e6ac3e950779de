/* Attention over the paged KV cache for kernels/decode_attention.c and kernels/cpu_layer.c:
 * one (query token, kv head) work item on the calling thread (decode_attention.c says how). */
#ifndef LORAMUX_PAGED_ATTENTION_H
#define LORAMUX_PAGED_ATTENTION_H

#include <math.h>

#include "vec16.h"

#define MAX_GROUP 16
#define MAX_CHUNKS 16 /* head_dim / 16 */
#define BLOCK 16      /* keys per online-softmax step: one vector of scores */
#define PREFETCH 8    /* keys ahead in the sequence, found through its block table */

typedef struct {
    const float *q, *k, *v;
    float *out;
    const int64_t *block_ids, *table_starts, *lens;
    int64_t q_stride; /* between query tokens' rows of q (out's are num_heads * head_dim) */
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, cache_rows, block_shift;
    float scale;
} Args;

/* The cache row of a sequence's key l, through its block table. */
static inline int64_t row_of(const int64_t *table, int64_t shift, int64_t l) {
    return (table[l >> shift] << shift) | (l & ((INT64_C(1) << shift) - 1));
}

/* mask ? a : b per lane; mask lanes are all ones or all zeros (a vector comparison) */
static inline v16 vselect(v16i mask, v16 a, v16 b) {
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
    x = vselect(tiny, lo, x);
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
    return vselect(tiny, splat(0.f), y);
}

/* One cache row into C vectors, prefetching the row the sequence reads PREFETCH later. */
static inline void load_row(v16 *dst, const float *row, const float *ahead, int64_t C) {
    for (int64_t c = 0; c < C; c++) {
        __builtin_prefetch(ahead + c * 16);
        dst[c] = load16(row + c * 16);
    }
}

/* G query heads per kv head, C vectors per head; inlined with constant G and C for the
 * common shapes so that the accumulators stay in registers. */
static inline __attribute__((always_inline)) void attend_group(const Args *a, int64_t b,
                                                               int64_t kvh, const int64_t G,
                                                               const int64_t C) {
    const int64_t D = C * 16;
    const int64_t L = a->lens[b], shift = a->block_shift;
    const int64_t *table = a->block_ids + a->table_starts[b];
    const float *K = a->k + kvh * a->cache_rows * D;
    const float *V = a->v + kvh * a->cache_rows * D;
    const float *q = a->q + b * a->q_stride + kvh * G * D;
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
            const int64_t l = l0 + j, ahead = l + PREFETCH < L ? l + PREFETCH : l;
            load_row(kv, K + row_of(table, shift, l) * D, K + row_of(table, shift, ahead) * D, C);
            for (int64_t g = 0; g < G; g++) {
                v16 t = qv[g][0] * kv[0];
                for (int64_t c = 1; c < C; c++) t += qv[g][c] * kv[c];
                partial[g][j] = t;
            }
        }
        float probs[MAX_GROUP][BLOCK];
        for (int64_t g = 0; g < G; g++) {  /* online softmax: rescale what came before */
            v16 s = transpose_sum(partial[g]);
            s = vselect(lane < (float)n, s, splat(-INFINITY));
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
            const int64_t l = l0 + j, ahead = l + PREFETCH < L ? l + PREFETCH : l;
            load_row(vv, V + row_of(table, shift, l) * D, V + row_of(table, shift, ahead) * D, C);
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

static inline void attend(const Args *a, int64_t b, int64_t kvh) {
    const int64_t G = a->num_heads / a->num_kv_heads, C = a->head_dim / 16;
#define SHAPE(g)                                         \
    if (G == g && C == 4) return attend_group(a, b, kvh, g, 4); \
    if (G == g && C == 8) return attend_group(a, b, kvh, g, 8);
    SHAPE(1) SHAPE(2) SHAPE(3) SHAPE(4) SHAPE(5) SHAPE(6) SHAPE(7) SHAPE(8)
#undef SHAPE
    attend_group(a, b, kvh, G, C);
}

/* Without AVX-512 (16 registers of 8 floats) attend_group's query and sum vectors for a
 * group spill to the stack: 157 ns per key and group of 3 heads on a Zen 3 EPYC, 14 ms of a
 * decode step of SmolLM2 at 1,000 keys. There each query head is one work item: chunks of
 * CHUNK_KEYS scores (q.k, a row at a time), their softmax in a vector pass, then the values
 * summed into D floats, with the online rescaling between chunks. A kv head's rows are read
 * once per query head of its group, from cache after the first. */
#define CHUNK_KEYS 128

typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4), may_alias));

static inline v8f load8f(const float *p) { return *(const v8fu *)p; }
static inline void store8f(float *p, v8f v) { *(v8fu *)p = v; }

static inline __attribute__((always_inline)) void attend_head_d(const Args *a, int64_t b,
                                                                int64_t h, const int64_t D) {
    const int64_t L = a->lens[b], shift = a->block_shift;
    const int64_t *table = a->block_ids + a->table_starts[b];
    const int64_t kvh = h / (a->num_heads / a->num_kv_heads);
    const float *K = a->k + kvh * a->cache_rows * D;
    const float *V = a->v + kvh * a->cache_rows * D;
    const float *q = a->q + b * a->q_stride + h * D;
    float *out = a->out + (b * a->num_heads + h) * D;
    v8f acc[MAX_CHUNKS * 2];
    for (int64_t c = 0; c < D / 8; c++) acc[c] = (v8f){0};
    float scores[CHUNK_KEYS] __attribute__((aligned(64)));
    float max = -INFINITY, sum = 0.f;
    for (int64_t l0 = 0; l0 < L; l0 += CHUNK_KEYS) {
        const int64_t n = L - l0 < CHUNK_KEYS ? L - l0 : CHUNK_KEYS;
        float chunk_max = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            const float *row = K + row_of(table, shift, l0 + j) * D;
            v8f s0 = load8f(q) * load8f(row), s1 = load8f(q + 8) * load8f(row + 8);
            for (int64_t c = 16; c < D; c += 16) {
                s0 += load8f(q + c) * load8f(row + c);
                s1 += load8f(q + c + 8) * load8f(row + c + 8);
            }
            const v8f s = s0 + s1;
            const float score = a->scale * (((s[0] + s[1]) + (s[2] + s[3])) +
                                             ((s[4] + s[5]) + (s[6] + s[7])));
            scores[j] = score;
            chunk_max = score > chunk_max ? score : chunk_max;
        }
        const float m = max > chunk_max ? max : chunk_max;
        if (m == -INFINITY) continue; /* no key scored yet (infinite inputs): nothing to add */
        const float correction = expf(max - m); /* 0 for the first chunk */
        v16 total = splat(0.f);
        for (int64_t j = 0; j < n; j += 16) { /* lanes past n give exp(-inf) = 0 */
            v16 s = load16(scores + j);
            if (n - j < 16) {
                const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
                s = vselect(lane < (float)(n - j), s, splat(-INFINITY));
            }
            const v16 p = vexp(s - m);
            store16(scores + j, p);
            total += p;
        }
        sum = sum * correction + hsum(total);
        max = m;
        for (int64_t c = 0; c < D / 8; c++) acc[c] *= correction;
        for (int64_t j = 0; j < n; j++) {
            const float *row = V + row_of(table, shift, l0 + j) * D;
            const float p = scores[j];
            for (int64_t c = 0; c < D / 8; c++) acc[c] += p * load8f(row + c * 8);
        }
    }
    const float inv = L > 0 ? 1.f / sum : 0.f;
    for (int64_t c = 0; c < D / 8; c++) store8f(out + c * 8, acc[c] * inv);
}

static inline void attend_head(const Args *a, int64_t b, int64_t h) {
    if (a->head_dim == 64) return attend_head_d(a, b, h, 64);
    if (a->head_dim == 128) return attend_head_d(a, b, h, 128);
    attend_head_d(a, b, h, a->head_dim);
}

/* The work items of query token b: one per kv head (its group's heads together) with
 * AVX-512, one per query head without. */
static inline int64_t attention_items(const Args *a) {
#ifdef __AVX512F__
    return a->num_kv_heads;
#else
    return a->num_heads;
#endif
}

static inline void attend_item(const Args *a, int64_t b, int64_t item) {
#ifdef __AVX512F__
    attend(a, b, item);
#else
    attend_head(a, b, item);
#endif
}

#endif
