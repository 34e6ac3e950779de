/* A LLaMA decoder layer for a step of few tokens (decode, speculative drafts), fp32
 * activations, on the CPU, in as few calls as the adapters allow (models/cpu_decode.py).
 *
 * A batch-1 decode step of SmolLM2-135M reads 540 MB of weights in about 20 ms; done as
 * torch ops and one C call per op it also paid for some 450 Python calls and as many
 * OpenMP team wake-ups, and their share of the step grew as the GEMV got faster. Here
 * each of a layer's four parts is one call with one OpenMP region, its steps separated
 * by barriers of the threads already running, and a step without adapters runs every
 * layer in one call.
 *
 * The parts, for num_tokens tokens (rows of `hidden`, `qkv`, ... below, contiguous):
 *   PART_QKV    residual += h (the first layer: residual = h); normed = rms_norm(residual);
 *               qkv = normed @ [Wq; Wk; Wv].T (+ biases): q, k, v side by side in a row
 *   PART_ATTEND RoPE on q and k in place (cpu_fused.c's rotary); k and v written to each
 *               token's cache row cache_positions[t]; attn = attention of each token over
 *               its sequence's first lens[t] keys through its block table
 *               (decode_attention.c); h = attn @ Wo.T
 *   PART_MLP_IN residual += h; normed = rms_norm(residual); gate_up = normed @ [Wg; Wu].T
 *   PART_MLP_OUT act = silu(gate) * up; h = act @ Wd.T
 * so that after the four parts h is the layer's output and residual the stream before it,
 * as models/llama.py's layers return them. Between parts the caller adds its adapters'
 * deltas to qkv, h (o), gate_up and h (down), each with the part's input as x.
 *
 * A weight is fp32 rows (gemv.c), or int8 / int4 codes (quant_matmul.c); the sums run in
 * their kernels' order, so results differ from torch's in the last bits.
 */
#include "fused_rows.h"
#include "gemv_rows.h"
#include "paged_attention.h"
#include "quant_rows.h"
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_TOKENS 64
#define PART_QKV 1
#define PART_ATTEND 2
#define PART_MLP_IN 4
#define PART_MLP_OUT 8
#define ALL_PARTS 15

enum { FP32 = 0, INT8 = 1, INT4 = 2 };

/* Every field is 8 bytes wide, so the ctypes mirror (models/cpu_decode.py) has no padding
 * to get wrong. */
typedef struct {
    int64_t kind, out, in, group;
    const void *w;                       /* fp32 [out, in], int8 [out, in], int4 packed */
    const float *scale, *minimum, *bias; /* quantization's (NULL for fp32); bias or NULL */
} Matrix;

typedef struct {
    const float *input_norm, *post_norm;
    Matrix qkv[3], o, gate_up[2], down;
    float *k_cache, *v_cache; /* [num_kv_heads, cache_rows, head_dim] each */
} Layer;

typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate;
    int64_t cache_rows, block_shift, max_positions, num_layers;
    double eps, scale;
    const float *cos_sin; /* [max_positions, 2, head_dim / 2] */
    const Layer *layers;
    const float *final_norm; /* the model's last RMSNorm, or NULL: all_layers ends with it */
    double final_eps;
} Model;

typedef struct {
    int64_t num_tokens, num_threads, num_block_ids;
    const int64_t *positions, *cache_positions, *block_ids, *table_starts, *lens;
    /* [num_tokens, width] each: hidden; hidden; hidden; (heads + 2 kv heads) * head_dim;
     * heads * head_dim; 2 * intermediate; intermediate */
    float *h, *residual, *normed, *qkv, *attn, *gate_up, *act;
} Step;

/* Rows [begin, end) of y = x @ m.T (+ bias) for every token. */
static void matrix_rows(const Matrix *m, const float *x, int64_t x_stride, float *y,
                        int64_t y_stride, int64_t num_tokens, int64_t begin, int64_t end) {
    if (begin >= end) return;
    if (m->kind == FP32) {
        rows_range(x, x_stride, (const float *)m->w, m->bias, y, y_stride, num_tokens, m->in,
                   begin, end);
        return;
    }
    if (m->kind == INT8)
        int8_rows(x, x_stride, (const int8_t *)m->w, m->scale, y, y_stride, num_tokens, m->in,
                  begin, end);
    else
        int4_rows(x, x_stride, (const uint8_t *)m->w, m->scale, m->minimum, m->group, y,
                  y_stride, num_tokens, m->in, begin, end);
    if (m->bias)
        for (int64_t t = 0; t < num_tokens; t++)
            for (int64_t o = begin; o < end; o++) y[t * y_stride + o] += m->bias[o];
}

/* This thread's share of y = x @ [m_0; m_1; ...].T: one contiguous share of whole 4-row
 * blocks of each weight (as gemv.c cuts one). */
static void matmul_share(const Matrix *m, int count, const float *x, int64_t x_stride,
                         float *y, int64_t y_stride, int64_t num_tokens, int id, int n) {
    for (int i = 0; i < count; i++) {
        const int64_t blocks = (m[i].out + ROWS - 1) / ROWS;
        const int64_t begin = blocks * id / n * ROWS, stop = blocks * (id + 1) / n * ROWS;
        matrix_rows(&m[i], x, x_stride, y, y_stride, num_tokens, begin,
                    stop < m[i].out ? stop : m[i].out);
        y += m[i].out;
    }
}

/* normed = rms_norm(residual (+)= h), this thread's tokens. */
static void add_norm(const Model *M, const Step *S, const float *weight, double eps, int first,
                     int id, int n) {
    const int64_t d = M->hidden;
    for (int64_t t = id; t < S->num_tokens; t += n)
        norm_row(S->h + t * d, first ? 0 : S->residual + t * d, weight, (float)eps,
                 S->normed + t * d, S->residual + t * d, d);
}

static inline av silu_av(av g) {
    const avi negative = g < 0.f;
    const av e = exp_av(select_av(negative, g, -g)); /* exp(-|g|), in (0, 1] */
    /* g / (1 + exp(-g)) for g >= 0; g * exp(g) / (1 + exp(g)) below */
    return select_av(negative, g * e, g) / (1.f + e);
}

/* How attention splits each token's keys this step (paged_attention.h). */
typedef struct {
    int64_t splits;
    float *partials;
} Split;

static void run_parts(const Model *M, const Layer *L, const Step *S, const Split *split,
                      int parts, int first, int id, int n) {
    const int64_t nt = S->num_tokens, d = M->hidden, hd = M->head_dim, I = M->intermediate;
    const int64_t heads = M->num_heads, kv_heads = M->num_kv_heads;
    const int64_t qkv_width = (heads + 2 * kv_heads) * hd, half = hd / 2;
    if (parts & PART_QKV) {
        add_norm(M, S, L->input_norm, M->eps, first, id, n);
#pragma omp barrier
        matmul_share(L->qkv, 3, S->normed, d, S->qkv, qkv_width, nt, id, n);
#pragma omp barrier
    }
    if (parts & PART_ATTEND) {
        for (int64_t t = id; t < nt; t += n) {
            float *q = S->qkv + t * qkv_width, *k = q + heads * hd, *v = k + kv_heads * hd;
            const float *cos = M->cos_sin + S->positions[t] * 2 * half, *sin = cos + half;
            rotate_heads(q, heads, hd, cos, sin, half);
            rotate_heads(k, kv_heads, hd, cos, sin, half);
            const int64_t row = S->cache_positions[t] * hd;
            for (int64_t j = 0; j < kv_heads; j++) {
                memcpy(L->k_cache + j * M->cache_rows * hd + row, k + j * hd, hd * sizeof(float));
                memcpy(L->v_cache + j * M->cache_rows * hd + row, v + j * hd, hd * sizeof(float));
            }
        }
#pragma omp barrier
        const Args args = {S->qkv, L->k_cache, L->v_cache, S->attn, S->block_ids,
                           S->table_starts, S->lens, qkv_width, nt, heads, kv_heads, hd,
                           M->cache_rows, M->block_shift, (float)M->scale, split->splits,
                           split->partials};
        for (int64_t i = id; i < attention_items(&args); i += n) attend_item(&args, i);
#pragma omp barrier
        if (merge_items(&args)) {
            for (int64_t i = id; i < merge_items(&args); i += n) merge_item(&args, i);
#pragma omp barrier
        }
        matmul_share(&L->o, 1, S->attn, heads * hd, S->h, d, nt, id, n);
#pragma omp barrier
    }
    if (parts & PART_MLP_IN) {
        add_norm(M, S, L->post_norm, M->eps, 0, id, n);
#pragma omp barrier
        matmul_share(L->gate_up, 2, S->normed, d, S->gate_up, 2 * I, nt, id, n);
#pragma omp barrier
    }
    if (parts & PART_MLP_OUT) {
        /* each thread its share of every token's row, in whole vectors */
        const int64_t vectors = I / AW, vec_end = vectors * AW;
        const int64_t begin = vectors * id / n * AW, stop = vectors * (id + 1) / n * AW;
        for (int64_t t = 0; t < nt; t++) {
            const float *g = S->gate_up + t * 2 * I, *u = g + I;
            float *a = S->act + t * I;
            for (int64_t i = begin; i < stop; i += AW)
                store_av(a + i, silu_av(load_av(g + i)) * load_av(u + i));
            if (id == n - 1)
                for (int64_t i = vec_end; i < I; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
        }
#pragma omp barrier
        matmul_share(&L->down, 1, S->act, I, S->h, d, nt, id, n);
#pragma omp barrier
    }
}

/* Every row the step reads or writes lies in the cache: positions, cache rows, each token's
 * block table (within block_ids, its blocks within the cache). */
static int check(const Model *M, const Step *S) {
    if (S->num_tokens < 0 || S->num_tokens > MAX_TOKENS) return -1;
    if (M->head_dim <= 0 || M->head_dim % 16 || M->head_dim / 16 > MAX_CHUNKS ||
        M->num_kv_heads <= 0 || M->num_heads % M->num_kv_heads ||
        M->num_heads / M->num_kv_heads > MAX_GROUP || M->block_shift < 0 || M->block_shift > 30)
        return -1;
    const int64_t block_size = INT64_C(1) << M->block_shift;
    const int64_t num_blocks = M->cache_rows >> M->block_shift;
    for (int64_t t = 0; t < S->num_tokens; t++) {
        if (S->positions[t] < 0 || S->positions[t] >= M->max_positions) return -2;
        if (S->cache_positions[t] < 0 || S->cache_positions[t] >= M->cache_rows) return -2;
        const int64_t start = S->table_starts[t], len = S->lens[t];
        const int64_t used = (len + block_size - 1) / block_size;
        if (start < 0 || len < 0 || start > S->num_block_ids - used) return -2;
        for (int64_t i = start; i < start + used; i++)
            if (S->block_ids[i] < 0 || S->block_ids[i] >= num_blocks) return -2;
    }
    return 0;
}

static int team(const Step *S) {
    const int64_t threads = S->num_threads > 0 ? S->num_threads : 1;
    return (int)(threads < 64 ? threads : 64);
}

/* `parts` (a mask of PART_*) of layers [begin, end), in one region; layer 0 has no
 * residual stream yet (its input is the embedding). */
static int run_layers(const Model *M, const Step *S, int64_t begin, int64_t end, int parts,
                      int final) {
    const int status = check(M, S);
    if (status) return status;
    if (begin < 0 || end > M->num_layers || begin > end) return -1;
    const int threads = team(S);
    int64_t max_len = 0;
    for (int64_t t = 0; t < S->num_tokens; t++) max_len = S->lens[t] > max_len ? S->lens[t] : max_len;
    const int64_t splits = attention_splits(S->num_tokens, M->num_kv_heads, max_len, threads);
    const int64_t scratch = attention_partials(S->num_tokens, M->num_heads, M->head_dim, splits);
    const Split split = {splits, scratch ? malloc(scratch * sizeof(float)) : NULL};
    if (scratch && !split.partials) return -3;
#pragma omp parallel num_threads(threads)
    {
        int id = 0, n = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        for (int64_t i = begin; i < end; i++)
            run_parts(M, M->layers + i, S, &split, parts, i == 0, id, n);
        if (final) /* the last layer's barrier passed: its h is complete */
            add_norm(M, S, M->final_norm, M->final_eps, 0, id, n);
    }
    free(split.partials);
    return 0;
}

/* Parts of one layer (between them the caller adds its adapters' deltas). */
int layer_parts(const Model *M, int64_t layer, const Step *S, int parts) {
    return run_layers(M, S, layer, layer + 1, parts, 0);
}

/* Every part of every layer (a step without adapters); then, with M->final_norm, the
 * model's last norm: residual += h, normed = rms_norm(residual), the hidden states the LM
 * head reads. */
int all_layers(const Model *M, const Step *S) {
    return run_layers(M, S, 0, M->num_layers, ALL_PARTS, M->final_norm != NULL);
}
