"""A tiny GPT decoder: fused qkv, causal mask buffer, explicit attention, tied LM head."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int

__all__ = ["CausalSelfAttention", "GPTBlock", "GPT", "gpt"]


class CausalSelfAttention(nn.Module):
    """One Linear(d, 3d) for q, k, v; masked softmax(q k^T / sqrt(hd)) v; output projection."""

    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.n_embd, self.n_head = n_embd, n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        mask = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        self.register_buffer("bias", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] -> [B, T, d]."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, h, T, hd]
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPTBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)) with mlp = Linear(d, 4d) -> GELU -> Linear(4d, d)."""

    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """Token ids [B, T] (T <= block_size) -> next-token logits [B, T, vocab_size].

    ``lm_head.weight`` is the same Parameter as ``wte.weight`` (weight tying).
    """

    def __init__(self, vocab_size: int = 50, block_size: int = 16, n_embd: int = 32,
                 n_head: int = 4, n_layer: int = 2) -> None:
        super().__init__()
        self.vocab_size = positive_int("gpt", "vocab_size", vocab_size)
        self.block_size = positive_int("gpt", "block_size", block_size)
        n_embd = positive_int("gpt", "n_embd", n_embd)
        n_head = positive_int("gpt", "n_head", n_head)
        n_layer = positive_int("gpt", "n_layer", n_layer)
        if n_embd % n_head != 0:
            raise ConfigError(f"gpt: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([GPTBlock(n_embd, n_head, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: LongTensor [B, T] -> logits [B, T, vocab_size]."""
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt(vocab_size: int = 50, block_size: int = 16, n_embd: int = 32, n_head: int = 4,
        n_layer: int = 2) -> GPT:
    """Build a tiny GPT: LongTensor [B, T] -> logits [B, T, vocab_size]."""
    return GPT(vocab_size, block_size, n_embd, n_head, n_layer)
