"""A small Llama-style decoder (RMSNorm, causal attention, SwiGLU MLP: 7 linears a layer) whose
linears are plain ``nn.Linear`` or hand-written dequantize -> matmul layers. For end-to-end tests,
the demo and benchmarks."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .modules import DequantLinear, DequantSpec

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderConfig:
    layers: int = 2
    dim: int = 64
    heads: int = 4
    hidden: int = 128


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d, h = cfg.dim, cfg.hidden
        self.heads = cfg.heads
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        y = self.attn_norm(x)
        q, k, v = (p(y).view(b, t, self.heads, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + self.o_proj((att @ v).transpose(1, 2).reshape(b, t, d))
        y = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class TinyDecoder(nn.Module):
    """``x [B, T, dim]`` (already embedded) -> ``[B, T, dim]``."""

    def __init__(self, cfg: DecoderConfig = DecoderConfig(), seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def with_dequant_linears(model: nn.Module, spec_for) -> nn.Module:
    """A copy of ``model`` whose linears are :class:`DequantLinear` quantized from the float weights;
    ``spec_for(name) -> DequantSpec | None`` picks the form (None keeps the float layer)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            spec = spec_for(name)
            if spec is None:
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, DequantLinear.from_float(module, spec))
    return model


INT8 = DequantSpec(weight_form="scale", bits=8)
INT4_GROUPED = DequantSpec(weight_form="zero_then_scale", bits=4, group=32, signed=False)
