"""The Llama family (Llama 2/3, Mistral, Qwen2) over a flat batch of tokens and a paged KV cache.

Module names match Hugging Face checkpoints, but projections reading the same input are merged
into one weight (q/k/v, gate/up: one GEMM each) and weights are stored [in, out];
`checkpoint_tensors` gives every checkpoint tensor as a view into them, to load by name. Every
layer takes the flattened tokens of the whole step ([num_tokens, hidden]); attention reads
`AttentionMetadata`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attention.backend import AttentionBackend, AttentionMetadata
from engine.config import ModelConfig
from engine.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Module):
    """x @ weight (+ bias), the weight stored [in_features, out_features] (nn.Linear's
    transpose): on CPU, MKL's GEMM over a decode batch's few rows is up to twice as fast so."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, in_features]
        if self.bias is None:
            return torch.mm(x, self.weight)
        return torch.addmm(self.bias, x, self.weight)

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        views = {f"{prefix}.weight": self.weight.t()}
        if self.bias is not None:
            views[f"{prefix}.bias"] = self.bias
        return views


class MergedLinear(Linear):
    """Checkpoint projections of one input stacked into one weight, computed as one GEMM.
    `parts`: their names in the checkpoint (beside this module) and output sizes, in order."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = parts

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        parent = prefix.rsplit(".", 1)[0]
        views, start = {}, 0
        for part, size in self.parts.items():
            views[f"{parent}.{part}.weight"] = self.weight[:, start : start + size].t()
            if self.bias is not None:
                views[f"{parent}.{part}.bias"] = self.bias[start : start + size]
            start += size
        return views


class Embedding(nn.Module):
    """Token embeddings, stored [hidden, vocab] when tied to the lm_head so that the one tensor
    is also the lm_head's [in, out] weight (a lookup gathers columns)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied: bool) -> None:
        super().__init__()
        self.tied = tied
        shape = (hidden_size, vocab_size) if tied else (vocab_size, hidden_size)
        self.weight = nn.Parameter(torch.empty(shape))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        if self.tied:
            return self.weight.index_select(1, input_ids).t().contiguous()
        return F.embedding(input_ids, self.weight)

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": self.weight.t() if self.tied else self.weight}


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(
            cfg.hidden_size,
            {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
            bias=cfg.qkv_bias,
        )
        self.o_proj = Linear(q_size, cfg.hidden_size)

    def qkv(
        self, hidden: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = self.qkv_proj(hidden).view(hidden.shape[0], -1, self.head_dim)
        q, k, v = heads.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        q, k = rope(positions, q, k)
        return q, k, v

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        backend: AttentionBackend,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.qkv(hidden, positions, rope)
        remote = meta.remote
        if remote is None:
            out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta)
            return self.o_proj(out.reshape(hidden.shape[0], -1))
        # Offloaded rows go out first so their executors work while local attention runs.
        n = remote.num_local_tokens
        remote.send(self.layer_idx, q[n:], k[n:], v[n:])
        out = torch.empty_like(q)
        if n:
            out[:n] = backend.forward(q[:n], k[:n], v[:n], kv_cache[0], kv_cache[1], meta)
        out[n:] = remote.receive(self.layer_idx)
        return self.o_proj(out.reshape(hidden.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(
            cfg.hidden_size, {"gate_proj": size, "up_proj": size}, bias=False
        )
        self.down_proj = Linear(size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden, positions, rope, backend, kv_cache, meta) -> torch.Tensor:
        hidden = hidden + self.self_attn(
            self.input_layernorm(hidden), positions, rope, backend, kv_cache, meta
        )
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.tie_word_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # hidden states [num_tokens, hidden]
        hidden = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            hidden = layer(hidden, positions, self.rope, backend, kv_caches[i], meta)
        return self.model.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def checkpoint_tensors(model: nn.Module, remove_duplicate: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint of `model`, by its checkpoint name, as a view
    into our parameters (transposed; a merged projection's part is a slice), in the order the
    unmerged model registers them. Tied weights appear once unless `remove_duplicate` is off."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        params = [p for _, p in module.named_parameters(recurse=False)]
        if not params or (remove_duplicate and all(id(p) in seen for p in params)):
            continue
        seen.update(id(p) for p in params)
        if isinstance(module, (Linear, Embedding)):
            tensors.update(module.checkpoint_views(prefix))
        else:
            tensors.update((f"{prefix}.{n}", p) for n, p in module.named_parameters(recurse=False))
    return tensors
