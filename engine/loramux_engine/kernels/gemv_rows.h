/* The GEMV's core for kernels/gemv.c and kernels/cpu_layer.c: output rows [begin, end)
 * of y = x @ w.T (+ bias) for every token, on the calling thread (gemv.c says how). */
#ifndef LORAMUX_GEMV_ROWS_H
#define LORAMUX_GEMV_ROWS_H

#include "vec16.h"

#define ROWS 4

/* The block's sums must stay in registers. AVX-512 has 32 registers of 16 floats: 4 rows
 * by 4 tokens of 16-float sums fit. AVX2 has 16 registers of 8 floats, where that block
 * spilled to the stack and ran at a fifth of the read bandwidth (a Zen 3 EPYC): there a
 * block is 4 rows by 2 tokens of 8-float sums. */
#ifdef __AVX512F__
#define VW 16
#define TOKENS 4
#else
#define VW 8
#define TOKENS 2
#endif
typedef float vw __attribute__((vector_size(VW * 4)));
typedef float vwu __attribute__((vector_size(VW * 4), aligned(4), may_alias));

static inline vw loadw(const float *p) { return *(const vwu *)p; }

static inline float hsumw(vw x) {
    float lanes[VW];
    memcpy(lanes, &x, sizeof lanes);
    return sum_lanes(lanes, VW);
}

/* y[t0 + t, o0 + r] for NT tokens and RB rows from o0. */
static inline __attribute__((always_inline)) void rows_block(
    const float *x, int64_t x_stride, const float *w, const float *next, const float *bias,
    float *y, int64_t y_stride, int64_t in, int64_t o0, int64_t t0, const int NT,
    const int RB) {
    vw acc[TOKENS][ROWS] = {{{0}}};
    const int64_t vec_end = in & ~(int64_t)(VW - 1);
    const float *wr = w + o0 * in;
    const float *xs = x + t0 * x_stride;
    for (int64_t i = 0; i < vec_end; i += VW) {
        vw wv[ROWS];
#ifndef NO_PREFETCH
        if (i % 16 == 0) /* one prefetch per 64-byte line */
            for (int r = 0; r < RB; r++) __builtin_prefetch(next + r * in + i);
#endif
        for (int r = 0; r < RB; r++) wv[r] = loadw(wr + r * in + i);
        for (int t = 0; t < NT; t++) {
            const vw xv = loadw(xs + t * x_stride + i);
            for (int r = 0; r < RB; r++) acc[t][r] += wv[r] * xv;
        }
    }
    float sums[TOKENS][ROWS];
#if VW == 16 && TOKENS == 4
    if (NT == 4 && RB == ROWS) { /* all sixteen sums in one reduction */
        float s[16];
        store16(s, transpose_sum(&acc[0][0]));
        for (int t = 0; t < 4; t++)
            for (int r = 0; r < ROWS; r++) sums[t][r] = s[ROWS * t + r];
    } else
#endif
    {
        for (int t = 0; t < NT; t++)
            for (int r = 0; r < RB; r++) sums[t][r] = hsumw(acc[t][r]);
    }
    for (int64_t i = vec_end; i < in; i++) /* the tail of in, when not a multiple of VW */
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
#if TOKENS == 4
    case 2: rows_block(x, x_stride, w, next, bias, y, y_stride, in, o0, t0, 2, RB); break;
    case 3: rows_block(x, x_stride, w, next, bias, y, y_stride, in, o0, t0, 3, RB); break;
#endif
    default: rows_block(x, x_stride, w, next, bias, y, y_stride, in, o0, t0, TOKENS, RB); break;
    }
}

/* Row o for NT tokens (at most 4), the row read front to back with A sums per token (four
 * for up to two tokens, two beyond, so that the sums stay in AVX2's 16 registers): one
 * plain stream, as a memory read is fastest. Reading four rows side by side (rows_block)
 * read SmolLM2's weights at 26.6 GB/s on a Zen 3 EPYC where a plain read got 30.6 and
 * this 30.6 at one token; rows_block keeps the steps of more tokens, where each loaded
 * weight vector serves four tokens and the time goes to arithmetic, not to memory.
 * Each 64-byte line is also prefetched STREAM_AHEAD floats early (on into the next rows):
 * a decode step's projections are short streams between barriers, which the hardware
 * prefetcher alone ramped up too late; with it, SmolLM2's 30 layers at one token went
 * from 0.85 to 0.91 of the time a plain read of their weights takes (Zen 3 EPYC; 128 to
 * 224 floats ahead measured alike, 320 and more lost again). */
#define STREAM_AHEAD 192
static inline __attribute__((always_inline)) void row_stream(
    const float *x, int64_t x_stride, const float *w, const float *bias, float *y,
    int64_t y_stride, int64_t in, int64_t o, const int NT) {
    const int A = NT <= 2 ? 4 : 2;
    vw acc[4][4] = {{{0}}};
    const float *wr = w + o * in;
    const int64_t unrolled_end = in - in % (A * VW), vec_end = in & ~(int64_t)(VW - 1);
    int64_t i = 0;
    for (; i < unrolled_end; i += A * VW) {
        vw wv[4];
        for (int k = 0; k < A * VW; k += 16) __builtin_prefetch(wr + i + STREAM_AHEAD + k);
        for (int k = 0; k < A; k++) wv[k] = loadw(wr + i + k * VW);
        for (int t = 0; t < NT; t++) {
            const float *xt = x + t * x_stride + i;
            for (int k = 0; k < A; k++) acc[t][k] += wv[k] * loadw(xt + k * VW);
        }
    }
    for (; i < vec_end; i += VW) {
        const vw wv = loadw(wr + i);
        for (int t = 0; t < NT; t++) acc[t][0] += wv * loadw(x + t * x_stride + i);
    }
    for (int t = 0; t < NT; t++) {
        vw total = acc[t][0];
        for (int k = 1; k < A; k++) total += acc[t][k];
        float sum = hsumw(total);
        for (int64_t k = vec_end; k < in; k++) sum += x[t * x_stride + k] * wr[k];
        y[t * y_stride + o] = sum + (bias ? bias[o] : 0.f);
    }
}

/* Output rows [begin, end), every token. */
static inline void rows_range(const float *x, int64_t x_stride, const float *w, const float *bias,
                       float *y, int64_t y_stride, int64_t num_tokens, int64_t in,
                       int64_t begin, int64_t end) {
#define STREAM(NT)                                                                         \
    if (num_tokens == NT) {                                                                \
        for (int64_t o = begin; o < end; o++) row_stream(x, x_stride, w, bias, y, y_stride, in, o, NT); \
        return;                                                                            \
    }
    STREAM(1) STREAM(2) STREAM(3) STREAM(4)
#undef STREAM
    int64_t o = begin;
    for (; o + ROWS <= end; o += ROWS) {
        /* the next block's rows arrive while this one is summed (a block past the share
         * prefetches the next thread's first rows, harmless) */
        const float *next = w + (o + ROWS < end ? o + ROWS : o) * in;
        for (int64_t t0 = 0; t0 < num_tokens; t0 += TOKENS) {
            const int64_t nt = num_tokens - t0 < TOKENS ? num_tokens - t0 : TOKENS;
            rows_tokens(x, x_stride, w, next, bias, y, y_stride, in, o, t0, nt, ROWS);
        }
    }
    for (; o < end; o++)
        for (int64_t t0 = 0; t0 < num_tokens; t0 += TOKENS) {
            const int64_t nt = num_tokens - t0 < TOKENS ? num_tokens - t0 : TOKENS;
            rows_tokens(x, x_stride, w, w + o * in, bias, y, y_stride, in, o, t0, nt, 1);
        }
}

#endif
