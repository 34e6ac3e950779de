"""Owns the model and the paged KV cache; runs one batch of scheduled tokens."""

from __future__ import annotations

import logging

import torch

from loramux_engine.engine.cuda_graphs import DecodeGraphs
from loramux_engine.engine.sequence import Sequence
from loramux_engine.kernels import cpu_fused, decode_attention, gemv
from loramux_engine.layers.attention import attention_backend
from loramux_engine.layers.layernorm import RMSNorm
from loramux_engine.layers.linear import Linear, onednn_available
from loramux_engine.layers.rotary_embedding import RotaryEmbedding
from loramux_engine.layers.sampler import SampledToken, sample
from loramux_engine.lora.adapter import LoRAAdapter
from loramux_engine.lora.ops import LoRABatch
from loramux_engine.lora.pool import LoRASlotPool
from loramux_engine.models.config import ModelArgs
from loramux_engine.models.cpu_decode import CPUDecodePath, pack_weights
from loramux_engine.utils.allocator import keep_large_blocks
from loramux_engine.utils.context import AttentionSegment, Context, reset_context, set_context
from loramux_engine.utils.loader import load_model

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model_dir: str,
        args: ModelArgs,
        max_model_len: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        cpu_decode_kernel: bool = True,
        cpu_onednn_matmul: bool = True,
        cpu_gemv_kernel: bool = True,
        merged_adapter: LoRAAdapter | None = None,
        max_num_seqs: int = 64,
        cuda_graphs: bool = False,
        quantization: str = "none",
        quantization_group_size: int = 32,
        quantize_lm_head: bool = True,
    ) -> None:
        self.device = device
        self.dtype = dtype
        if device.type == "cpu":
            keep_large_blocks()
        self.model = load_model(
            model_dir,
            args,
            max_model_len,
            dtype,
            device,
            merged_adapter,
            quantization,
            quantization_group_size,
            quantize_lm_head,
        )
        cpu_fp32 = device.type == "cpu" and dtype == torch.float32
        self.onednn_matmul = cpu_onednn_matmul and cpu_fp32 and onednn_available()
        # steps of up to 64 tokens through kernels/gemv.c over the plain weights (linear.py)
        gemv_kernel = gemv.load() if cpu_gemv_kernel and cpu_fp32 else None
        self.gemv_matmul = gemv_kernel is not None
        if self.onednn_matmul or gemv_kernel is not None:
            for module in self.model.modules():
                if isinstance(module, Linear) and gemv_kernel is not None:
                    module.use_gemv(gemv_kernel, self.onednn_matmul)
                elif isinstance(module, Linear):
                    module.pack_for_onednn()
        # RMSNorm and RoPE as one C call each (kernels/cpu_fused.c), with the same switch
        fused = cpu_fused.load() if cpu_gemv_kernel and cpu_fp32 else None
        for module in self.model.modules():
            rotary = getattr(module, "rotary", None)  # one table shared by the layers
            if isinstance(module, RMSNorm):
                module.cpu_kernel = fused
            elif isinstance(rotary, RotaryEmbedding):
                rotary.cpu_kernel = fused
        # kv_cache: [num_layers, 2, kv_heads, (num_blocks + 1) * block_size, head_dim],
        # allocated once; block b holds rows [b * block_size, (b + 1) * block_size). Block
        # num_blocks is scratch, never handed out: padded rows of a CUDA graph write there.
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_cache = torch.zeros(
            args.num_layers,
            2,
            args.num_kv_heads,
            (num_blocks + 1) * block_size,
            args.head_dim,
            dtype=dtype,
            device=device,
        )
        kernel = None
        if (
            cpu_decode_kernel
            and cpu_fp32
            and decode_attention.supports(args.num_heads, args.num_kv_heads, args.head_dim)
        ):
            kernel = decode_attention.load()
        self.attention_backend = attention_backend(device.type, kernel is not None)
        self.cpu_kernel = self.attention_backend == "cpu_kernel"
        triton_kernel = None
        if self.attention_backend == "triton":
            from loramux_engine.kernels import triton_attention

            triton_kernel = triton_attention.paged_attention
        logger.info("attention backend: %s (%s, %s)", self.attention_backend, device, dtype)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache = self.kv_cache[i, 0]
            attn.v_cache = self.kv_cache[i, 1]
            attn.block_size = block_size
            attn.decode_kernel = kernel
            attn.triton_kernel = triton_kernel
        # steps of few tokens in one to four C calls per layer (models/cpu_decode.py)
        self.cpu_decode = None
        if gemv_kernel is not None and fused is not None and kernel is not None:
            pack_weights(self.model)
            self.cpu_decode = CPUDecodePath.build(self.model.model, args)
            self.model.model.cpu_decode = self.cpu_decode
        self.decode_graphs: DecodeGraphs | None = None
        if cuda_graphs and self.attention_backend == "triton":  # on CUDA only
            self.decode_graphs = self.make_decode_graphs(max_num_seqs, capture=True)
            self.decode_graphs.capture_all(lora=False)
        logger.info("CUDA graphs for decode: %s", "on" if self.decode_graphs else "off")

    def make_decode_graphs(self, max_num_seqs: int, capture: bool) -> DecodeGraphs:
        """Decode steps over static buffers (engine/cuda_graphs.py); ``capture=False`` runs
        them eagerly, which works with the CPU kernel too (tests)."""
        if self.attention_backend == "sdpa":
            raise ValueError("static decode steps need an attention kernel over block tables")
        return DecodeGraphs(
            self.model,
            self.block_size,
            self.max_blocks_per_seq,
            self.scratch_block,
            max_num_seqs,
            self.device,
            self.dtype,
            capture,
            triton_lora=self.attention_backend == "triton",
        )

    def attach_lora(self, pool: LoRASlotPool) -> None:
        """Point every adaptable projection at its stack in the pool (done once, at build)."""
        for name, module in self.model.named_modules():
            if isinstance(module, Linear) and module.projection in pool.projections:
                layer = int(name.split(".")[2])  # model.layers.<i>.<self_attn|mlp>.<proj>
                module.lora_stack = pool.stack(layer, module.projection)
        if self.decode_graphs is not None:
            self.decode_graphs.capture_all(lora=True)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _rows(self, table: list[int], end: int) -> torch.Tensor:
        """The cache rows of a sequence's keys [0, end), through its block table."""
        blocks = torch.tensor(table, dtype=torch.long)
        rows = blocks[:, None] * self.block_size + torch.arange(self.block_size)
        return rows.view(-1)[:end].to(self.device)

    def _prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        cache_positions: list[int] = []
        segments: list[AttentionSegment] = []
        slot_ids: list[int] = []
        sample_rows: list[int] = []
        block_ids: list[int] = []
        token_table_starts: list[int] = []
        token_kv_lens: list[int] = []
        for seq in seqs:
            start, n = seq.num_computed_tokens, seq.num_scheduled_tokens
            end = start + n
            offset = len(input_ids)
            table = seq.block_table
            input_ids.extend(seq.scheduled_token_ids)  # with any speculative drafts
            positions.extend(range(start, end))
            cache_positions.extend([table[p // bs] * bs + p % bs for p in range(start, end)])
            slot_ids.extend([seq.adapter_slot] * n)
            sample_rows.extend(range(offset + n - seq.num_sampled_rows, offset + n))
            if self.attention_backend != "sdpa":  # each token attends to its own prefix
                token_table_starts.extend([len(block_ids)] * n)
                block_ids.extend(table)
                token_kv_lens.extend(range(start + 1, end + 1))
            else:
                segments.append(AttentionSegment(offset, offset + n, self._rows(table, end)))
        set_context(
            Context(
                cache_positions=self._tensor(cache_positions),
                segments=segments,
                block_ids=self._tensor(block_ids),
                token_table_starts=self._tensor(token_table_starts),
                token_kv_lens=self._tensor(token_kv_lens),
                lora_batch=(
                    LoRABatch.build(slot_ids, self.device, dtype=self.dtype)
                    if any(slot_ids)
                    else None
                ),
            )
        )
        return self._tensor(input_ids), self._tensor(positions), sample_rows

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> list[SampledToken | None]:
        """One forward over the scheduled tokens; a token for each sequence that reached its end.

        A row whose logits are not finite gets ``SampledToken.failed`` instead; anything
        that raises is the caller's to isolate (``step_isolation``).
        """
        graphs = self.decode_graphs
        if graphs is not None and graphs.accepts(seqs):  # one token per sequence, all sampled
            logits = graphs.run(seqs)
            if logits is not None:
                tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
                return list[SampledToken | None](tokens)
        ends = [s.num_sampled_rows > 0 for s in seqs]
        input_ids, positions, sample_rows = self._prepare(seqs)
        try:
            hidden = self.model(input_ids, positions)
        finally:
            reset_context()
        if not sample_rows:
            return [None] * len(seqs)
        sampling = [s for s, end in zip(seqs, ends, strict=True) if end]
        logits = self.model.compute_logits(hidden[sample_rows])
        sampled = iter(
            sample(
                logits,
                [s.params for s in sampling],
                [s.generator for s in sampling],
                [s.draft_token_ids for s in sampling],
            )
        )
        return [next(sampled) if end else None for end in ends]

    @torch.inference_mode()
    def logits(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [num_scheduled_tokens, vocab] of every scheduled token (prompt scoring)."""
        input_ids, positions, _ = self._prepare(seqs)
        try:
            hidden = self.model(input_ids, positions)
        finally:
            reset_context()
        return self.model.compute_logits(hidden).float()
