"""``torch.ops.xq.quantized_grouped_matmul``: a bank of quantized experts, each row routed to one.

Schema::

    xq::quantized_grouped_matmul(Tensor x, Tensor expert_ids, Tensor w, Tensor scale,
                                 Tensor? zero_point=None, SymInt block_size=-1,
                                 bool int4_weight=False, Tensor? bias=None, Tensor? perm=None, *,
                                 bool packed=False, SymInt block_n=1) -> Tensor

``x [T, K]`` float (T rows: tokens); ``expert_ids`` int32 / int64, ``[T]`` (one expert a row) or
``[T, k]`` (the router's top-k indices as they come: k experts a row, no copy of ``x``); the weights are
``E`` experts stacked on a leading axis, each one in a layout of :mod:`xqpass.quant.layouts` stored by
rows (the layouts the op's weights take, the expert axis first):

============================  ====================  ============================  ============
one expert's layout           ``w``                 ``scale``, zero point         ``bias``
============================  ====================  ============================  ============
per-channel                   ``[E, N, K]``         ``[E, N]``                    ``[E, N]``
blockwise by rows (B)         ``[E, N, K]``         ``[E, N, K/B]``               ``[E, N]``
packed int4 (either)          ``[E, N, K/2]``       as above                      ``[E, N]``
2-D blocks (float8, Bn x B)   ``[E, N, K]``         ``[E, ceil(N/Bn), ceil(K/B)]`` ``[E, N]``
============================  ====================  ============================  ============

with the op's storage (int8 / uint8, 4-bit one a byte or packed two a byte along K, float8 e4m3fn /
e5m2 symmetric) and zero-point convention. Returns ``[*expert_ids.shape, N]`` in ``x.dtype``::

    out[t, j, n] = sum_k x[t, k] * w_deq[expert_ids[t, j], n, k] + bias[expert_ids[t, j], n]
    w_deq[e]     = w[e] * scale[e] - zero_point[e]          (expert e's layout, per group of K)

Float work is float32 (float64 for float64 ``x``), rounded once to ``x.dtype``. The default kernel
(CPU and any non-XLA device) is :func:`quantized_grouped_matmul_reference`: each expert that receives a
row dequantized exactly as :meth:`Layout.dequantize` does, then its rows multiplied; expert ids outside
``[0, E)`` are a ``ValueError`` there (a check of values: the XLA kernel cannot make it without a
host round trip, and leaves such rows unspecified). The XLA kernel: :mod:`xqpass.ops.grouped_xla`.

``block_n`` means what it means to ``xq::quantized_matmul``: 1 (a scale a row), or Bn > 1 for float8
weights in 2-D blocks of Bn output x ``block_size`` input features (HF fp8 / DeepSeek: 128 x 128); N and
K need not be multiples of the block, each expert's last blocks are partial. Per-tensor (-1) has no
bank form here: one expert's tensor scale is its one 2-D block, ``block_n=N, block_size=K`` with
``scale[:, None, None]``.

``perm`` (optional, int32 / int64 ``[E, K]``): each expert's own input order, for weights stored with K
permuted (GPTQ act-order: K sorted by group so groups are contiguous). Expert ``e`` reads row ``t`` as
``x[t, perm[e]]``::

    out[t, j, n] = sum_k x[t, perm[e, k]] * w_deq[e, n, k] + bias[e, n]      e = expert_ids[t, j]

Each ``perm[e]`` is a permutation of ``range(K)``: a check of values, made where the values are at hand
(the CPU kernel), as for the ids.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..quant.layouts import FLOAT8_DTYPES, PER_CHANNEL, PER_TENSOR, WEIGHT_DTYPES, Layout
from .checks import ACTIVATION_DTYPES, compute_dtype

EXPERT_ID_DTYPES = (torch.int32, torch.int64)
PERM_DTYPES = (torch.int32, torch.int64)
_NAME = "quantized_grouped_matmul"


class GroupedSpec(NamedTuple):
    """What validation learned about a grouped call."""

    experts: int  # E
    in_features: int  # K
    out_features: int  # N
    layout: Layout  # one expert's
    out_shape: tuple  # (*expert_ids.shape, N)


def _fail(kind, message: str):
    raise kind(f"{_NAME}: {message}")


def _check_kinds(x, expert_ids, w, scale, zero_point, bias, block_size, int4_weight, packed, block_n) -> None:
    for name, t in (("x", x), ("expert_ids", expert_ids), ("w", w), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        _fail(TypeError, f"x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if expert_ids.dtype not in EXPERT_ID_DTYPES:
        hint = " (the router's indices: topk(...).indices, not its weights)" if expert_ids.is_floating_point() else ""
        _fail(TypeError, f"expert_ids must be torch.int32 or torch.int64, got {expert_ids.dtype}{hint}")
    if w.dtype not in WEIGHT_DTYPES and w.dtype not in FLOAT8_DTYPES:
        _fail(TypeError, f"w must be torch.int8 or torch.uint8 (quantized) or float8 (torch.float8_e4m3fn, "
                         f"torch.float8_e5m2), got {w.dtype}")
    if scale.dtype not in ACTIVATION_DTYPES:
        _fail(TypeError, f"scale must be float32, bfloat16, float16 or float64, got {scale.dtype}")
    for name, t in (("zero_point", zero_point), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            hint = " (an integer zero z maps to z * scale)" if name == "zero_point" else ""
            _fail(TypeError, f"{name} must be a floating tensor or None, got {got}{hint}")
    if not isinstance(block_size, (int, torch.SymInt)):
        _fail(TypeError, f"block_size must be an int, got {type(block_size).__name__}")
    if packed and not int4_weight:
        _fail(ValueError, "packed=True holds two 4-bit values a byte; it needs int4_weight=True")
    if w.dtype in FLOAT8_DTYPES and (int4_weight or packed or zero_point is not None):
        _fail(ValueError, f"float8 weights ({w.dtype}) are one symmetric value a byte: int4_weight and packed must "
                          f"be False and zero_point None, got int4_weight={int4_weight}, packed={packed}, zero_point "
                          f"{'None' if zero_point is None else 'given'}")
    if not isinstance(block_n, (int, torch.SymInt)):
        _fail(TypeError, f"block_n must be an int, got {type(block_n).__name__}")
    if block_n == PER_TENSOR:
        _fail(ValueError, "block_n=-1 (per-tensor) has no bank form: an expert's one scale is one 2-D block, pass "
                          "block_n=N, block_size=K and scale[:, None, None]")
    if block_n != 1 and w.dtype not in FLOAT8_DTYPES:
        _fail(ValueError, f"block_n={block_n} (2-D block scales) is for float8 weights; {w.dtype} weights take "
                          f"block_n=1 (per-channel or blockwise by rows)")


def check_grouped_inputs(x, expert_ids, w, scale, zero_point=None, block_size: int = PER_CHANNEL,
                         int4_weight: bool = False, bias=None, packed: bool = False, block_n: int = 1,
                         perm=None) -> GroupedSpec:
    """Validate one call on shapes and dtypes only (every kernel, so at trace time): ``TypeError`` for a
    wrong kind, ``ValueError`` for a wrong shape or value, each naming what was expected and what came."""
    _check_kinds(x, expert_ids, w, scale, zero_point, bias, block_size, int4_weight, packed, block_n)
    if x.dim() != 2:
        _fail(ValueError, f"x must be 2-D [T, K] (rows, in features), got shape {tuple(x.shape)}"
                          + (" (flatten the leading dims: x.reshape(-1, K))" if x.dim() > 2 else ""))
    rows, k = x.shape
    if expert_ids.dim() not in (1, 2) or expert_ids.shape[0] != rows:
        _fail(ValueError, f"expert_ids must be [T] or [T, top_k] with T={rows} (x's rows), got shape "
                          f"{tuple(expert_ids.shape)}")
    if w.dim() != 3:
        hint = (" (the seed's blockwise layout [K/B, B, N] is not taken: store each expert by rows, [N, K])"
                if w.dim() == 4 else " (one expert: use quantized_matmul, or w[None])" if w.dim() == 2 else "")
        _fail(ValueError, f"w must be 3-D [E, N, K{'/2' if packed else ''}] (experts, out, in features), got shape "
                          f"{tuple(w.shape)}{hint}")
    experts = w.shape[0]
    if experts == 0:
        _fail(ValueError, f"w holds no experts: shape {tuple(w.shape)}")
    device = x.device
    for name, t in (("expert_ids", expert_ids), ("w", w), ("scale", scale), ("zero_point", zero_point),
                    ("bias", bias)):
        if t is not None and t.device != device:
            _fail(ValueError, f"{name} is on {t.device}, expected x's device {device}")
    try:
        layout = Layout.recognise(w.shape[1:], block_size, packed, block_n)
    except ValueError as e:
        _fail(ValueError, str(e))
    if block_size != PER_CHANNEL and k % block_size and block_n == 1:  # 2-D blocks may end partial
        _fail(ValueError, f"block_size={block_size} does not divide K={k}")
    n, stored_k = layout.features(tuple(w.shape[1:]))
    if stored_k != k:
        pack, stored = (2, "packs") if packed else (1, "holds")
        hint = (" (int4 weights unpacked one a byte: pass packed=False)" if packed and w.shape[2] == k else
                " (two 4-bit values a byte: pass packed=True)" if int4_weight and not packed and 2 * w.shape[2] == k
                else "")
        _fail(ValueError, f"K mismatch: x has K={k} in its last dim, w {tuple(w.shape)} {stored} "
                          f"K={w.shape[2] * pack}{hint}")
    expected = (experts, *layout.scale_shape(n, k))
    if tuple(scale.shape) != expected:
        per = ("[E, N]" if block_size == PER_CHANNEL else
               f"[E, ceil(N={n}/block_n={block_n}), ceil(K={k}/block_size={block_size})]" if block_n > 1 else
               "[E, N, K/B]")
        _fail(ValueError, f"{layout.name} scale must have shape {expected} {per}, got {tuple(scale.shape)}")
    if zero_point is not None and tuple(zero_point.shape) != expected:
        _fail(ValueError, f"zero_point must have shape {expected} like scale, got {tuple(zero_point.shape)}")
    if bias is not None and tuple(bias.shape) != (experts, n):
        _fail(ValueError, f"bias must have shape {(experts, n)} [E, N], got {tuple(bias.shape)}")
    if perm is not None:
        _check_perm(perm, experts, k, device)
    return GroupedSpec(experts, k, n, layout, (*expert_ids.shape, n))


def _check_perm(perm, experts: int, k: int, device) -> None:
    """``perm`` is each expert's input order: an integer ``[E, K]`` on x's device."""
    if not isinstance(perm, torch.Tensor):
        _fail(TypeError, f"perm must be a torch.Tensor or None, got {type(perm).__name__}")
    if perm.dtype not in PERM_DTYPES:
        _fail(TypeError, f"perm must be torch.int32 or torch.int64 (each expert's input order, e.g. "
                         f"argsort(g_idx)), got {perm.dtype}")
    if tuple(perm.shape) != (experts, k):
        hint = " (one order for all experts: perm.expand(E, K))" if tuple(perm.shape) == (k,) else ""
        _fail(ValueError, f"perm must have shape {(experts, k)} [E, K], one input order an expert, got "
                          f"{tuple(perm.shape)}{hint}")
    if perm.device != device:
        _fail(ValueError, f"perm is on {perm.device}, expected x's device {device}")


def check_perm_values(perm: Tensor) -> None:
    """Each ``perm[e]`` a permutation of ``range(K)``: a check of values, so only where they are at hand."""
    if perm.numel() == 0:
        return
    k = perm.shape[1]
    ordered = torch.arange(k, dtype=perm.dtype, device=perm.device).expand_as(perm)
    bad = (perm.sort(dim=1).values != ordered).any(dim=1).nonzero().flatten().tolist()
    if bad:
        _fail(ValueError, f"perm[{bad[0]}] is not a permutation of range(K={k}) (each expert reads every input "
                          f"feature once)")


def check_expert_ids(expert_ids: Tensor, experts: int) -> None:
    """Every id in ``[0, E)``: a check of values, so only where the values are at hand (the CPU kernel)."""
    if expert_ids.numel() == 0:
        return
    low, high = int(expert_ids.min()), int(expert_ids.max())
    if low < 0 or high >= experts:
        _fail(ValueError, f"expert_ids must lie in [0, {experts}) for E={experts} experts, got ids in "
                          f"[{low}, {high}]")


def quantized_grouped_matmul_reference(x, expert_ids, w, scale, zero_point=None, block_size=PER_CHANNEL,
                                       int4_weight=False, bias=None, packed=False, block_n=1, perm=None) -> Tensor:
    """Each expert that receives a row dequantized exactly (:meth:`Layout.dequantize` in the compute
    dtype), its rows (in its own input order, ``perm``) multiplied by it, its bias added; one rounding to
    ``x.dtype``."""
    spec = check_grouped_inputs(x, expert_ids, w, scale, zero_point, block_size, int4_weight, bias, packed, block_n,
                                perm)
    check_expert_ids(expert_ids, spec.experts)
    if perm is not None:
        check_perm_values(perm)
    cdt = compute_dtype(x.dtype)
    ids = expert_ids if expert_ids.dim() == 2 else expert_ids[:, None]  # [T, k]
    out = torch.zeros((*ids.shape, spec.out_features), dtype=cdt, device=x.device)
    for e in ids.unique().tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        w_deq = spec.layout.dequantize(w[e], scale[e], None if zero_point is None else zero_point[e], cdt)  # [N, K]
        x_rows = x[rows] if perm is None else x[rows][:, perm[e].long()]
        y = x_rows.to(cdt) @ w_deq.t()
        out[rows, slots] = y if bias is None else y + bias[e].to(cdt)
    return out.reshape(spec.out_shape).to(x.dtype)


class FlatBank(NamedTuple):
    """Experts ``[X, N, K]`` seen as one weight ``[X * N, K]`` of ``xq::quantized_matmul``: its arguments."""

    x: Tensor  # [T, K], or K padded with zeros to whole blocks
    w: Tensor  # [X * N, K] (or padded as x)
    scale: Tensor  # the matmul op's layout: [X * N], [X * N, G] or 2-D blocks [X * N/Bn, G]
    zero_point: Optional[Tensor]
    bias: Optional[Tensor]  # [X * N]
    block_size: int
    block_n: int


def flat_bank(layout: Layout, x: Tensor, w: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None,
              bias: Optional[Tensor] = None) -> FlatBank:
    """``w [X, N, K]`` (one expert's ``layout``, scales as the bank stores them) as one weight ``[X * N, K]``:
    every row against every expert in one matmul call (the dense route, expert parallelism).

    2-D blocks of Bn rows tile ``X * N`` only when Bn divides N; otherwise a block would hold the last
    rows of one expert and the first of the next, so each scale is repeated over its rows instead
    (blockwise by rows, ``block_n=1``) and K, which by rows holds whole blocks, is padded with zeros to
    them (the zeros add nothing to any product)."""
    experts, n = w.shape[0], w.shape[1]

    def flat(t):
        return None if t is None else t.reshape(experts * t.shape[1], *t.shape[2:])

    if layout.block_n > 1 and n % layout.block_n:
        k = x.shape[-1]
        padding = layout.num_groups(k) * layout.block_size - k
        if padding:  # a concatenate: torch_xla pads a float8 array with a float64 constant, which XLA refuses
            x = torch.cat([x, x.new_zeros((x.shape[0], padding))], dim=1)
            w = torch.cat([w, w.new_zeros((experts, n, padding))], dim=2)
        return FlatBank(x, flat(w), flat(layout.rows_of_blocks(scale, n)), None, flat(bias), layout.block_size, 1)
    return FlatBank(x, flat(w), flat(scale), flat(zero_point), flat(bias), layout.block_size, layout.block_n)


def flat_bank_matmul(bank: FlatBank, int4_weight: bool, packed: bool) -> Tensor:
    """``xq::quantized_matmul`` of :func:`flat_bank`'s arguments: ``[T, X * N]`` in x's dtype."""
    return torch.ops.xq.quantized_matmul.default(bank.x, bank.w, bank.scale, bank.zero_point, bank.block_size,
                                                 int4_weight, False, bank.bias, packed=packed, block_n=bank.block_n)


def in_own_order(x: Tensor, ids: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """``x [T, K]`` with ids ``[T, top_k]`` as ``T * top_k`` rows, row ``(t, j)`` read in its expert's order
    ``x[t, perm[ids[t, j]]]``, and their ids ``[T * top_k, 1]`` (one expert a row, in the same order as the
    output's ``[T, top_k]``)."""
    rows, top_k = ids.shape
    k = x.shape[1]
    flat_ids = ids.reshape(-1)
    order = torch.index_select(perm, 0, flat_ids).to(torch.int64)  # [T * top_k, K]: torch.gather takes int64
    repeated = x[:, None, :].expand(rows, top_k, k).reshape(rows * top_k, k)
    return torch.gather(repeated, 1, order), flat_ids.reshape(-1, 1)


@torch.library.custom_op("xq::quantized_grouped_matmul", mutates_args=())
def quantized_grouped_matmul(
    x: Tensor,
    expert_ids: Tensor,
    w: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor] = None,
    block_size: int = -1,
    int4_weight: bool = False,
    bias: Optional[Tensor] = None,
    perm: Optional[Tensor] = None,  # positional: custom_op takes no keyword-only tensors; pass it by name
    *,
    packed: bool = False,
    block_n: int = 1,
) -> Tensor:
    """Row ``t`` (slot ``j``, read in ``perm[e]``'s order) times expert ``e = expert_ids[t, j]``'s
    dequantized weight, plus its bias."""
    return quantized_grouped_matmul_reference(x, expert_ids, w, scale, zero_point, block_size, int4_weight, bias,
                                              packed, block_n, perm)


@quantized_grouped_matmul.register_fake
def _quantized_grouped_matmul_fake(x, expert_ids, w, scale, zero_point=None, block_size=-1, int4_weight=False,
                                   bias=None, perm=None, *, packed=False, block_n=1):
    spec = check_grouped_inputs(x, expert_ids, w, scale, zero_point, block_size, int4_weight, bias, packed, block_n,
                                perm)
    return x.new_empty(spec.out_shape)
