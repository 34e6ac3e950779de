/* Decode attention for CPU: one query token per sequence against its contiguous
 * run of KV cache rows, fp32, grouped-query heads sharing each key/value row.
 *
 * Semantics: for each sequence b and head h (kv head h / group),
 *   out[b, h] = softmax(scale * K[start_b : start_b + len_b] @ q[b, h]) @ V[...]
 * Shape: q, out: [num_seqs, num_heads, head_dim];
 *        k_cache, v_cache: [num_kv_heads, cache_rows, head_dim] (row-major, contiguous);
 *        starts, lens: [num_seqs] (int64).
 * Work items (sequence, kv head) are spread over num_threads pthreads.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_GROUP 16
#define LANES 16

typedef struct {
    const float *q, *k, *v;
    float *out;
    const int64_t *starts, *lens;
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, cache_rows, max_len;
    float scale;
    int num_threads;
    volatile int failed;
} Args;

typedef struct {
    const Args *args;
    int thread_id;
} Job;

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[d + j] * b[d + j];
    float total = 0.f;
    for (int j = 0; j < LANES; j++) total += acc[j];
    for (; d < n; d++) total += a[d] * b[d];
    return total;
}

static void attend(const Args *a, int64_t b, int64_t kvh, float *scores) {
    const int64_t D = a->head_dim, G = a->num_heads / a->num_kv_heads, L = a->lens[b];
    const float *K = a->k + (kvh * a->cache_rows + a->starts[b]) * D;
    const float *V = a->v + (kvh * a->cache_rows + a->starts[b]) * D;
    const float *q = a->q + (b * a->num_heads + kvh * G) * D;
    float *out = a->out + (b * a->num_heads + kvh * G) * D;
    float maxs[MAX_GROUP], sums[MAX_GROUP];
    for (int64_t g = 0; g < G; g++) maxs[g] = -INFINITY, sums[g] = 0.f;
    for (int64_t l = 0; l < L; l++) {
        for (int64_t g = 0; g < G; g++) {
            float s = a->scale * dot(q + g * D, K + l * D, D);
            scores[g * a->max_len + l] = s;
            if (s > maxs[g]) maxs[g] = s;
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float *s = scores + g * a->max_len;
        for (int64_t l = 0; l < L; l++) {
            s[l] = expf(s[l] - maxs[g]);
            sums[g] += s[l];
        }
        for (int64_t d = 0; d < D; d++) out[g * D + d] = 0.f;
    }
    for (int64_t l = 0; l < L; l++) {
        const float *vl = V + l * D;
        for (int64_t g = 0; g < G; g++) {
            const float p = scores[g * a->max_len + l] / sums[g];
            float *o = out + g * D;
            for (int64_t d = 0; d < D; d++) o[d] += p * vl[d];
        }
    }
}

static void *run(void *arg) {
    const Job *job = (const Job *)arg;
    const Args *a = job->args;
    const int64_t G = a->num_heads / a->num_kv_heads;
    float *scores = malloc(sizeof(float) * G * (a->max_len > 0 ? a->max_len : 1));
    if (!scores) {
        ((Args *)a)->failed = 1;
        return NULL;
    }
    const int64_t items = a->num_seqs * a->num_kv_heads;
    for (int64_t i = job->thread_id; i < items; i += a->num_threads)
        attend(a, i / a->num_kv_heads, i % a->num_kv_heads, scores);
    free(scores);
    return NULL;
}

int decode_attention(const float *q, const float *k_cache, const float *v_cache, float *out,
                     const int64_t *starts, const int64_t *lens, int64_t num_seqs,
                     int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     int64_t cache_rows, float scale, int num_threads) {
    if (num_heads % num_kv_heads || num_heads / num_kv_heads > MAX_GROUP) return -1;
    int64_t max_len = 0;
    for (int64_t b = 0; b < num_seqs; b++)
        if (lens[b] > max_len) max_len = lens[b];
    if (num_threads < 1) num_threads = 1;
    if (num_threads > 64) num_threads = 64;
    Args args = {q, k_cache, v_cache, out, starts, lens, num_seqs, num_heads, num_kv_heads,
                 head_dim, cache_rows, max_len, scale, num_threads, 0};
    Job jobs[64];
    pthread_t threads[64];
    int started = 0;
    for (int t = 1; t < num_threads; t++) {
        jobs[t] = (Job){&args, t};
        if (pthread_create(&threads[t], NULL, run, &jobs[t]) != 0) break;
        started = t;
    }
    /* threads that failed to start: the caller's thread covers their items too */
    for (int t = started + 1; t < num_threads; t++) {
        jobs[t] = (Job){&args, t};
        run(&jobs[t]);
    }
    jobs[0] = (Job){&args, 0};
    run(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(threads[t], NULL);
    return args.failed ? -2 : 0;
}
