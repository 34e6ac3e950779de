"""LLaMA-family decoder (Llama, Mistral, Qwen2) over a flattened batch of tokens.

Module names mirror the Hugging Face checkpoints so weights load by name.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from loramux_engine.layers.activation import silu_and_mul
from loramux_engine.layers.attention import Attention
from loramux_engine.layers.layernorm import RMSNorm
from loramux_engine.layers.linear import Linear
from loramux_engine.layers.rotary_embedding import RotaryEmbedding
from loramux_engine.models.config import ModelArgs
from loramux_engine.models.cpu_decode import CPUDecodePath


class LlamaAttention(nn.Module):
    rotary: RotaryEmbedding

    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        h, q_out = args.hidden_size, args.num_heads * args.head_dim
        kv_out = args.num_kv_heads * args.head_dim
        self.q_proj = Linear(h, q_out, args.qkv_bias, "q_proj")
        self.k_proj = Linear(h, kv_out, args.qkv_bias, "k_proj")
        self.v_proj = Linear(h, kv_out, args.qkv_bias, "v_proj")
        self.o_proj = Linear(q_out, h, args.o_bias, "o_proj")
        self.attn = Attention(args.num_heads, args.num_kv_heads, args.head_dim)
        # A plain attribute, not a submodule: one table shared by every layer.
        self.__dict__["rotary"] = rotary
        self.head_dim = args.head_dim

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # positions: [num_tokens]; x: [num_tokens, hidden]
        n = x.shape[0]
        q = self.q_proj(x).view(n, -1, self.head_dim)
        k = self.k_proj(x).view(n, -1, self.head_dim)
        v = self.v_proj(x).view(n, -1, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_proj = Linear(h, i, args.mlp_bias, "gate_proj")
        self.up_proj = Linear(h, i, args.mlp_bias, "up_proj")
        self.down_proj = Linear(i, h, args.mlp_bias, "down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = LlamaAttention(args, rotary)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = LlamaMLP(args)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: the previous block's output, added to the residual stream here (with the norm,
        # one kernel on CUDA); -> (this layer's MLP output, the residual stream before it)
        if residual is None:  # the first layer: x is the embedding
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, rotary) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # the C path for CPU steps of few tokens (models/cpu_decode.py), bound by the runner
        self.cpu_decode: CPUDecodePath | None = None

    def decoder_layers(self) -> list[LlamaDecoderLayer]:
        return [cast(LlamaDecoderLayer, layer) for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        fast = self.cpu_decode
        if fast is not None and input_ids.shape[0] <= fast.max_tokens:
            return fast.forward(self, input_ids, positions)
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x) if residual is None else self.norm.add_and_norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args, rotary)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, False, "lm_head")

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_sampled, hidden] -> [num_sampled, vocab]
        return self.lm_head(hidden)
