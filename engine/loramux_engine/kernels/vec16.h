/* Sixteen-float vectors for the engine's CPU kernels: GCC/clang vector extensions,
 * lowered to whatever the target has (AVX-512, AVX2, NEON). */
#ifndef LORAMUX_VEC16_H
#define LORAMUX_VEC16_H

#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
/* Unaligned access through a may_alias type: one vector load or store, where a memcpy into
 * a vector was lowered to two half-width stores and a full-width reload (a store-forwarding
 * stall per load, measured at most of the kernels' time). */
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

static inline v16 load16(const float *p) { return *(const v16u *)p; }
static inline void store16(float *p, v16 v) { *(v16u *)p = v; }
static inline v16 splat(float x) { return (v16){0} + x; }

/* The sum of n lanes (a multiple of 4), as four interleaved partial sums. */
static inline float sum_lanes(const float *lanes, int n) {
    float a = 0.f, b = 0.f, c = 0.f, d = 0.f;
    for (int i = 0; i < n; i += 4) {
        a += lanes[i];
        b += lanes[i + 1];
        c += lanes[i + 2];
        d += lanes[i + 3];
    }
    return (a + b) + (c + d);
}

/* The sum of the 16 lanes. */
static inline float hsum(v16 x) {
    float lanes[16];
    memcpy(lanes, &x, sizeof lanes);
    return sum_lanes(lanes, 16);
}

#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v16i){__VA_ARGS__})
#endif

/* Lane sums of 16 vectors at once: out[j] = sum(t[j]). A tree of 15 pairwise steps,
 * each adding the two halves of every vector's lanes, instead of 16 serial reductions. */
static inline v16 transpose_sum(const v16 t[16]) {
    v16 u[8], w[4], z[2];
    for (int i = 0; i < 8; i++)
        u[i] = SHUFFLE(t[2 * i], t[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7,
                       16, 17, 18, 19, 20, 21, 22, 23) +
               SHUFFLE(t[2 * i], t[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15,
                       24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        w[i] = SHUFFLE(u[2 * i], u[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11,
                       16, 17, 18, 19, 24, 25, 26, 27) +
               SHUFFLE(u[2 * i], u[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15,
                       20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        z[i] = SHUFFLE(w[2 * i], w[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13,
                       16, 17, 20, 21, 24, 25, 28, 29) +
               SHUFFLE(w[2 * i], w[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15,
                       18, 19, 22, 23, 26, 27, 30, 31);
    return SHUFFLE(z[0], z[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SHUFFLE(z[0], z[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

#endif
