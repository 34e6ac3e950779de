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
#include <math.h>

#include "vec16.h"

#define PARALLEL_MIN_TOKENS 16

static void norm_row(const float *x, const float *residual, const float *weight, float eps,
                     float *out, float *res_out, int64_t hidden) {
    const int64_t vec_end = hidden & ~(int64_t)15;
    v16 acc = splat(0.f);
    float tail = 0.f;
    for (int64_t i = 0; i < vec_end; i += 16) {
        v16 s = load16(x + i);
        if (residual) s += load16(residual + i);
        if (res_out) store16(res_out + i, s);
        acc += s * s;
    }
    for (int64_t i = vec_end; i < hidden; i++) {
        const float s = x[i] + (residual ? residual[i] : 0.f);
        if (res_out) res_out[i] = s;
        tail += s * s;
    }
    const float inv = 1.f / sqrtf((hsum(acc) + tail) / (float)hidden + eps);
    /* the sum again from res_out, or from its inputs when there is none */
    for (int64_t i = 0; i < vec_end; i += 16) {
        v16 s;
        if (res_out) s = load16(res_out + i);
        else s = residual ? load16(x + i) + load16(residual + i) : load16(x + i);
        store16(out + i, load16(weight + i) * (s * inv));
    }
    for (int64_t i = vec_end; i < hidden; i++) {
        const float s = res_out ? res_out[i] : x[i] + (residual ? residual[i] : 0.f);
        out[i] = weight[i] * (s * inv);
    }
}

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

static void rotate_heads(float *x, int64_t heads, int64_t head_stride, const float *cos,
                         const float *sin, int64_t half) {
    const int64_t vec_end = half & ~(int64_t)15;
    for (int64_t h = 0; h < heads; h++) {
        float *x1 = x + h * head_stride, *x2 = x1 + half;
        for (int64_t i = 0; i < vec_end; i += 16) {
            const v16 a = load16(x1 + i), b = load16(x2 + i);
            const v16 c = load16(cos + i), s = load16(sin + i);
            store16(x1 + i, a * c - b * s);
            store16(x2 + i, b * c + a * s);
        }
        for (int64_t i = vec_end; i < half; i++) {
            const float a = x1[i], b = x2[i];
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }
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
