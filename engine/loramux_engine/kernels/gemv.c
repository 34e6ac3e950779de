/* The projections of a step of few tokens (decode, speculative drafts), fp32, on the CPU:
 * a matrix-vector product over the plain row-major weight, at the speed of reading it.
 *
 * Semantics: for each token t < num_tokens and output row o < out,
 *   y[t, o] = sum_i x[t, i] * w[o, i]  (+ bias[o] when bias is not NULL)
 * Shape: x: [num_tokens, in] (row stride x_stride); y: [num_tokens, out] (row stride
 *        y_stride); w: [out, in] contiguous; bias: [out] or NULL; any in and out (a tail
 *        of in below 16 is summed in scalar code); at most MAX_TOKENS tokens.
 *
 * A decode step reads every weight once and does two flops per weight: the time is the
 * weight's bytes over the memory's read bandwidth. Rows are cut into one contiguous share
 * per thread (torch's OpenMP threads, see decode_attention.c), read four rows at a time,
 * each weight vector loaded once for up to four tokens (16 independent FMA chains), the
 * next four rows prefetched on the way. More than four tokens take a second pass over the
 * same four rows, from L1 (up to 64 tokens it still beat oneDNN's packed matmul on SmolLM2's
 * shapes, layers/linear.py). The sums run in a different order than oneDNN's or MKL's: the
 * results differ in the last bits.
 */
#include "vec16.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_TOKENS 64
#define ROWS 4

/* y[t0 + t, o0 + r] for NT tokens and RB rows from o0. */
static inline __attribute__((always_inline)) void rows_block(
    const float *x, int64_t x_stride, const float *w, const float *next, const float *bias,
    float *y, int64_t y_stride, int64_t in, int64_t o0, int64_t t0, const int NT,
    const int RB) {
    v16 acc[4][ROWS] = {{{0}}};
    const int64_t vec_end = in & ~(int64_t)15;
    const float *wr = w + o0 * in;
    const float *xs = x + t0 * x_stride;
    for (int64_t i = 0; i < vec_end; i += 16) {
        v16 wv[ROWS];
        for (int r = 0; r < RB; r++) __builtin_prefetch(next + r * in + i);
        for (int r = 0; r < RB; r++) wv[r] = load16(wr + r * in + i);
        for (int t = 0; t < NT; t++) {
            const v16 xv = load16(xs + t * x_stride + i);
            for (int r = 0; r < RB; r++) acc[t][r] += wv[r] * xv;
        }
    }
    float sums[4][ROWS];
    if (NT == 4 && RB == ROWS) { /* all sixteen sums in one reduction */
        float s[16];
        store16(s, transpose_sum(&acc[0][0]));
        for (int t = 0; t < 4; t++)
            for (int r = 0; r < ROWS; r++) sums[t][r] = s[ROWS * t + r];
    } else {
        for (int t = 0; t < NT; t++)
            for (int r = 0; r < RB; r++) sums[t][r] = hsum(acc[t][r]);
    }
    for (int64_t i = vec_end; i < in; i++) /* the tail of in, when not a multiple of 16 */
        for (int t = 0; t < NT; t++)
            for (int r = 0; r < RB; r++) sums[t][r] += xs[t * x_stride + i] * wr[r * in + i];
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < RB; r++)
            y[(t0 + t) * y_stride + o0 + r] = sums[t][r] + (bias ? bias[o0 + r] : 0.f);
}

static inline __attribute__((always_inline)) void rows_tokens(
    const float *x, int64_t x_stride, const float *w, const float *next, const float *bias,
    float *y, int64_t y_stride, int64_t in, int64_t o0, int64_t t0, int64_t nt, const int RB) {
    switch (nt) {
    case 1: rows_block(x, x_stride, w, next, bias, y, y_stride, in, o0, t0, 1, RB); break;
    case 2: rows_block(x, x_stride, w, next, bias, y, y_stride, in, o0, t0, 2, RB); break;
    case 3: rows_block(x, x_stride, w, next, bias, y, y_stride, in, o0, t0, 3, RB); break;
    default: rows_block(x, x_stride, w, next, bias, y, y_stride, in, o0, t0, 4, RB); break;
    }
}

/* Output rows [begin, end), every token. */
static void rows_range(const float *x, int64_t x_stride, const float *w, const float *bias,
                       float *y, int64_t y_stride, int64_t num_tokens, int64_t in,
                       int64_t begin, int64_t end) {
    int64_t o = begin;
    for (; o + ROWS <= end; o += ROWS) {
        /* the next block's rows arrive while this one is summed (a block past the share
         * prefetches the next thread's first rows, harmless) */
        const float *next = w + (o + ROWS < end ? o + ROWS : o) * in;
        for (int64_t t0 = 0; t0 < num_tokens; t0 += 4) {
            const int64_t nt = num_tokens - t0 < 4 ? num_tokens - t0 : 4;
            rows_tokens(x, x_stride, w, next, bias, y, y_stride, in, o, t0, nt, ROWS);
        }
    }
    for (; o < end; o++)
        for (int64_t t0 = 0; t0 < num_tokens; t0 += 4) {
            const int64_t nt = num_tokens - t0 < 4 ? num_tokens - t0 : 4;
            rows_tokens(x, x_stride, w, w + o * in, bias, y, y_stride, in, o, t0, nt, 1);
        }
}

int gemv(const float *x, int64_t x_stride, const float *w, const float *bias, float *y,
         int64_t y_stride, int64_t num_tokens, int64_t out, int64_t in, int num_threads) {
    if (num_tokens < 0 || num_tokens > MAX_TOKENS || out < 0 || in < 0) return -1;
    if (num_tokens == 0 || out == 0) return 0;
    const int64_t blocks = (out + ROWS - 1) / ROWS;
    int threads = num_threads > 0 ? num_threads : 1;
    if (threads > blocks) threads = (int)blocks;
    if (threads == 1) { /* no team to wake */
        rows_range(x, x_stride, w, bias, y, y_stride, num_tokens, in, 0, out);
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
        int id = 0, n = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        /* one contiguous share of whole blocks per thread */
        const int64_t begin = blocks * id / n * ROWS, stop = blocks * (id + 1) / n * ROWS;
        rows_range(x, x_stride, w, bias, y, y_stride, num_tokens, in, begin,
                   stop < out ? stop : out);
    }
    return 0;
}

/* The sum of n floats, read once by num_threads threads in contiguous shares, with the
 * same loads as the GEMV's (bench engine measures the read bandwidth with it). */
float read_sum(const float *p, int64_t n, int num_threads) {
    float total = 0.f;
    const int threads = num_threads > 0 ? num_threads : 1;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        int id = 0, count = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        count = omp_get_num_threads();
#endif
        const int64_t chunks = n / 64;
        const int64_t begin = chunks * id / count * 64, end = chunks * (id + 1) / count * 64;
        v16 a = splat(0.f), b = a, c = a, d = a;
        for (int64_t i = begin; i < end; i += 64) {
            a += load16(p + i);
            b += load16(p + i + 16);
            c += load16(p + i + 32);
            d += load16(p + i + 48);
        }
        total += hsum((a + b) + (c + d));
        if (id == count - 1)
            for (int64_t i = chunks * 64; i < n; i++) total += p[i];
    }
    return total;
}
