"""The decoder stack for CPU steps of few tokens, through kernels/cpu_layer.c.

A step of up to 64 tokens (decode, speculative drafts, short prompts) runs each layer's
four parts as one C call each, the adapters' deltas added between them by the same
``add_lora`` the torch path uses; a step without adapters runs every layer in one call.
Larger steps (prefill) keep the torch path in models/llama.py, where the matmuls dominate.
Same semantics as that path; the sums run in the C kernels' order (last bits differ).

Measured on SmolLM2-135M, one request alone on 2 threads of an AMD EPYC: see README,
"Single stream".
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from loramux_engine.kernels import cpu_layer
from loramux_engine.layers.layernorm import RMSNorm
from loramux_engine.layers.linear import Linear
from loramux_engine.layers.quant import Int4Weight, Int8Weight
from loramux_engine.lora.ops import LoRABatch, add_lora
from loramux_engine.models.config import ModelArgs
from loramux_engine.utils import weight_arena
from loramux_engine.utils.context import get_context

if TYPE_CHECKING:
    from loramux_engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


def pack_weights(model: LlamaForCausalLM) -> None:
    """Each layer's plain fp32 projection weights into one huge-page mapping, in the order
    a step reads them (utils/weight_arena.py); the embedding, and the LM head tied to it,
    into another. Quantized weights stay as they are."""
    for layer in model.model.decoder_layers():
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        plain = [m for m in linears if m.quantized is None and m.weight.dtype == torch.float32]
        for m, w in zip(plain, weight_arena.pack([m.weight for m in plain]), strict=True):
            m.weight = w
    embed, head = model.model.embed_tokens, model.lm_head
    tied = head.quantized is None and head.weight.data_ptr() == embed.weight.data_ptr()
    if embed.weight.dtype == torch.float32:
        (embed.weight,) = weight_arena.pack([embed.weight])
        if tied:
            head.weight = embed.weight
    if not tied and head.quantized is None and head.weight.dtype == torch.float32:
        (head.weight,) = weight_arena.pack([head.weight])


def _matrix(linear: Linear) -> cpu_layer.Matrix | None:
    """The C description of a projection's weight; None when the kernel cannot take it."""
    bias = linear.bias.data_ptr() if linear.bias is not None else None
    b = linear.bias
    if b is not None and (
        not b.is_contiguous() or b.dtype != torch.float32 or b.numel() != linear.out_features
    ):
        return None
    q = linear.quantized
    m = cpu_layer.Matrix(out=linear.out_features, in_=linear.in_features, bias=bias)
    if q is None:
        w = linear.weight
        if w.dtype != torch.float32 or not w.is_contiguous() or w.shape != (m.out, m.in_):
            return None
        m.kind, m.w = cpu_layer.FP32, w.data_ptr()
    elif isinstance(q, Int8Weight) and q.kernel is not None:
        if q.scale.dtype != torch.float32 or m.in_ % 16:
            return None
        m.kind, m.w, m.scale = cpu_layer.INT8, q.qweight.data_ptr(), q.scale.data_ptr()
    elif isinstance(q, Int4Weight) and q.kernel is not None and q.minimum is not None:
        if m.in_ % 32 or q.group_size % 32 or m.in_ % q.group_size:
            return None
        m.kind, m.w, m.group = cpu_layer.INT4, q.packed.data_ptr(), q.group_size
        m.scale, m.minimum = q.scale.data_ptr(), q.minimum.data_ptr()
    else:
        return None
    return m


def _joined(matrices: list[cpu_layer.Matrix]) -> list[cpu_layer.Matrix]:
    """Plain weights lying back to back (pack_weights) without biases as one matrix, the
    others emptied (out 0): each thread then reads one stream, not one per weight."""
    first = matrices[0]
    end = first.w + first.out * first.in_ * 4
    for m in matrices[1:]:
        if m.kind != cpu_layer.FP32 or first.kind != cpu_layer.FP32 or m.bias or first.bias:
            return matrices
        if m.w != end or m.in_ != first.in_:
            return matrices
        end += m.out * m.in_ * 4
    joined = cpu_layer.Matrix(
        kind=cpu_layer.FP32, out=sum(m.out for m in matrices), in_=first.in_, w=first.w
    )
    return [joined] + [cpu_layer.Matrix(kind=cpu_layer.FP32, in_=first.in_)] * (len(matrices) - 1)


class CPUDecodePath:
    """Bound by the runner to ``LlamaModel.cpu_decode`` (CPU, fp32, the C kernels built)."""

    max_tokens = cpu_layer.MAX_TOKENS

    def __init__(
        self,
        library: ctypes.CDLL,
        args: ModelArgs,
        first: LlamaDecoderLayer,
        final_norm: RMSNorm | None,
        layers: ctypes.Array[cpu_layer.Layer],
        tensors: list[torch.Tensor],
    ) -> None:
        self.library = library
        self._layers = layers  # the structures' memory
        self._tensors = tensors  # every tensor the structures point into
        self.hidden, self.intermediate = args.hidden_size, args.intermediate_size
        self.heads, self.kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        attn, rotary = first.self_attn.attn, first.self_attn.rotary
        self.model = cpu_layer.Model(
            hidden=self.hidden,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            intermediate=self.intermediate,
            cache_rows=attn.k_cache.shape[1],
            block_shift=attn.block_size.bit_length() - 1,
            max_positions=rotary.cos_sin.shape[0],
            num_layers=len(layers),
            eps=first.input_layernorm.eps,
            scale=attn.scale,
            cos_sin=rotary.cos_sin.data_ptr(),
            layers=ctypes.cast(layers, ctypes.POINTER(cpu_layer.Layer)),
            final_norm=None if final_norm is None else final_norm.weight.data_ptr(),
            final_eps=0.0 if final_norm is None else final_norm.eps,
        )
        self.final_norm = final_norm is not None  # all_layers ends with the model's norm
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self._qkv_slices = (
            slice(0, q_width),
            slice(q_width, q_width + kv_width),
            slice(q_width + kv_width, q_width + 2 * kv_width),
        )
        # widths of h, residual, normed, qkv, attn, gate_up, act
        self._widths = (
            self.hidden, self.hidden, self.hidden, q_width + 2 * kv_width, q_width,
            2 * self.intermediate, self.intermediate,
        )  # fmt: skip

    @classmethod
    def build(cls, model: LlamaModel, args: ModelArgs) -> CPUDecodePath | None:
        """The path for ``model`` as bound (plain or quantized weights, the KV cache and
        the CPU attention kernel in place); None where the kernel cannot take it."""
        library = cpu_layer.load()
        if library is None or args.num_layers == 0:
            return None
        structs = []
        layers = model.decoder_layers()
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
            parts += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            matrices = [m for m in (_matrix(p) for p in parts) if m is not None]
            caches = attn.attn.k_cache, attn.attn.v_cache
            norms = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            if (
                len(matrices) != len(parts)
                or attn.attn.decode_kernel is None
                or not all(c.is_contiguous() and c.dtype == torch.float32 for c in caches)
                or not all(n.is_contiguous() and n.dtype == torch.float32 for n in norms)
            ):
                return None
            q, k, v, o, gate, up, down = matrices
            structs.append(
                cpu_layer.Layer(
                    input_norm=norms[0].data_ptr(),
                    post_norm=norms[1].data_ptr(),
                    qkv=(cpu_layer.Matrix * 3)(*_joined([q, k, v])),
                    o=o,
                    gate_up=(cpu_layer.Matrix * 2)(*_joined([gate, up])),
                    down=down,
                    k_cache=caches[0].data_ptr(),
                    v_cache=caches[1].data_ptr(),
                )
            )
        # every tensor the structures point into, held as long as they are
        tensors = [t for m in model.modules() for t in (*m.parameters(False), *m.buffers(False))]
        for layer in layers:
            tensors += [layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache]
            for module in layer.modules():
                weight = module.quantized if isinstance(module, Linear) else None
                if isinstance(weight, Int8Weight):
                    tensors += [weight.qweight, weight.scale]
                elif isinstance(weight, Int4Weight):
                    tensors += [weight.packed, weight.scale]
                    tensors += [] if weight.minimum is None else [weight.minimum]
        structs_array = (cpu_layer.Layer * len(structs))(*structs)
        norm = model.norm.weight
        final = norm.is_contiguous() and norm.dtype == torch.float32
        final = final and norm.shape == (args.hidden_size,)
        tensors.append(layers[0].self_attn.rotary.cos_sin)
        return cls(library, args, layers[0], model.norm if final else None, structs_array, tensors)

    def forward(
        self, model: LlamaModel, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        # input_ids, positions: [num_tokens], at most max_tokens -> hidden [num_tokens, hidden]
        n = input_ids.shape[0]
        context = get_context()
        indices = [positions, context.cache_positions, context.token_table_starts]
        indices.append(context.token_kv_lens)
        if not all(
            t.dtype == torch.int64 and t.is_contiguous() and t.numel() == n for t in indices
        ):
            raise ValueError("cpu_decode: positions and the context's rows must be n int64s")
        block_ids = context.block_ids
        if block_ids.dtype != torch.int64 or not block_ids.is_contiguous():
            raise ValueError("cpu_decode: block_ids must be contiguous int64")
        buffers = torch.empty(n * sum(self._widths), dtype=torch.float32).split(
            [n * w for w in self._widths]
        )
        h, residual, normed, qkv, attn, gate_up, act = (
            b.view(n, w) for b, w in zip(buffers, self._widths, strict=True)
        )
        torch.index_select(model.embed_tokens.weight.detach(), 0, input_ids, out=h)
        rows = [positions, context.cache_positions, block_ids, context.token_table_starts]
        rows.append(context.token_kv_lens)
        outs = (h, residual, normed, qkv, attn, gate_up, act)
        step = cpu_layer.Step(
            n,
            torch.get_num_threads(),
            block_ids.numel(),
            *(t.data_ptr() for t in rows),
            *(t.data_ptr() for t in outs),
        )
        batch = context.lora_batch
        if batch is None or batch.empty:
            cpu_layer.check(self.library.all_layers(ctypes.byref(self.model), ctypes.byref(step)))
            if self.final_norm:
                return normed
        else:
            for i, layer in enumerate(model.decoder_layers()):
                self._layer(i, layer, step, batch, (h, normed, qkv, attn, gate_up, act))
        return model.norm.add_and_norm(h, residual)[0]

    def _layer(
        self,
        index: int,
        layer: LlamaDecoderLayer,
        step: cpu_layer.Step,
        batch: LoRABatch,
        views: tuple[torch.Tensor, ...],
    ) -> None:
        """One layer in its four parts, each projection's adapter deltas added after its
        part (the same ``add_lora`` as Linear.forward)."""
        h, normed, qkv, attn, gate_up, act = views
        attn_proj, mlp = layer.self_attn, layer.mlp
        run = self.library.layer_parts
        model, step_ref = ctypes.byref(self.model), ctypes.byref(step)
        cpu_layer.check(run(model, index, step_ref, cpu_layer.PART_QKV))
        for proj, cols in zip(
            (attn_proj.q_proj, attn_proj.k_proj, attn_proj.v_proj), self._qkv_slices, strict=True
        ):
            if proj.lora_stack is not None:
                add_lora(qkv[:, cols], normed, proj.lora_stack, batch)
        cpu_layer.check(run(model, index, step_ref, cpu_layer.PART_ATTEND))
        if attn_proj.o_proj.lora_stack is not None:
            add_lora(h, attn, attn_proj.o_proj.lora_stack, batch)
        cpu_layer.check(run(model, index, step_ref, cpu_layer.PART_MLP_IN))
        i = self.intermediate
        for proj, cols in ((mlp.gate_proj, slice(0, i)), (mlp.up_proj, slice(i, 2 * i))):
            if proj.lora_stack is not None:
                add_lora(gate_up[:, cols], normed, proj.lora_stack, batch)
        cpu_layer.check(run(model, index, step_ref, cpu_layer.PART_MLP_OUT))
        if mlp.down_proj.lora_stack is not None:
            add_lora(h, act, mlp.down_proj.lora_stack, batch)
