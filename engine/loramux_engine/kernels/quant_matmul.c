/* Weight-only quantized matmuls, fp32 activations, on the CPU (layers/quant.py).
 *
 * Semantics:
 *   int8: y[t, n] = scale[n] * sum_k x[t, k] * q[n, k]
 *   int4: y[t, n] = sum_k x[t, k] * (q[n, k] * scale[n, g] + min[n, g]),  g = k / group
 * Shape: x: [num_tokens, in] (row stride x_stride); y: [num_tokens, out] contiguous;
 *        int8: q [out, in] int8, scale [out]; int4: packed [out, in / 2] uint8, where the 16
 *        bytes of each 32-weight chunk c hold weight 32c + j in the low nibble of byte j and
 *        weight 32c + 16 + j in the high one; scale, min [out, in / group] fp32.
 *        in a multiple of 16 (int8) or of 32 and of group (int4, group a multiple of 32).
 *
 * A decode step reads each weight once from memory: 1 byte (int8) or half a byte (int4)
 * where fp32 reads 4. The codes are widened to fp32 in registers, four rows at a time for
 * up to four tokens, so every weight vector serves four tokens and every x vector four
 * rows. An int4 weight is rebuilt as fma(q, scale, min): q * scale is exact (a 4-bit code
 * times an fp16 scale), so the weight equals the fp32 dequantization's bit for bit. Row
 * blocks are spread over torch's OpenMP threads (see decode_attention.c).
 */
#include "vec16.h"

typedef uint8_t v16u8 __attribute__((vector_size(16), aligned(1), may_alias));

/* Bytes to floats through 32-bit ints: a direct byte-to-float conversion is lowered to one
 * scalar conversion per lane by GCC 12; these are a widening move and a conversion. */
static inline v16 widen_u8(v16u8 b) {
    return __builtin_convertvector(__builtin_convertvector(b, v16i), v16);
}
/* (a signed widening is lowered lane by lane too: flip the sign bit, widen unsigned) */
static inline v16 widen_s8(const int8_t *p) {
    return widen_u8(*(const v16u8 *)p ^ 128) - 128.f;
}

#define ROWS 4
#define TOKENS 4

static inline __attribute__((always_inline)) void store_block(
    float *y, int64_t out, int64_t t0, int64_t n0, const int NT, const int R,
    v16 acc[TOKENS][ROWS], const float *row_scale) {
    if (NT == 4 && R == 4) {
        float sums[16];
        store16(sums, transpose_sum(&acc[0][0]));
        for (int t = 0; t < 4; t++)
            for (int r = 0; r < 4; r++)
                y[(t0 + t) * out + n0 + r] = row_scale ? sums[4 * t + r] * row_scale[r] : sums[4 * t + r];
        return;
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < R; r++) {
            const float s = hsum(acc[t][r]);
            y[(t0 + t) * out + n0 + r] = row_scale ? s * row_scale[r] : s;
        }
}

static inline __attribute__((always_inline)) void int8_block(
    const float *x, int64_t x_stride, const int8_t *q, const float *scale, float *y,
    int64_t in, int64_t out, int64_t t0, int64_t n0, const int NT, const int R) {
    v16 acc[TOKENS][ROWS] = {{{0}}};
    for (int64_t k = 0; k < in; k += 16) {
        v16 w[ROWS];
        for (int r = 0; r < R; r++)
            w[r] = widen_s8(q + (n0 + r) * in + k);
        for (int t = 0; t < NT; t++) {
            const v16 xv = load16(x + (t0 + t) * x_stride + k);
            for (int r = 0; r < R; r++) acc[t][r] += w[r] * xv;
        }
    }
    store_block(y, out, t0, n0, NT, R, acc, scale + n0);
}

static inline __attribute__((always_inline)) void int4_block(
    const float *x, int64_t x_stride, const uint8_t *packed, const float *scale,
    const float *minimum, int64_t group, float *y, int64_t in, int64_t out, int64_t t0,
    int64_t n0, const int NT, const int R) {
    v16 acc[TOKENS][ROWS] = {{{0}}};
    const int64_t num_groups = in / group;
    for (int64_t k = 0; k < in; k += 32) {
        const int64_t g = k / group;
        v16 lo[ROWS], hi[ROWS];
        for (int r = 0; r < R; r++) {
            const v16u8 b = *(const v16u8 *)(packed + (n0 + r) * (in / 2) + k / 2);
            const v16 s = splat(scale[(n0 + r) * num_groups + g]);
            const v16 m = splat(minimum[(n0 + r) * num_groups + g]);
            lo[r] = widen_u8(b & 15) * s + m;
            hi[r] = widen_u8(b >> 4) * s + m;
        }
        for (int t = 0; t < NT; t++) {
            const v16 x0 = load16(x + (t0 + t) * x_stride + k);
            const v16 x1 = load16(x + (t0 + t) * x_stride + k + 16);
            for (int r = 0; r < R; r++) {
                acc[t][r] += lo[r] * x0;
                acc[t][r] += hi[r] * x1;
            }
        }
    }
    store_block(y, out, t0, n0, NT, R, acc, (const float *)0);
}

#define DISPATCH_TOKENS(CALL)                   \
    switch (num_tokens - t0 < 4 ? num_tokens - t0 : 4) { \
    case 1: CALL(1); break;                     \
    case 2: CALL(2); break;                     \
    case 3: CALL(3); break;                     \
    default: CALL(4); break;                    \
    }

int int8_matmul(const float *x, int64_t x_stride, const int8_t *q, const float *scale,
                float *y, int64_t num_tokens, int64_t in, int64_t out, int num_threads) {
    if (in % 16) return -1;
    const int64_t num_blocks = (out + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(num_threads > 0 ? num_threads : 1)
    for (int64_t b = 0; b < num_blocks; b++) {
        const int64_t n0 = b * ROWS;
        for (int64_t t0 = 0; t0 < num_tokens; t0 += TOKENS) {
            if (n0 + ROWS <= out) {
#define CALL4(NT) int8_block(x, x_stride, q, scale, y, in, out, t0, n0, NT, 4)
                DISPATCH_TOKENS(CALL4)
#undef CALL4
            } else {
                for (int64_t n = n0; n < out; n++) {
#define CALL1(NT) int8_block(x, x_stride, q, scale, y, in, out, t0, n, NT, 1)
                    DISPATCH_TOKENS(CALL1)
#undef CALL1
                }
            }
        }
    }
    return 0;
}

int int4_matmul(const float *x, int64_t x_stride, const uint8_t *packed, const float *scale,
                const float *minimum, int64_t group, float *y, int64_t num_tokens, int64_t in,
                int64_t out, int num_threads) {
    if (in % 32 || group % 32 || in % group) return -1;
    const int64_t num_blocks = (out + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(num_threads > 0 ? num_threads : 1)
    for (int64_t b = 0; b < num_blocks; b++) {
        const int64_t n0 = b * ROWS;
        for (int64_t t0 = 0; t0 < num_tokens; t0 += TOKENS) {
            if (n0 + ROWS <= out) {
#define CALL4(NT) int4_block(x, x_stride, packed, scale, minimum, group, y, in, out, t0, n0, NT, 4)
                DISPATCH_TOKENS(CALL4)
#undef CALL4
            } else {
                for (int64_t n = n0; n < out; n++) {
#define CALL1(NT) int4_block(x, x_stride, packed, scale, minimum, group, y, in, out, t0, n, NT, 1)
                    DISPATCH_TOKENS(CALL1)
#undef CALL1
                }
            }
        }
    }
    return 0;
}

/* The fp32 weights themselves, w: [out, in] contiguous, for steps of many tokens, where a
 * dense matmul over them beats widening the codes again for every block of four tokens. */
int int8_dequantize(const int8_t *q, const float *scale, float *w, int64_t in, int64_t out,
                    int num_threads) {
    if (in % 16) return -1;
#pragma omp parallel for schedule(static) num_threads(num_threads > 0 ? num_threads : 1)
    for (int64_t n = 0; n < out; n++) {
        const v16 s = splat(scale[n]);
        for (int64_t k = 0; k < in; k += 16) store16(w + n * in + k, widen_s8(q + n * in + k) * s);
    }
    return 0;
}

int int4_dequantize(const uint8_t *packed, const float *scale, const float *minimum,
                    int64_t group, float *w, int64_t in, int64_t out, int num_threads) {
    if (in % 32 || group % 32 || in % group) return -1;
    const int64_t num_groups = in / group;
#pragma omp parallel for schedule(static) num_threads(num_threads > 0 ? num_threads : 1)
    for (int64_t n = 0; n < out; n++) {
        for (int64_t k = 0; k < in; k += 32) {
            const v16u8 b = *(const v16u8 *)(packed + n * (in / 2) + k / 2);
            const v16 s = splat(scale[n * num_groups + k / group]);
            const v16 m = splat(minimum[n * num_groups + k / group]);
            store16(w + n * in + k, widen_u8(b & 15) * s + m);
            store16(w + n * in + k + 16, widen_u8(b >> 4) * s + m);
        }
    }
    return 0;
}
