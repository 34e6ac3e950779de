/* Attention for CPU over the paged KV cache: each query token against the first len_b
 * keys of its sequence, read through the sequence's block table; fp32, grouped-query
 * heads sharing each key/value row. A decode token's keys are its sequence so far; a
 * prompt token's are the prompt up to and including itself (causal).
 *
 * Semantics: for each query b and head h (kv head h / group), with the sequence's
 * block table T_b = block_ids[table_starts[b]:] and row(l) = T_b[l / bs] * bs + l % bs,
 *   out[b, h] = softmax(scale * K[row(0 .. len_b - 1)] @ q[b, h]) @ V[...]
 * Shape: q, out: [num_queries, num_heads, head_dim];
 *        k_cache, v_cache: [num_kv_heads, cache_rows, head_dim] (row-major, contiguous),
 *        cache_rows = num_blocks * bs, bs = 1 << block_shift;
 *        block_ids: the block tables, concatenated (int64);
 *        table_starts, lens: [num_queries] (int64); head_dim a multiple of 16, at most 256.
 *
 * One pass over the keys with an online softmax (flash-decoding), in work items of a
 * token, a kv head and a span of its keys (paged_attention.h): each key and value row is
 * read once and used by every query head of its group, so the kernel runs at about the
 * speed of reading the cache. Items are spread over torch's OpenMP threads
 * (kernels/build.py): the library links libgomp.so.1, which the loader resolves to the
 * copy torch already loaded, so the kernel runs on torch's own worker threads instead of
 * competing with them while they spin after a matmul (measured: twice the time with a
 * pthread pool of our own).
 */
#include <stdlib.h>

#include "paged_attention.h"

int decode_attention(const float *q, const float *k_cache, const float *v_cache, float *out,
                     const int64_t *block_ids, const int64_t *table_starts, const int64_t *lens,
                     int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim, int64_t cache_rows, int64_t block_shift, float scale,
                     int num_threads) {
    if (num_heads % num_kv_heads || num_heads / num_kv_heads > MAX_GROUP) return -1;
    if (head_dim % 16 || head_dim / 16 > MAX_CHUNKS) return -1;
    if (block_shift < 0 || block_shift > 30) return -1;
    const int threads = num_threads > 0 ? num_threads : 1;
    int64_t max_len = 0;
    for (int64_t b = 0; b < num_seqs; b++) max_len = lens[b] > max_len ? lens[b] : max_len;
    Args args = {q, k_cache, v_cache, out, block_ids, table_starts, lens,
                 num_heads * head_dim, num_seqs, num_heads, num_kv_heads, head_dim,
                 cache_rows, block_shift, scale,
                 attention_splits(num_seqs, num_kv_heads, max_len, threads), NULL};
    const int64_t scratch = attention_partials(num_seqs, num_heads, head_dim, args.splits);
    if (scratch && !(args.partials = malloc(scratch * sizeof(float)))) return -3;
    const int64_t items = attention_items(&args), merges = merge_items(&args);
#pragma omp parallel num_threads(threads)
    {
        /* small dynamic chunks: a prompt's later tokens attend to more keys than its first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) attend_item(&args, i);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < merges; i++) merge_item(&args, i);
    }
    free(args.partials);
    return 0;
}
