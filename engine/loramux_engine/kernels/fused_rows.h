/* RMSNorm of one row and RoPE of one token's heads, for kernels/cpu_fused.c and
 * kernels/cpu_layer.c (cpu_fused.c gives their semantics). */
#ifndef LORAMUX_FUSED_ROWS_H
#define LORAMUX_FUSED_ROWS_H

#include <math.h>

#include "vec16.h"

static inline void norm_row(const float *x, const float *residual, const float *weight, float eps,
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

static inline void rotate_heads(float *x, int64_t heads, int64_t head_stride, const float *cos,
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

#endif
