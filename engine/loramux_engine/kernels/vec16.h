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

/* The sum of the 16 lanes, as four interleaved partial sums. */
static inline float hsum(v16 x) {
    float lanes[16];
    memcpy(lanes, &x, sizeof lanes);
    float a = 0.f, b = 0.f, c = 0.f, d = 0.f;
    for (int i = 0; i < 16; i += 4) {
        a += lanes[i];
        b += lanes[i + 1];
        c += lanes[i + 2];
        d += lanes[i + 3];
    }
    return (a + b) + (c + d);
}

#endif
