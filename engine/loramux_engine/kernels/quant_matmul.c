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
 * The cores, rows [begin, end) on one thread, are quant_rows.h's (kernels/cpu_layer.c calls
 * them in its own OpenMP region): an int4 weight is rebuilt bit for bit as the fp32
 * dequantization's. Here the rows are cut into one contiguous share of whole 4-row blocks
 * per thread (torch's OpenMP threads, see decode_attention.c), as gemv.c cuts them.
 */
#include "quant_rows.h"
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* How many threads share out rows (no more than there are 4-row blocks). */
static int share_threads(int64_t out, int num_threads) {
    const int64_t blocks = (out + QR_ROWS - 1) / QR_ROWS;
    const int threads = num_threads > 0 ? num_threads : 1;
    return threads > blocks ? (int)blocks : threads;
}

/* This thread's rows: one contiguous share of whole 4-row blocks. */
static void share(int64_t out, int64_t *begin, int64_t *end) {
    int id = 0, n = 1;
#ifdef _OPENMP
    id = omp_get_thread_num();
    n = omp_get_num_threads();
#endif
    const int64_t blocks = (out + QR_ROWS - 1) / QR_ROWS;
    const int64_t stop = blocks * (id + 1) / n * QR_ROWS;
    *begin = blocks * id / n * QR_ROWS;
    *end = stop < out ? stop : out;
}

int int8_matmul(const float *x, int64_t x_stride, const int8_t *q, const float *scale,
                float *y, int64_t num_tokens, int64_t in, int64_t out, int num_threads) {
    if (in % 16 || in < 0 || out < 0 || num_tokens < 0) return -1;
    if (num_tokens == 0 || out == 0) return 0;
    const int threads = share_threads(out, num_threads);
    if (threads == 1) { /* no team to wake */
        int8_rows(x, x_stride, q, scale, y, out, num_tokens, in, 0, out);
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        share(out, &begin, &end);
        int8_rows(x, x_stride, q, scale, y, out, num_tokens, in, begin, end);
    }
    return 0;
}

int int4_matmul(const float *x, int64_t x_stride, const uint8_t *packed, const float *scale,
                const float *minimum, int64_t group, float *y, int64_t num_tokens, int64_t in,
                int64_t out, int num_threads) {
    if (group <= 0 || in % 32 || group % 32 || in % group || in < 0 || out < 0 ||
        num_tokens < 0)
        return -1;
    if (num_tokens == 0 || out == 0) return 0;
    const int threads = share_threads(out, num_threads);
    if (threads == 1) {
        int4_rows(x, x_stride, packed, scale, minimum, group, y, out, num_tokens, in, 0, out);
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        share(out, &begin, &end);
        int4_rows(x, x_stride, packed, scale, minimum, group, y, out, num_tokens, in, begin, end);
    }
    return 0;
}

/* The row cores themselves on one thread, rows [begin, end) into y with row stride
 * y_stride (tests/engine/test_quantization.py; cpu_layer.c calls them so). */
int int8_rows_range(const float *x, int64_t x_stride, const int8_t *q, const float *scale,
                    float *y, int64_t y_stride, int64_t num_tokens, int64_t in, int64_t begin,
                    int64_t end) {
    if (in % 16 || in < 0 || num_tokens < 0 || begin < 0 || end < begin) return -1;
    int8_rows(x, x_stride, q, scale, y, y_stride, num_tokens, in, begin, end);
    return 0;
}

int int4_rows_range(const float *x, int64_t x_stride, const uint8_t *packed, const float *scale,
                    const float *minimum, int64_t group, float *y, int64_t y_stride,
                    int64_t num_tokens, int64_t in, int64_t begin, int64_t end) {
    if (group <= 0 || in % 32 || group % 32 || in % group || in < 0 || num_tokens < 0 ||
        begin < 0 || end < begin)
        return -1;
    int4_rows(x, x_stride, packed, scale, minimum, group, y, y_stride, num_tokens, in, begin,
              end);
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
