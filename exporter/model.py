"""A compact, export-friendly PyTorch GPTBigCode (GPT-2 with multi-query attention and a merged KV cache).

The math follows the original GPTBigCode implementation (bigcode-project / transformers before 4.54):
one `key_value` tensor per layer holds keys and values side by side on the last axis, softmax runs in
fp32 when `attention_softmax_in_fp32`, and the mask is applied with `where` so that a fully masked row
(a left-padding query position) stays finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from starcast.contract.config import GPTBigCodeConfig


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu_new":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if name == "gelu_fast":
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    if name == "gelu":
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    raise ValueError(name)


class Attention(nn.Module):
    def __init__(self, config: GPTBigCodeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        kv_dim = config.kv_heads * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def softmax(self, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Scaled, masked softmax, upcast to fp32 as GPTBigCode does (scores in the input dtype)."""
        cfg, dtype = self.config, scores.dtype
        softmax_dtype = torch.float32 if cfg.attention_softmax_in_fp32 else dtype
        upcast = softmax_dtype != dtype
        # scale_attention_softmax_in_fp32 divides by (layer+1) before the fp16 product and multiplies back in fp32,
        # which keeps deep layers' scores from overflowing fp16; in fp32 it changes nothing.
        unscale = float(self.layer_idx + 1) if cfg.scale_attention_softmax_in_fp32 and upcast else 1.0
        scale = (cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0) / unscale
        scores = scores * scale
        if upcast:
            scores = scores.to(softmax_dtype)
            if unscale != 1.0:
                scores = scores * unscale
        scores = torch.where(allowed, scores, torch.finfo(softmax_dtype).min)
        return torch.softmax(scores, dim=-1).to(dtype)

    def forward(
        self, x: torch.Tensor, layer_past: torch.Tensor, allowed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        # Sizes known from the config are Python ints, so the traced graph has constant Split sizes and reshapes.
        d, nh, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
        b, s = x.shape[0], x.shape[1]
        qkv = self.c_attn(x)  # (b, s, d + 2*kv_dim)
        if cfg.multi_query:
            query, key_value = qkv.split((d, 2 * hd), dim=2)  # (b, s, d), (b, s, 2*hd)
            key_value = torch.cat((layer_past, key_value), dim=1)  # (b, t, 2*hd)
            key, value = key_value.split((hd, hd), dim=-1)  # (b, t, hd) each
            # All query heads share one key head: fold heads into the rows of one batched MatMul.
            query = query.reshape(b, -1, hd)  # (b, s*nh, hd)
            scores = torch.matmul(query, key.transpose(1, 2))  # (b, s*nh, t)
            scores = scores.view(b, s, nh, -1)  # (b, s, nh, t)
            probs = self.softmax(scores, allowed.unsqueeze(2))  # allowed (b, s, 1, t)
            out = torch.matmul(probs.view(b, s * nh, -1), value)  # (b, s*nh, hd)
            out = out.view(b, s, d)
        else:
            qkv = qkv.view(b, s, nh, 3 * hd).transpose(1, 2)  # (b, nh, s, 3*hd)
            query, key_value = qkv.split((hd, 2 * hd), dim=3)  # (b, nh, s, hd), (b, nh, s, 2*hd)
            key_value = torch.cat((layer_past, key_value), dim=2)  # (b, nh, t, 2*hd)
            key, value = key_value.split((hd, hd), dim=-1)
            scores = torch.matmul(query, key.transpose(2, 3))  # (b, nh, s, t)
            probs = self.softmax(scores, allowed.unsqueeze(1))  # allowed (b, 1, s, t)
            out = torch.matmul(probs, value)  # (b, nh, s, hd)
            out = out.transpose(1, 2).reshape(b, s, d)
        return self.c_proj(out), key_value


class MLP(nn.Module):
    def __init__(self, config: GPTBigCodeConfig):
        super().__init__()
        self.activation_function = config.activation_function
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(activation(self.activation_function, self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTBigCodeConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, layer_past: torch.Tensor, allowed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn_out, present = self.attn(self.ln_1(x), layer_past, allowed)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, present


class Transformer(nn.Module):
    def __init__(self, config: GPTBigCodeConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPTBigCode(nn.Module):
    """`forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`.

    input_ids, position_ids: int64 (batch, seq); attention_mask: int64 (batch, past + seq), 0 marks padding;
    past[i]: layer i's merged key_value, (batch, past, 2*head_dim) with multi-query,
    (batch, n_head, past, 2*head_dim) otherwise. Parameter names match Hugging Face's checkpoints.
    """

    def __init__(self, config: GPTBigCodeConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        tr = self.transformer
        seq, total = input_ids.shape[1], attention_mask.shape[1]
        # Query i sits at absolute index (total - seq + i); it may see key j when j <= that index and j is not padding.
        key_index = torch.arange(total, device=input_ids.device)  # (t,)
        query_index = key_index[total - seq :]  # (s,)
        causal = key_index.unsqueeze(0) <= query_index.unsqueeze(1)  # (s, t)
        allowed = causal.unsqueeze(0) & attention_mask.unsqueeze(1).bool()  # (b, s, t)

        x = tr.wte(input_ids) + tr.wpe(position_ids)  # (b, s, d)
        presents = []
        for block, layer_past in zip(tr.h, past, strict=True):
            x, present = block(x, layer_past, allowed)
            presents.append(present)
        # A 2-D input makes the exporter emit Gemm(transB=1) on the stored (vocab, d) matrix; a 3-D one would fold
        # in a transposed copy, storing a tied embedding twice.
        b, s, d = x.shape
        logits = self.lm_head(tr.ln_f(x).reshape(b * s, d)).view(b, s, self.config.vocab_size)
        return (logits, *presents)

    def empty_past(self, batch: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        dtype = dtype or self.lm_head.weight.dtype
        shape = self.config.cache_shape(batch, 0)
        return [torch.zeros(shape, dtype=dtype) for _ in range(self.config.n_layer)]
