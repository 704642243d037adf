"""Independent float64 oracle for the op, written from the layout spec in numpy (not from xqpass code)."""
import numpy as np
import torch

EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
#: the spacing of the subnormals: below the smallest normal a rounding errs by up to half of it, however
#: small the value (float16's smallest normal, 6e-5, is reached by ordinary products)
SUBNORMAL = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, torch.float64: 2.0**-1074}


def np_unpack_int4(packed: torch.Tensor, axis: int) -> np.ndarray:
    """Low nibble = even index, high nibble = odd index; int8 bytes hold signed nibbles."""
    b = packed.cpu().numpy().view(np.uint8).astype(np.int64)
    lo, hi = b & 15, b >> 4
    if packed.dtype == torch.int8:
        lo, hi = np.where(lo >= 8, lo - 16, lo), np.where(hi >= 8, hi - 16, hi)
    both = np.stack([lo, hi], axis=axis + 1)
    shape = list(b.shape)
    shape[axis] *= 2
    return both.reshape(shape)


def np_pack_int4(values: torch.Tensor, axis: int) -> torch.Tensor:
    v = values.numpy().astype(np.int64) & 15
    v = np.moveaxis(v, axis, -1)
    byte = (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)
    byte = np.moveaxis(byte, -1, axis)
    return torch.from_numpy(byte.view(np.int8).copy() if values.dtype == torch.int8 else byte.copy())


def weight_values(w: torch.Tensor, packed: bool) -> np.ndarray:
    return np_unpack_int4(w, 1) if packed else w.cpu().numpy().astype(np.int64)


def dequantized(w, scale, zero_point, block_size, packed):
    """(w_deq [N, K], |w * scale| + |zero_point| [N, K]) in float64."""
    v = weight_values(w, packed).astype(np.float64)
    s = scale.cpu().double().numpy()
    z = np.zeros_like(s) if zero_point is None else zero_point.cpu().double().numpy()
    if block_size == -1:
        ws, zz = v * s[:, None], np.broadcast_to(z[:, None], v.shape)
    elif v.ndim == 2:  # blockwise by rows: w [N, K], scale [N, K/B]
        ws = v * np.repeat(s, block_size, axis=1)
        zz = np.repeat(z, block_size, axis=1)
    else:  # [S, B, N] -> [K, N] -> [N, K]
        ws = (v * s[:, None, :]).reshape(-1, v.shape[-1]).T
        zz = np.broadcast_to(z[:, None, :], v.shape).reshape(-1, v.shape[-1]).T
    return ws - zz, np.abs(ws) + np.abs(zz)


def oracle(x, w, scale, zero_point=None, block_size=-1, int4_weight=False, quantize_activation=False, packed=False,
           roundings=1, block_n=1):
    """Returns (expected float64 output, elementwise error allowance) for one call of the op with an integer
    weight (``block_n`` 1: one scale an output feature or group; float8 weights have their own oracle in
    test_op_fp8.py).

    W*A16: exact x @ w_deq.T; allowance covers float32 accumulation and ``roundings`` roundings to
    x.dtype (the op's definition rounds once; docs/ops.md allows a fast kernel a second).
    W*A8: the unquantized product; allowance adds the per-token rounding bound
    (x_scale / 2) * sum_k |w_deq[n, k]|, x_scale = amax|x| / 127.
    """
    if block_n != 1:
        raise ValueError(f"the integer oracle has one scale an output feature (block_n=1), got block_n={block_n}")
    xd = x.cpu().double().numpy()
    w_deq, w_mag = dequantized(w, scale, zero_point, block_size, packed)
    k = xd.shape[-1]
    expected = xd @ w_deq.T
    mag = np.abs(xd) @ w_mag.T
    allowance = (roundings * EPS[x.dtype] + 8 * k * 2.0**-24) * mag
    if quantize_activation:
        x_scale = np.abs(xd).max(axis=-1, keepdims=True) / 127
        quant_err = x_scale / 2 * np.abs(w_deq).sum(axis=1)
        allowance = allowance + quant_err * (1 + 1e-5) + (roundings * EPS[x.dtype] + 8 * k * 2.0**-24) * x_scale * w_mag.sum(axis=1)
    return expected, allowance + roundings * SUBNORMAL[x.dtype] / 2 + 1e-30


def assert_within(out: torch.Tensor, expected: np.ndarray, allowance: np.ndarray, what=""):
    got = out.detach().cpu().double().numpy()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    err = np.abs(got - expected)
    bad = ~(err <= allowance)
    if bad.any():
        i = np.argwhere(bad)[0]
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} elements out of bounds; first at {tuple(i)}: "
            f"got {got[tuple(i)]}, expected {expected[tuple(i)]}, allowance {allowance[tuple(i)]}"
        )


def module_in_float64(module, x):
    """The output of a DequantLinear / DequantMLP with its float buffers (scales, zero points, bias)
    and x in float64: the exact value of the quantized model."""
    import copy

    from xqpass.testing.modules import DequantLinear

    m = copy.deepcopy(module).cpu()
    for layer in m.modules():
        if isinstance(layer, DequantLinear):
            for name in ("scale", "zero", "scale_k"):
                t = getattr(layer, name, None)
                if t is not None and t.is_floating_point():
                    setattr(layer, name, t.double())
            if layer.bias is not None:
                layer.bias = torch.nn.Parameter(layer.bias.double(), requires_grad=False)
    with torch.no_grad():
        return m(x.cpu().double())


def assert_as_accurate_as_original(module, x, rewritten):
    """The rewrite is about as close to the float64 value of the same module as the original is
    (which computes in x.dtype, where the op computes in float32): within a small factor of the
    original's own rounding error, or of one rounding of x.dtype (layers compound both alike)."""
    with torch.no_grad():
        original = module(x).cpu().double()
    exact = module_in_float64(module, x)
    err_orig = (original - exact).abs().max().item()
    err_new = (rewritten.cpu().double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert err_new <= 4 * max(err_orig, EPS[x.dtype] * scale) + 1e-5 * scale + 1e-6, (err_new, err_orig, scale)
