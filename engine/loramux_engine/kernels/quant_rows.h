/* The weight-only quantized matmuls' cores for kernels/quant_matmul.c and kernels/cpu_layer.c:
 * output rows [begin, end) of y = x @ dequantize(w).T for every token, on the calling thread
 * (no OpenMP here: the caller cuts the rows among its threads).
 *
 *   int8_rows: y[t, n] = scale[n] * sum_k x[t, k] * q[n, k]
 *   int4_rows: y[t, n] = sum_k x[t, k] * (q[n, k] * scale[n, g] + min[n, g]),  g = k / group
 *
 * x: [num_tokens, in] (row stride x_stride); y: [num_tokens, ...] (row stride y_stride, so
 * that a caller can write several weights' outputs side by side in one row); int8: q [out,
 * in] int8, scale [out]; int4: packed [out, in / 2] uint8, where the 16 bytes of each
 * 32-weight chunk c hold weight 32c + j in the low nibble of byte j and weight 32c + 16 + j
 * in the high one; scale, min [out, in / group] fp32. in a multiple of 16 (int8), of 32 and
 * of group (int4, group a multiple of 32): the caller checks (quant_matmul.c refuses others).
 * Any begin <= end, any number of tokens.
 *
 * A decode step reads each weight once from memory: 1 byte (int8) or half a byte (int4)
 * where fp32 reads 4. The codes are widened to fp32 in registers, four rows at a time, each
 * weight vector serving a block of tokens and each x vector four rows. An int4 weight is
 * rebuilt as fma(q, scale, min): q * scale is exact (a 4-bit code times an fp16 scale), so
 * the weight equals the fp32 dequantization's bit for bit.
 *
 * The block's sums must stay in registers (as in gemv_rows.h). AVX-512 (32 registers of 16
 * floats): 4 rows by 4 tokens of 16-float sums. AVX2 (16 registers of 8 floats), where that
 * block spilled to the stack (int8 read its codes at an eighth of the fp32 GEMV's bytes/s on
 * a 2-core Zen 3 EPYC, int4 at a nineteenth): 4 rows by 2 tokens of 8-float sums; from 3
 * tokens up, 2 rows by 4 tokens (each widened code serving 4 tokens: a fifth less time at 4
 * and 16 tokens than 2-token blocks); one token sums each row in two chains. GCC 12 lowers a
 * generic byte-to-int vector conversion lane by lane, so on x86 the codes are widened with
 * the intrinsics (one vpmovsxbd / vpmovzxbd from memory); elsewhere with 16-float vectors
 * through vec16.h (QUANT_ROWS_PORTABLE forces that path, for tests/engine/test_quant_rows.py).
 * On that Zen 3 host, a decode step's int8 / int4 projections of SmolLM2-135M (135 / 101 MB)
 * took about 9 ms each where the fp32 GEMV's (538 MB) took 23 to 26 ms (2 threads, cold
 * caches): the int4 kernel, and nearly the int8 one, are bound by widening the codes there,
 * not by memory (with the weights in L3 the int8 layers took 60% of their cold time).
 * Every name here starts with qr_ / QR_ (or is an entry point): a kernel includes this next
 * to gemv_rows.h, whose ROWS, VW and TOKENS differ.
 */
#ifndef LORAMUX_QUANT_ROWS_H
#define LORAMUX_QUANT_ROWS_H

#include "vec16.h"

#define QR_ROWS 4
/* Codes are prefetched this far ahead of the rows being read (measured on the Zen 3 host,
 * 1 token: int8 over SmolLM2's shapes took 30% less time with it; 4 KiB and 8 KiB ahead did
 * better than 1 KiB or the next block's rows). */
#define QR_PREFETCH_BYTES 4096
#if defined(__AVX512F__) && !defined(QUANT_ROWS_PORTABLE)
#include <immintrin.h>
#define QR_X86 512
#define QR_VW 16
#define QR_TOKENS 4
#elif defined(__AVX2__) && !defined(QUANT_ROWS_PORTABLE)
#include <immintrin.h>
#define QR_X86 256
#define QR_VW 8
#define QR_TOKENS 2
/* 3 or more tokens: blocks of 2 rows by 4 tokens (8 sums again), so that a widened code
 * serves 4 tokens, not 2 */
#define QR_WIDE 1
#else
#define QR_X86 0
#define QR_VW 16
#define QR_TOKENS 4
#endif

#ifndef QR_WIDE
#define QR_WIDE 0
#endif
#define QR_BLOCK_TOKENS 4 /* the most tokens in any block */

typedef float qr_vf __attribute__((vector_size(QR_VW * 4)));
typedef float qr_vfu __attribute__((vector_size(QR_VW * 4), aligned(4), may_alias));
typedef uint8_t qr_u8x16 __attribute__((vector_size(16), aligned(1), may_alias));

static inline qr_vf qr_load(const float *p) { return *(const qr_vfu *)p; }
/* v in every lane (0 + v would be an add, then a broadcast: -0 + 0 is not -0) */
static inline qr_vf qr_splat(float v) {
#if QR_X86 == 512
    return (qr_vf)_mm512_set1_ps(v);
#elif QR_X86 == 256
    return (qr_vf)_mm256_set1_ps(v);
#else
    return (qr_vf){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
#endif
}

#if QR_X86 == 0
/* Bytes to floats through 32-bit ints (a direct conversion is lowered lane by lane). */
static inline v16 qr_widen_u8(qr_u8x16 b) {
    return __builtin_convertvector(__builtin_convertvector(b, v16i), v16);
}
#endif

/* QR_VW int8 codes from p, as floats. */
static inline qr_vf qr_widen_s8(const int8_t *p) {
#if QR_X86 == 512
    return (qr_vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif QR_X86 == 256
    return (qr_vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    /* a signed widening is lowered lane by lane too: flip the sign bit, widen unsigned */
    return qr_widen_u8(*(const qr_u8x16 *)p ^ 128) - 128.f;
#endif
}

/* QR_VW bytes from p: their low nibbles and their high nibbles, as floats. */
static inline void qr_nibbles(const uint8_t *p, qr_vf *lo, qr_vf *hi) {
#if QR_X86 == 512
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = (qr_vf)_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    *hi = (qr_vf)_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
#elif QR_X86 == 256
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = (qr_vf)_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    *hi = (qr_vf)_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
#else
    const qr_u8x16 b = *(const qr_u8x16 *)p;
    *lo = qr_widen_u8(b & 15);
    *hi = qr_widen_u8(b >> 4);
#endif
}

/* The line QR_PREFETCH_BYTES past p, unless that is past limit (another thread's rows). */
static inline void qr_prefetch(const void *p, const void *limit) {
    const char *ahead = (const char *)p + QR_PREFETCH_BYTES;
    if (ahead < (const char *)limit) __builtin_prefetch(ahead);
}

static inline float qr_hsum(qr_vf v) {
    float lanes[QR_VW];
    memcpy(lanes, &v, sizeof lanes);
    return sum_lanes(lanes, QR_VW);
}

/* y[t0 + t, n0 + r] = (sum of acc[t][r]'s lanes) (* row_scale[r] when not NULL). */
static inline __attribute__((always_inline)) void qr_store(
    float *y, int64_t y_stride, int64_t t0, int64_t n0, const int NT, const int R,
    qr_vf acc[QR_BLOCK_TOKENS][QR_ROWS], const float *row_scale) {
    float sums[QR_BLOCK_TOKENS][QR_ROWS];
#if QR_X86 == 256
    if (NT * R <= 8 && R > 1) { /* up to 8 sums (sums[t][r] at t R + r) in one reduction */
        const __m256 zero = _mm256_setzero_ps();
        __m256 v[8];
        for (int i = 0; i < 8; i++) v[i] = i < NT * R ? (__m256)acc[i / R][i % R] : zero;
        const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        float flat[8];
        _mm256_storeu_ps(flat, _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                                             _mm256_permute2f128_ps(a, b, 0x31)));
        for (int t = 0; t < NT; t++)
            for (int r = 0; r < R; r++) sums[t][r] = flat[t * R + r];
    } else
#elif QR_VW == 16 && QR_TOKENS == 4
    if (NT == 4 && R == QR_ROWS) { /* all sixteen sums in one reduction */
        store16(&sums[0][0], transpose_sum((const v16 *)&acc[0][0]));
    } else
#endif
    {
        for (int t = 0; t < NT; t++)
            for (int r = 0; r < R; r++) sums[t][r] = qr_hsum(acc[t][r]);
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < R; r++)
            y[(t0 + t) * y_stride + n0 + r] = row_scale ? sums[t][r] * row_scale[r] : sums[t][r];
}

/* Rows n0 .. n0 + R of int8_rows for tokens t0 .. t0 + NT. */
static inline __attribute__((always_inline)) void qr_int8_block(
    const float *x, int64_t x_stride, const int8_t *q, const void *limit, const float *scale,
    float *y, int64_t y_stride, int64_t in, int64_t t0, int64_t n0, const int NT, const int R) {
    /* One token: two sums per row, in the block's second token's registers, so that 8
     * chains of FMAs run, not 4 (an FMA's latency is 4 cycles, 2 issue per cycle). */
    const int SLOTS = NT == 1 ? 2 : NT;
    qr_vf acc[QR_BLOCK_TOKENS][QR_ROWS];
    for (int t = 0; t < SLOTS; t++)
        for (int r = 0; r < R; r++) acc[t][r] = qr_splat(0.f);
    const int8_t *qs = q + n0 * in;
    const float *xs = x + t0 * x_stride;
    int64_t k = 0;
    if (NT == 1)
        for (; k + 2 * QR_VW <= in; k += 2 * QR_VW) {
            if (k % 64 == 0) /* one prefetch per 64-byte line of each row */
                for (int r = 0; r < R; r++) qr_prefetch(qs + r * in + k, limit);
            const qr_vf x0 = qr_load(xs + k), x1 = qr_load(xs + k + QR_VW);
            for (int r = 0; r < R; r++) {
                acc[0][r] += qr_widen_s8(qs + r * in + k) * x0;
                acc[1][r] += qr_widen_s8(qs + r * in + k + QR_VW) * x1;
            }
        }
    for (; k < in; k += QR_VW) {
        if (k % 64 == 0)
            for (int r = 0; r < R; r++) qr_prefetch(qs + r * in + k, limit);
        qr_vf w[QR_ROWS];
        for (int r = 0; r < R; r++) w[r] = qr_widen_s8(qs + r * in + k);
        for (int t = 0; t < NT; t++) {
            const qr_vf xv = qr_load(xs + t * x_stride + k);
            for (int r = 0; r < R; r++) acc[t][r] += w[r] * xv;
        }
    }
    if (NT == 1)
        for (int r = 0; r < R; r++) acc[0][r] += acc[1][r];
    qr_store(y, y_stride, t0, n0, NT, R, acc, scale + n0);
}

/* Rows n0 .. n0 + R of int4_rows for tokens t0 .. t0 + NT. */
static inline __attribute__((always_inline)) void qr_int4_block(
    const float *x, int64_t x_stride, const uint8_t *packed, const void *limit,
    const float *scale, const float *minimum, int64_t group, float *y, int64_t y_stride,
    int64_t in, int64_t t0, int64_t n0, const int NT, const int R) {
    const int SLOTS = NT == 1 ? 2 : NT; /* one token: two sums per row, as in int8 */
    qr_vf acc[QR_BLOCK_TOKENS][QR_ROWS];
    for (int t = 0; t < SLOTS; t++)
        for (int r = 0; r < R; r++) acc[t][r] = qr_splat(0.f);
    const int64_t num_groups = in / group, half = in / 2;
    const uint8_t *ps = packed + n0 * half;
    const float *xs = x + t0 * x_stride;
    /* One loop over the 32-weight chunks, the group's scale and minimum loaded (broadcast)
     * in every chunk: a loop per group let GCC hoist them, 8 registers for 4 rows, and
     * spill the sums instead. */
    const int64_t chunks_per_group = group / 32;
    int64_t g = 0, chunk_in_group = 0;
    for (int64_t k = 0; k < in; k += 32) {
        if (k % 128 == 0) /* one prefetch per 64-byte line of each row */
            for (int r = 0; r < R; r++) qr_prefetch(ps + r * half + k / 2, limit);
        for (int r = 0; r < R; r++) {
            const qr_vf s = qr_splat(scale[(n0 + r) * num_groups + g]);
            const qr_vf m = qr_splat(minimum[(n0 + r) * num_groups + g]);
            for (int h = 0; h < 16; h += QR_VW) { /* weights k + h .., k + 16 + h .. */
                qr_vf lo, hi;
                qr_nibbles(ps + r * half + k / 2 + h, &lo, &hi);
                lo = lo * s + m; /* one rounding (contracted to an fma or not): exact q * s */
                hi = hi * s + m;
                if (NT == 1) {
                    acc[0][r] += lo * qr_load(xs + k + h);
                    acc[1][r] += hi * qr_load(xs + k + 16 + h);
                } else
                    for (int t = 0; t < NT; t++) {
                        acc[t][r] += lo * qr_load(xs + t * x_stride + k + h);
                        acc[t][r] += hi * qr_load(xs + t * x_stride + k + 16 + h);
                    }
            }
        }
        if (++chunk_in_group == chunks_per_group) {
            chunk_in_group = 0;
            g++;
        }
    }
    if (NT == 1)
        for (int r = 0; r < R; r++) acc[0][r] += acc[1][r];
    qr_store(y, y_stride, t0, n0, NT, R, acc, (const float *)0);
}

/* Tokens [0, num_tokens) of rows n .. n + R (R = 4 or 1) in register blocks: up to
 * QR_TOKENS tokens by R rows, or with QR_WIDE, from 3 tokens up, 4 tokens by 2 rows (by 1 for
 * R = 1). BLOCK(NT, row, RB) computes one block. */
#define QR_TOKEN_BLOCKS(BLOCK, R)                                                     \
    for (int64_t t0 = 0; t0 < num_tokens;) {                                          \
        const int64_t rem = num_tokens - t0;                                           \
        if (QR_WIDE && rem > QR_TOKENS) {                                              \
            const int RB = (R) == 1 ? 1 : 2;                                           \
            if (rem >= 4) {                                                            \
                for (int64_t r0 = n; r0 < n + (R); r0 += RB) BLOCK(4, r0, RB);         \
                t0 += 4;                                                               \
            } else {                                                                   \
                for (int64_t r0 = n; r0 < n + (R); r0 += RB) BLOCK(3, r0, RB);         \
                t0 += 3;                                                               \
            }                                                                          \
            continue;                                                                  \
        }                                                                              \
        switch (rem < QR_TOKENS ? rem : QR_TOKENS) {                                   \
        case 1: BLOCK(1, n, R); break;                                                 \
        case 2: BLOCK(2, n, R); break;                                                 \
        case 3: BLOCK(QR_TOKENS > 2 ? 3 : 1, n, R); break; /* (not reached with 2) */  \
        default: BLOCK(QR_TOKENS, n, R); break;                                        \
        }                                                                              \
        t0 += rem < QR_TOKENS ? rem : QR_TOKENS;                                       \
    }

/* Output rows [begin, end) of the int8 matmul, every token (see the top of the file). */
static inline void int8_rows(const float *x, int64_t x_stride, const int8_t *q,
                             const float *scale, float *y, int64_t y_stride, int64_t num_tokens,
                             int64_t in, int64_t begin, int64_t end) {
    const void *limit = q + end * in; /* the range's last code: no prefetch past it */
    int64_t n = begin;
#define QR_BLOCK(NT, row, RB) \
    qr_int8_block(x, x_stride, q, limit, scale, y, y_stride, in, t0, row, NT, RB)
    for (; n + QR_ROWS <= end; n += QR_ROWS) QR_TOKEN_BLOCKS(QR_BLOCK, QR_ROWS)
    for (; n < end; n++) QR_TOKEN_BLOCKS(QR_BLOCK, 1)
#undef QR_BLOCK
}

/* Output rows [begin, end) of the int4 matmul, every token (see the top of the file). */
static inline void int4_rows(const float *x, int64_t x_stride, const uint8_t *packed,
                             const float *scale, const float *minimum, int64_t group, float *y,
                             int64_t y_stride, int64_t num_tokens, int64_t in, int64_t begin,
                             int64_t end) {
    const void *limit = packed + end * (in / 2);
    int64_t n = begin;
#define QR_BLOCK(NT, row, RB)                                                                  \
    qr_int4_block(x, x_stride, packed, limit, scale, minimum, group, y, y_stride, in, t0, row, \
                  NT, RB)
    for (; n + QR_ROWS <= end; n += QR_ROWS) QR_TOKEN_BLOCKS(QR_BLOCK, QR_ROWS)
    for (; n < end; n++) QR_TOKEN_BLOCKS(QR_BLOCK, 1)
#undef QR_BLOCK
}

#endif
