/* The decoder's small per-token ops as one call each, fp32, on the CPU: what was seven to
 * twenty torch ops per layer (each a dispatch, an allocation and a pass over the row).
 *
 * rms_norm. Semantics: for each token t, with s = x[t] + residual[t] (x[t] when residual
 *   is NULL): res_out[t] = s (when res_out is not NULL);
 *   out[t] = weight * (s / sqrt(mean(s * s) + eps)).
 *   Shape: x, residual, out, res_out: [num_tokens, hidden], each with its row stride
 *   (contiguous rows); weight: [hidden]. out may alias x; res_out may alias residual.
 *
 * rotary: LLaMA's rotate-half RoPE, in place. Semantics: for each token t, head h of q and
 *   of k, and i < half, with (c, s) = cos_sin[positions[t], :, i]:
 *   x1, x2 = x[t, h, i], x[t, h, i + half];
 *   x[t, h, i] = x1 * c - x2 * s;  x[t, h, i + half] = x2 * c + x1 * s.
 *   Shape: positions: [num_tokens] int64; q: [num_tokens, num_heads, 2 * half],
 *   k: [num_tokens, num_kv_heads, 2 * half], each with its token and head strides
 *   (contiguous heads); cos_sin: [max_positions, 2, half] contiguous.
 *
 * Both are sums and products in fp32 in another order than torch's: the last bits differ.
 * Steps of many tokens (prefill) spread the tokens over torch's OpenMP threads (see
 * decode_attention.c); a decode step's few rows run on the calling thread.
 */
#include "fused_rows.h"

#define PARALLEL_MIN_TOKENS 16

int rms_norm(const float *x, int64_t x_stride, const float *residual, int64_t residual_stride,
             const float *weight, float eps, float *out, int64_t out_stride, float *res_out,
             int64_t res_out_stride, int64_t num_tokens, int64_t hidden, int num_threads) {
    if (num_tokens < 0 || hidden <= 0) return -1;
    if (num_tokens < PARALLEL_MIN_TOKENS || num_threads <= 1) { /* no team to wake */
        for (int64_t t = 0; t < num_tokens; t++)
            norm_row(x + t * x_stride, residual ? residual + t * residual_stride : 0, weight,
                     eps, out + t * out_stride, res_out ? res_out + t * res_out_stride : 0,
                     hidden);
        return 0;
    }
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < num_tokens; t++)
        norm_row(x + t * x_stride, residual ? residual + t * residual_stride : 0, weight, eps,
                 out + t * out_stride, res_out ? res_out + t * res_out_stride : 0, hidden);
    return 0;
}

int rotary(const int64_t *positions, float *q, int64_t q_token_stride, int64_t q_head_stride,
           int64_t num_heads, float *k, int64_t k_token_stride, int64_t k_head_stride,
           int64_t num_kv_heads, const float *cos_sin, int64_t max_positions, int64_t half,
           int64_t num_tokens, int num_threads) {
    if (num_tokens < 0 || half <= 0) return -1;
    for (int64_t t = 0; t < num_tokens; t++)
        if (positions[t] < 0 || positions[t] >= max_positions) return -2;
    if (num_tokens < PARALLEL_MIN_TOKENS || num_threads <= 1) num_threads = 1;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *cos = cos_sin + positions[t] * 2 * half, *sin = cos + half;
        rotate_heads(q + t * q_token_stride, num_heads, q_head_stride, cos, sin, half);
        rotate_heads(k + t * k_token_stride, num_kv_heads, k_head_stride, cos, sin, half);
    }
    return 0;
}
