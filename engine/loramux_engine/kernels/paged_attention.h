/* Attention over the paged KV cache for kernels/decode_attention.c and kernels/cpu_layer.c.
 *
 * A work item is one query token, one kv head (its group of query heads together) and one
 * span of the token's keys: a token alone (a single stream's decode step) has too few
 * (token, kv head) pairs to keep every thread busy (SmolLM2: 3 kv heads on 2 threads), so
 * its keys are split into `splits` spans whose partial softmaxes are merged afterwards
 * (flash-decoding's split-K). Within an item, keys go in chunks of CHUNK_KEYS:
 *   scores   q.k for the group's heads, AW keys at a time: AW running sums, one per key,
 *            each a vector over head_dim, then one transpose-and-add gives AW scores (a
 *            horizontal sum per key cost more than the products); the AW key rows stay in
 *            L1 while each head of the group reads them;
 *   softmax  the chunk's scores in vectors, the running max and sum rescaled (online);
 *   values   the group's output sums in register tiles of heads by vectors of head_dim,
 *            each value row loaded once per tile and used by every head in it.
 * Each key and value row thus comes from memory once per step and kv head. AW is the
 * vector width: 8 floats on AVX2 (16 registers), 16 with AVX-512 (32 registers).
 * Measured on an AVX2 Zen 3 EPYC with SmolLM2's shape (9 heads, 3 kv heads, head_dim 64):
 * one token over 1,000 cache-resident keys on one thread, 45 ns per key and kv head, where
 * the kernel before (a horizontal sum per key and head, 16-float vectors) took 64; in the
 * C decoder's layer pass (cpu_layer.c) at 300 keys on 2 threads, the 30 layers went from
 * 0.72 to 0.77 of the time a plain read of their weights takes. */
#ifndef LORAMUX_PAGED_ATTENTION_H
#define LORAMUX_PAGED_ATTENTION_H

#include <math.h>

#include "vec16.h"

#define MAX_GROUP 16
#define MAX_CHUNKS 16 /* head_dim / 16 */
#define MAX_HEAD_DIM (MAX_CHUNKS * 16)
#define CHUNK_KEYS 64 /* keys per online-softmax step */
#define MAX_SPLITS 64 /* spans of one (token, kv head)'s keys */
#define MIN_SPAN 32   /* keys: a span shorter than this is not worth its merge */

#ifndef ATTENTION_WIDTH /* the tests force 16 on AVX2 hosts to check that path too */
#ifdef __AVX512F__
#define ATTENTION_WIDTH 16
#else
#define ATTENTION_WIDTH 8
#endif
#endif
#define AW ATTENTION_WIDTH
typedef float av __attribute__((vector_size(AW * 4)));
typedef float avu __attribute__((vector_size(AW * 4), aligned(4), may_alias));
typedef int32_t avi __attribute__((vector_size(AW * 4)));
static inline av load_av(const float *p) { return *(const avu *)p; }
static inline void store_av(float *p, av v) { *(avu *)p = v; }

typedef struct {
    const float *q, *k, *v;
    float *out;
    const int64_t *block_ids, *table_starts, *lens;
    int64_t q_stride; /* between query tokens' rows of q (out's are num_heads * head_dim) */
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, cache_rows, block_shift;
    float scale;
    int64_t splits;  /* spans per (token, kv head): attention_splits */
    float *partials; /* splits > 1: attention_partials(args) floats of scratch */
} Args;

/* The cache row of a sequence's key l, through its block table. */
static inline int64_t row_of(const int64_t *table, int64_t shift, int64_t l) {
    return (table[l >> shift] << shift) | (l & ((INT64_C(1) << shift) - 1));
}

static inline av splat_av(float x) { return (av){0} + x; }

/* mask ? a : b per lane; mask lanes are all ones or all zeros (a vector comparison). */
static inline av select_av(avi mask, av a, av b) {
    return (av)((mask & (avi)a) | (~mask & (avi)b));
}

static inline float max_av(av x) {
    float best = x[0];
    for (int i = 1; i < AW; i++) best = x[i] > best ? x[i] : best;
    return best;
}

static inline float sum_av(av x) {
    float lanes[AW];
    memcpy(lanes, &x, sizeof lanes);
    return sum_lanes(lanes, AW);
}

/* exp(x) for x <= 0 (Cephes' expf: range reduction by ln 2, degree-5 polynomial), within
 * about one ulp of expf; below -87 it flushes to 0 so masked lanes give exactly 0. In
 * vectors of the target's width: 16-float vectors on AVX2 went through the stack and
 * took most of attention's time. */
static inline av exp_av(av x) {
    const av lo = splat_av(-87.0f);
    const avi tiny = x < lo;
    x = select_av(tiny, lo, x);
    const av fx = x * 1.44269504088896341f + 0.5f;
    avi n = __builtin_convertvector(fx, avi);
    av nf = __builtin_convertvector(n, av);
    n += nf > fx; /* truncation rounded up for negatives (adds -1): floor() */
    nf = __builtin_convertvector(n, av);
    x = x - nf * 0.693359375f - nf * -2.12194440e-4f;
    av p = splat_av(1.9875691500e-4f);
    p = p * x + 1.3981999507e-3f;
    p = p * x + 8.3334519073e-3f;
    p = p * x + 4.1665795894e-2f;
    p = p * x + 1.6666665459e-1f;
    p = p * x + 5.0000001201e-1f;
    p = p * x * x + x + 1.0f;
    const av two_n = (av)((n + 127) << 23);
    return select_av(tiny, splat_av(0.f), p * two_n);
}

/* Sums of AW vectors at once: out[j] = sum of t[j]'s lanes, by pairwise halving. */
static inline av transpose_add(const av t[AW]) {
#if AW == 16
    return transpose_sum(t);
#else
#if defined(__clang__)
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, (avi){__VA_ARGS__})
#endif
    av u[4], w[2];
    for (int i = 0; i < 4; i++) /* lanes 0-3: t[2i] folded in half; 4-7: t[2i + 1] */
        u[i] = SHUFFLE8(t[2 * i], t[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
               SHUFFLE8(t[2 * i], t[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; i++) /* lane pairs: t[4i], t[4i + 1], t[4i + 2], t[4i + 3] */
        w[i] = SHUFFLE8(u[2 * i], u[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
               SHUFFLE8(u[2 * i], u[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    return SHUFFLE8(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14) +
           SHUFFLE8(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15);
#undef SHUFFLE8
#endif
}

/* The number of spans each (token, kv head)'s keys are split into: 1 when the step has
 * at least two (token, kv head) pairs per thread; else enough that the items share
 * evenly among the threads, no span shorter than MIN_SPAN keys. */
static inline int64_t attention_splits(int64_t num_tokens, int64_t num_kv_heads,
                                       int64_t max_len, int64_t num_threads) {
    const int64_t pairs = num_tokens * num_kv_heads;
    if (pairs <= 0 || num_threads <= 1 || pairs >= 2 * num_threads) return 1;
    int64_t splits = (2 * num_threads + pairs - 1) / pairs;
    while ((pairs * splits) % num_threads && splits < MAX_SPLITS) splits++;
    const int64_t by_len = max_len / MIN_SPAN > 1 ? max_len / MIN_SPAN : 1;
    splits = splits < by_len ? splits : by_len;
    return splits < MAX_SPLITS ? splits : MAX_SPLITS;
}

/* Floats of scratch for the spans' partial results: per item, each head's D sums, then
 * the G maxes and G sums. */
static inline int64_t attention_partials(int64_t num_tokens, int64_t num_heads,
                                         int64_t head_dim, int64_t splits) {
    return splits > 1 ? num_tokens * splits * num_heads * (head_dim + 2) : 0;
}

static inline int64_t attention_items(const Args *a) {
    return a->num_seqs * a->num_kv_heads * a->splits;
}

/* Keys [begin, end) of token b for kv head kvh's G heads: with `partial`, each head's
 * unnormalized sums, then the maxes and sums there; else the normalized output. G and D
 * are constants where inlined for the common shapes, so the tiles stay in registers. */
static inline __attribute__((always_inline)) void attend_span(const Args *a, int64_t b,
                                                              int64_t kvh, int64_t begin,
                                                              int64_t end, float *partial,
                                                              const int64_t G, const int64_t D) {
    const int64_t NV = D / AW;
    /* a tile of the value pass: TV vectors of head_dim by TG heads, in at most 12 (AVX2)
     * or 24 (AVX-512) registers; TV divides NV, TG divides G */
    int64_t TV = NV < 4 ? NV : 4;
    while (NV % TV) TV--;
    const int64_t LIMIT = (AW == 16 ? 24 : 12) / TV;
    int64_t TG = G < LIMIT ? G : LIMIT;
    while (G % TG) TG--;
    const int64_t shift = a->block_shift;
    const int64_t *table = a->block_ids + a->table_starts[b];
    const float *K = a->k + kvh * a->cache_rows * D;
    const float *V = a->v + kvh * a->cache_rows * D;
    const float *q = a->q + b * a->q_stride + kvh * G * D;
    float qs[MAX_GROUP * MAX_HEAD_DIM] __attribute__((aligned(64)));
    float acc[MAX_GROUP * MAX_HEAD_DIM] __attribute__((aligned(64)));
    float scores[MAX_GROUP][CHUNK_KEYS] __attribute__((aligned(64)));
    float maxs[MAX_GROUP], sums[MAX_GROUP];
    const float *krow[CHUNK_KEYS], *vrow[CHUNK_KEYS];
    for (int64_t i = 0; i < G * D; i++) qs[i] = q[i] * a->scale, acc[i] = 0.f;
    for (int64_t g = 0; g < G; g++) maxs[g] = -INFINITY, sums[g] = 0.f;
    av lane;
    for (int i = 0; i < AW; i++) lane[i] = (float)i;
    for (int64_t c0 = begin; c0 < end; c0 += CHUNK_KEYS) {
        const int64_t n = end - c0 < CHUNK_KEYS ? end - c0 : CHUNK_KEYS;
        for (int64_t j = 0; j < n; j++) {
            const int64_t row = row_of(table, shift, c0 + j) * D;
            krow[j] = K + row, vrow[j] = V + row;
        }
        for (int64_t j = n; j < CHUNK_KEYS; j++) krow[j] = krow[n - 1]; /* scores masked */
        for (int64_t j0 = 0; j0 < n; j0 += AW) {
            for (int64_t j = j0; j < j0 + AW && j < n; j++) /* needed after the scores */
                for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(vrow[j] + c);
            for (int64_t g = 0; g < G; g++) {
                av t[AW];
                for (int j = 0; j < AW; j++) t[j] = (av){0};
                for (int64_t c = 0; c < NV; c++) {
                    const av qv = load_av(qs + g * D + c * AW);
                    for (int j = 0; j < AW; j++) t[j] += qv * load_av(krow[j0 + j] + c * AW);
                }
                store_av(scores[g] + j0, transpose_add(t));
            }
        }
        for (int64_t g = 0; g < G; g++) { /* online softmax over the chunk */
            av s[CHUNK_KEYS / AW], top = splat_av(-INFINITY);
            for (int64_t k = 0; k < CHUNK_KEYS / AW; k++) {
                s[k] = load_av(scores[g] + AW * k);
                s[k] = select_av(lane + (float)(AW * k) < (float)n, s[k], splat_av(-INFINITY));
                top = select_av(s[k] > top, s[k], top);
            }
            const float m = fmaxf(maxs[g], max_av(top));
            if (m == -INFINITY) { /* no key scored yet (infinite inputs): nothing to add */
                for (int64_t k = 0; k < CHUNK_KEYS; k++) scores[g][k] = 0.f;
                continue;
            }
            const float correction = expf(maxs[g] - m); /* 0 for the first chunk */
            av total = splat_av(0.f);
            for (int64_t k = 0; k < CHUNK_KEYS / AW; k++) {
                const av p = exp_av(s[k] - m);
                store_av(scores[g] + AW * k, p);
                total += p;
            }
            sums[g] = sums[g] * correction + sum_av(total);
            maxs[g] = m;
            if (correction != 1.f)
                for (int64_t i = g * D; i < (g + 1) * D; i++) acc[i] *= correction;
        }
        for (int64_t g0 = 0; g0 < G; g0 += TG) /* values, a tile at a time */
            for (int64_t v0 = 0; v0 < NV; v0 += TV) {
                av r[MAX_GROUP][4];
                for (int64_t g = 0; g < TG; g++)
                    for (int64_t c = 0; c < TV; c++)
                        r[g][c] = load_av(acc + (g0 + g) * D + (v0 + c) * AW);
                for (int64_t j = 0; j < n; j++)
                    for (int64_t c = 0; c < TV; c++) {
                        const av v = load_av(vrow[j] + (v0 + c) * AW);
                        for (int64_t g = 0; g < TG; g++) r[g][c] += scores[g0 + g][j] * v;
                    }
                for (int64_t g = 0; g < TG; g++)
                    for (int64_t c = 0; c < TV; c++)
                        store_av(acc + (g0 + g) * D + (v0 + c) * AW, r[g][c]);
            }
    }
    if (partial) {
        for (int64_t i = 0; i < G * D; i++) partial[i] = acc[i];
        for (int64_t g = 0; g < G; g++)
            partial[G * D + g] = maxs[g], partial[G * D + G + g] = sums[g];
        return;
    }
    float *out = a->out + (b * a->num_heads + kvh * G) * D;
    for (int64_t g = 0; g < G; g++) {
        const float inv = sums[g] > 0.f ? 1.f / sums[g] : 0.f;
        for (int64_t i = 0; i < D; i++) out[g * D + i] = acc[g * D + i] * inv;
    }
}

/* Work item i: token, kv head, span (attention_items). */
static inline void attend_item(const Args *a, int64_t i) {
    const int64_t S = a->splits, s = i % S, kvh = i / S % a->num_kv_heads;
    const int64_t b = i / S / a->num_kv_heads, L = a->lens[b];
    const int64_t G = a->num_heads / a->num_kv_heads, D = a->head_dim;
    const int64_t begin = L * s / S, end = L * (s + 1) / S;
    float *partial = S > 1 ? a->partials + i * G * (D + 2) : NULL;
#define SHAPE(g, d) \
    if (G == g && D == d) return attend_span(a, b, kvh, begin, end, partial, g, d);
    SHAPE(1, 64) SHAPE(2, 64) SHAPE(3, 64) SHAPE(4, 64) SHAPE(5, 64) SHAPE(6, 64)
    SHAPE(7, 64) SHAPE(8, 64) SHAPE(1, 128) SHAPE(2, 128) SHAPE(4, 128) SHAPE(8, 128)
#undef SHAPE
    attend_span(a, b, kvh, begin, end, partial, G, D);
}

static inline int64_t merge_items(const Args *a) {
    return a->splits > 1 ? a->num_seqs * a->num_heads : 0;
}

/* With splits > 1, after every item: output i (token i / heads, head i % heads) from its
 * spans' partial results. */
static inline void merge_item(const Args *a, int64_t i) {
    const int64_t S = a->splits, G = a->num_heads / a->num_kv_heads, D = a->head_dim;
    const int64_t b = i / a->num_heads, h = i % a->num_heads, kvh = h / G, g = h % G;
    const int64_t width = G * (D + 2);
    const float *first = a->partials + (b * a->num_kv_heads + kvh) * S * width;
    float top = -INFINITY, weights[MAX_SPLITS], total = 0.f;
    for (int64_t s = 0; s < S; s++) top = fmaxf(top, first[s * width + G * D + g]);
    for (int64_t s = 0; s < S; s++) {
        const float m = first[s * width + G * D + g];
        weights[s] = m == -INFINITY ? 0.f : expf(m - top);
        total += weights[s] * first[s * width + G * D + G + g];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    float *out = a->out + (b * a->num_heads + h) * D;
    for (int64_t k = 0; k < D; k++) {
        float sum = 0.f;
        for (int64_t s = 0; s < S; s++) sum += weights[s] * first[s * width + g * D + k];
        out[k] = sum * inv;
    }
}

#endif
