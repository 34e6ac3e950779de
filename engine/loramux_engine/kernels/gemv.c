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
#include <math.h>

#include "gemv_rows.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_TOKENS 64

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

/* Greedy sampling's pass over the logits: each row's maximum and the index of its first
 * occurrence (as torch.argmax); a row holding a NaN gets a NaN maximum (as torch.amax),
 * so that a caller's isfinite check fails it. One pass, where amax and argmax were two
 * torch ops and a third for the check (0.15 to 0.4 ms of a decode step over SmolLM2's
 * 49,152 logits). */
typedef int32_t vwi __attribute__((vector_size(VW * 4)));

int row_argmax(const float *x, int64_t rows, int64_t cols, float *max_out, int64_t *index_out) {
    if (rows < 0 || cols <= 0 || cols > INT32_MAX - VW) return -1;
    vwi lane;
    for (int k = 0; k < VW; k++) lane[k] = k;
    const int64_t vec_end = cols & ~(int64_t)(VW - 1);
    for (int64_t r = 0; r < rows; r++) {
        const float *p = x + r * cols;
        vw best = (vw){0} - INFINITY;
        vwi where = lane, nan = (vwi){0};
        for (int64_t i = 0; i < vec_end; i += VW) {
            const vw v = loadw(p + i);
            nan |= v != v;
            const vwi above = v > best; /* strictly: the first occurrence stays */
            best = (vw)((above & (vwi)v) | (~above & (vwi)best));
            where = (above & (lane + (int32_t)i)) | (~above & where);
        }
        float top = -INFINITY;
        int64_t at = 0;
        int any_nan = 0;
        for (int k = 0; k < VW; k++) {
            any_nan |= nan[k] != 0;
            if (vec_end && (best[k] > top || (best[k] == top && where[k] < at)))
                top = best[k], at = where[k];
        }
        for (int64_t i = vec_end; i < cols; i++) {
            any_nan |= p[i] != p[i];
            if (p[i] > top) top = p[i], at = i;
        }
        max_out[r] = any_nan ? NAN : top;
        index_out[r] = at;
    }
    return 0;
}
