"""Hand-written dequantize -> matmul modules in every form the pass rewrites, and near misses it must
leave alone. Used by :mod:`xqpass.testing.strategies` and docs/patterns.md; plain torch code, the way a
user writes it (the forms are in the ``forward`` methods below, not generated).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FORMS = ("scale", "zero_then_scale", "scale_then_float_zero", "pt2e_per_channel", "pt2e_per_tensor")
PRODUCT_FORMS = ("linear", "matmul_t", "matmul_T", "transpose", "bmm", "addmm", "scale_after", "seed_layout",
                 "w8a8_int_mm", "w8a8_matmul")
SCALE_SPELLINGS = ("index", "unsqueeze", "view", "column")
NEAR_MISSES = ("wrong_axis", "float_weight", "scale_from_x", "interleaved_groups", "per_tensor_activation")


@dataclass(frozen=True)
class DequantSpec:
    """One dequant -> matmul layer.

    ``bits``: 8 or 4 (4: two values a byte, unpacked in ``forward``); ``group``: None (per-channel) or
    the group size along K; ``signed``: int8 storage (else uint8 with a zero point); ``bias``: None,
    "inside" (F.linear / addmm bias) or "after"; ``near_miss``: a form the pass must not rewrite.
    """

    weight_form: str = "scale"
    product_form: str = "linear"
    bits: int = 8
    group: int | None = None
    signed: bool = True
    scale_spelling: str = "index"
    bias: str | None = None
    near_miss: str | None = None

    @property
    def rewritable(self) -> bool:
        return self.near_miss is None


class DequantLinear(nn.Module):
    """A linear layer whose int weight is dequantized in ``forward`` the way ``spec`` says."""

    def __init__(self, spec: DequantSpec, in_features: int, out_features: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec, self.k, self.n, self.dtype = spec, in_features, out_features, dtype
        g = torch.Generator().manual_seed(seed)
        n, k = out_features, in_features
        groups = 1 if spec.group is None else k // spec.group
        if spec.bits == 4:
            lo, hi = (-8, 7) if spec.signed else (0, 15)
        else:
            lo, hi = (-128, 127) if spec.signed else (0, 255)
        values = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int16)
        storage = torch.int8 if spec.signed else torch.uint8
        if spec.bits == 4:  # low nibble = even index, as the op packs
            nib = values & 0xF
            byte = nib[:, 0::2] | (nib[:, 1::2] << 4)
            packed = torch.where(byte > 127, byte - 256, byte) if spec.signed else byte
            self.register_buffer("qweight", packed.to(storage))
        elif spec.product_form == "seed_layout":  # the seed's blockwise [K/B, B, N]
            self.register_buffer("qweight", values.t().reshape(groups, k // groups, n).to(storage).contiguous())
        else:
            self.register_buffer("qweight", values.to(storage))
        if spec.near_miss == "float_weight":
            self.qweight = self.qweight.to(torch.float32)
        span = (hi - lo) or 1
        scale_shape = (n,) if spec.group is None else (n, groups)
        self.register_buffer("scale", ((torch.rand(scale_shape, generator=g) + 0.5) / span).to(dtype))
        if spec.scale_spelling == "column" and spec.group is None:
            self.scale = self.scale[:, None].contiguous()
        self.register_buffer("scale_k", ((torch.rand(k, generator=g) + 0.5) / span).to(dtype))
        mid = (lo + hi) / 2
        if spec.weight_form == "zero_then_scale":
            zero = torch.randint(int(mid) - 3, int(mid) + 4, scale_shape, generator=g)
            self.register_buffer("zero", zero.to(torch.int64 if spec.bits == 4 else storage))
        elif spec.weight_form in ("scale_then_float_zero",):
            self.register_buffer("zero", (self.scale.float().reshape(scale_shape) * mid).to(dtype))
        elif spec.weight_form == "pt2e_per_channel":
            self.register_buffer("zero", torch.zeros(n, dtype=torch.int64) if spec.signed
                                 else torch.full((n,), int(mid), dtype=torch.int64))
        self.bias = nn.Parameter(torch.randn(n, generator=g).to(dtype), requires_grad=False) if spec.bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.k}, out_features={self.n}, {self.spec}"

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: DequantSpec) -> "DequantLinear":
        """Round-to-nearest quantize a float layer into this hand-written form (what a user's own
        quantization script would store). Supports the "scale" (symmetric) and "zero_then_scale"
        (asymmetric, unsigned) forms, per-channel or grouped, 8 or 4 bits."""
        if spec.weight_form not in ("scale", "zero_then_scale") or spec.product_form == "seed_layout":
            raise ValueError(f"from_float supports the scale / zero_then_scale forms, got {spec}")
        n, k = linear.out_features, linear.in_features
        layer = cls(spec, k, n, dtype=linear.weight.dtype)
        w = linear.weight.detach().double()
        g = k if spec.group is None else spec.group
        grouped = w.view(n, k // g, g)
        if spec.weight_form == "scale":
            qmax = 2 ** (spec.bits - 1) - 1
            scale = grouped.abs().amax(-1) / qmax
            q = torch.round(grouped / scale.clamp(min=1e-12)[..., None]).clamp(-qmax - 1, qmax)
            zero = None
        else:
            qmax = 2**spec.bits - 1
            lo, hi = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
            scale = (hi - lo) / qmax
            zero = torch.round(-lo / scale.clamp(min=1e-12)).clamp(0, qmax)
            q = (torch.round(grouped / scale.clamp(min=1e-12)[..., None]) + zero[..., None]).clamp(0, qmax)
        q = q.reshape(n, k).to(torch.int16)
        storage = torch.int8 if spec.signed else torch.uint8
        if spec.bits == 4:
            nib = q & 0xF
            byte = nib[:, 0::2] | (nib[:, 1::2] << 4)
            q = torch.where(byte > 127, byte - 256, byte) if spec.signed else byte
        layer.qweight = q.to(storage)
        shape = (n,) if spec.group is None else (n, k // g)
        layer.scale = scale.reshape(shape).to(linear.weight.dtype)
        if spec.scale_spelling == "column" and spec.group is None:
            layer.scale = layer.scale[:, None].contiguous()
        if zero is not None:
            layer.zero = zero.reshape(shape).to(torch.int64 if spec.bits == 4 else storage)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    # -- the integer weight as [N, K] (unpacking int4 the usual ways)
    def int_weight(self) -> torch.Tensor:
        if self.spec.bits != 4:
            return self.qweight
        p = self.qweight
        if self.spec.signed:
            lo, hi = (p << 4) >> 4, p >> 4
        else:
            lo, hi = p & 0xF, p >> 4
        return torch.stack([lo, hi], dim=-1).view(self.n, self.k)

    def _row(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector broadcast along K, spelled as the spec says."""
        spelling = self.spec.scale_spelling
        if v.dim() == 2:  # already [N, 1]
            return v
        if spelling == "unsqueeze":
            return v.unsqueeze(1)
        if spelling == "view":
            return v.view(-1, 1)
        return v[:, None]

    def dequantize(self, dt: torch.dtype) -> torch.Tensor:
        """The float weight [N, K] (or the seed's [K, N]) as this layer's forward computes it."""
        spec, n, k = self.spec, self.n, self.k
        if spec.weight_form == "pt2e_per_channel":
            qmin, qmax = (-128, 127) if spec.signed else (0, 255)
            deq = torch.ops.quantized_decomposed.dequantize_per_channel(
                self.qweight, self.scale.float(), self.zero, 0, qmin, qmax, self.qweight.dtype)
            return deq.to(dt)
        if spec.weight_form == "pt2e_per_tensor":
            qmin, qmax = (-128, 127) if spec.signed else (0, 255)
            deq = torch.ops.quantized_decomposed.dequantize_per_tensor(
                self.qweight, 0.02, 0 if spec.signed else 128, qmin, qmax, self.qweight.dtype)
            return deq.to(dt)
        if spec.product_form == "seed_layout":
            w = self.qweight.to(dt) * self.scale.t()[:, None, :].to(dt)
            return w.reshape(k, n)
        w = self.int_weight()
        scale = self.scale.to(dt)
        if spec.near_miss == "wrong_axis":
            return w.to(dt) * self.scale_k.to(dt)  # broadcast along K: a per-input-feature scale
        if spec.group is not None:
            g = spec.group
            grouped = w.view(n, k // g, g).to(dt)
            s = scale.view(n, k // g, 1)
            if spec.weight_form == "zero_then_scale":
                deq = (grouped - self.zero.view(n, k // g, 1)) * s
            elif spec.weight_form == "scale_then_float_zero":
                deq = grouped * s - self.zero.to(dt).view(n, k // g, 1)
            else:
                deq = grouped * s
            if spec.near_miss == "interleaved_groups":
                return deq.transpose(1, 2).reshape(n, k)
            return deq.view(n, k)
        if spec.weight_form == "zero_then_scale":
            return (w.to(dt) - self._row(self.zero)) * self._row(scale)
        if spec.weight_form == "scale_then_float_zero":
            return w.to(dt) * self._row(scale) - self._row(self.zero.to(dt))
        return w.to(dt) * self._row(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec, dt = self.spec, x.dtype
        if spec.product_form.startswith("w8a8") or spec.near_miss == "per_tensor_activation":
            return self._w8a8(x)
        if spec.product_form == "scale_after":
            out = (x @ self.int_weight().t().to(dt)) * self.scale.to(dt).reshape(-1)
            return out + self.bias if self.bias is not None else out
        if spec.product_form == "seed_layout":
            out = x @ self.dequantize(dt)
            return out + self.bias if self.bias is not None else out
        if spec.near_miss == "scale_from_x":  # a "scale" that depends on the activation
            w = self.int_weight().to(dt) * self._row(self.scale.to(dt) * x.abs().mean())
        else:
            w = self.dequantize(dt)
        if spec.product_form == "linear":
            out = F.linear(x, w, self.bias if spec.bias == "inside" else None)
            return out + self.bias if spec.bias == "after" else out
        if spec.product_form == "addmm" and x.dim() == 2 and self.bias is not None:
            return torch.addmm(self.bias, x, w.t())
        if spec.product_form == "transpose":
            out = x @ w.transpose(0, 1)
        elif spec.product_form == "bmm":  # a batched matmul against the weight expanded over the batch
            x3 = x if x.dim() == 3 else x[None]
            out = torch.bmm(x3, w.t().expand(x3.shape[0], self.k, self.n))
            out = out if x.dim() == 3 else out[0]
        elif spec.product_form in ("matmul_t", "addmm"):
            out = x @ w.t()
        else:
            out = torch.matmul(x, w.T)
        return out + self.bias if self.bias is not None else out


def _w8a8_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token int8 activations, int8 weights, int32 accumulation (the op's W8A8)."""
    if self.spec.near_miss == "per_tensor_activation":  # one scale for the whole tensor: not the op's scheme
        x_scale = x.abs().amax() / 127
    else:
        x_scale = x.abs().amax(dim=-1, keepdim=True) / 127
    x_q = torch.round(x / x_scale).clamp(-128, 127).to(torch.int8)
    if self.spec.product_form == "w8a8_int_mm":
        acc = torch._int_mm(x_q.reshape(-1, self.k), self.qweight.t()).reshape(*x.shape[:-1], self.n)
    else:
        acc = x_q.to(torch.int32) @ self.qweight.to(torch.int32).t()
    out = acc.to(x.dtype) * x_scale * self.scale.reshape(-1).to(x.dtype)
    return out + self.bias if self.bias is not None else out


DequantLinear._w8a8 = _w8a8_forward


class DequantMLP(nn.Module):
    """Several dequant layers in a row (with a nonlinearity), for counting rewrites."""

    def __init__(self, layers: list[DequantLinear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.nn.functional.gelu(x)
        return x


class GPTQTorchLinear(nn.Module):
    """A GPTQ-style torch forward, written from GPTQModel's published torch kernel (ModelCloud/GPTQModel v2.x,
    2025: gptqmodel/nn_modules/qlinear/__init__.py ``PackableQuantLinear.dequantize_weight`` and
    qlinear/torch.py ``TorchQuantLinear.forward``): qweight int32 [K/pf, N] packed along K, qzeros int32
    [G, N/pf] packed along N ("v2" zeros: no +1), scales float16 [G, N], g_idx int32 [K], the shift amounts as
    plain tensor attributes; ``scales[g_idx] * (weight - zeros[g_idx])`` in the graph. For the pass's tests
    against a real library form and the benchmark of a rewritten library layer."""

    def __init__(self, bits, group, k, n, bias=True):
        super().__init__()
        self.bits, self.group_size, self.in_features, self.out_features = bits, group, k, n
        self.pack_factor = 32 // bits
        self.maxq = 2 ** bits - 1
        self.dequant_dtype = torch.int16 if bits == 8 else torch.int8
        self.register_buffer("qweight", torch.zeros(k // self.pack_factor, n, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(k // group, n // self.pack_factor, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(k // group, n, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(k, dtype=torch.int32) // group)
        self.register_buffer("bias", torch.zeros(n, dtype=torch.float16) if bias else None)
        wf = torch.arange(0, 32, bits, dtype=torch.int32).unsqueeze(0)
        self.wf_unsqueeze_zero = wf.unsqueeze(0)      # plain attributes, as GPTQModel keeps them
        self.wf_unsqueeze_neg_one = wf.unsqueeze(-1)

    def dequantize_weight(self):
        zeros = torch.bitwise_right_shift(
            torch.unsqueeze(self.qzeros, 2).expand(-1, -1, self.pack_factor), self.wf_unsqueeze_zero
        ).to(self.dequant_dtype)
        zeros = torch.bitwise_and(zeros, self.maxq).reshape(self.scales.shape)
        weight = torch.bitwise_and(
            torch.bitwise_right_shift(
                torch.unsqueeze(self.qweight, 1).expand(-1, self.pack_factor, -1), self.wf_unsqueeze_neg_one
            ).to(self.dequant_dtype), self.maxq)
        weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
        g_idx = self.g_idx.long()
        return self.scales[g_idx] * (weight - zeros[g_idx])          # [K, N]

    def forward(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        x = x.reshape(-1, x.shape[-1])
        weights = self.dequantize_weight().to(x.dtype)
        out = torch.matmul(x, weights).reshape(out_shape)
        if self.bias is not None:
            out.add_(self.bias)
        return out.to(x.dtype)

    @classmethod
    def quantized(cls, bits, group, k, n, *, act_order=False, sym=False, seed=0, bias=True):
        """Random integer weights, scales and zero points packed the way GPTQ packs them (own code)."""
        g = torch.Generator().manual_seed(seed)
        m = cls(bits, group, k, n, bias)
        pf, groups = m.pack_factor, k // group
        q = torch.randint(0, 2 ** bits, (k, n), generator=g, dtype=torch.int64)          # [K, N]
        z = (torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int64) if sym
             else torch.randint(0, 2 ** bits, (groups, n), generator=g, dtype=torch.int64))
        shifts = torch.arange(0, 32, bits, dtype=torch.int64)
        qweight = (q.view(k // pf, pf, n) << shifts.view(1, pf, 1)).sum(1)               # packed along K
        qzeros = (z.view(groups, n // pf, pf) << shifts.view(1, 1, pf)).sum(2)           # packed along N
        to_i32 = lambda t: torch.where(t >= 2 ** 31, t - 2 ** 32, t).to(torch.int32)     # noqa: E731
        m.qweight.copy_(to_i32(qweight))
        m.qzeros.copy_(to_i32(qzeros))
        m.scales.copy_((torch.rand(groups, n, generator=g) * 0.02 + 0.005).half())
        if act_order:  # desc_act: each group holds `group` input channels, scattered over K
            perm = torch.randperm(k, generator=g)
            m.g_idx.copy_((torch.arange(k) // group)[perm].to(torch.int32))
        if bias:
            m.bias.copy_((torch.randn(n, generator=g) * 0.05).half())
        return m
