"""FP8 weights: layout from header and config, dequantise, quantise, requantise.

Oracles: the format's definition, ``q * s`` in float64 (exact) rounded once by :func:`round_once`
(written here from frexp and round-half-even, with no float conversion in between); transformers
5.25's FineGrainedFP8 dequantisation (``Fp8Dequantize._dequantize_one``) and quantisation
(``Fp8Quantize._quantize_one``) on block-aligned shapes, where it is right; compressed-tensors
0.20.1's ``dequantize`` and ``quantize`` for its tensor, channel and block schemes.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from adaptertool import AdapterToolError
from adaptertool.quant import (
    Fp8Format,
    Fp8Scheme,
    dequantize_fp8,
    find_fp8_weights,
    fp8_format,
    fp8_scale_key,
    quantize_fp8,
    requantize_fp8,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
E4M3 = torch.float8_e4m3fn
_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E8M0": torch.float8_e8m0fnu}


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact float64 values rounded to nearest-even in ``dtype`` in one step (subnormals and overflow included)."""
    info = torch.finfo(dtype)
    bits = 1 - int(math.log2(info.eps))  # significant bits
    emin = int(math.log2(info.tiny)) + 1  # frexp exponent of the smallest normal
    _, exponent = torch.frexp(x)
    quantum = exponent.clamp(min=emin) - bits  # weight of the last bit kept
    rounded = torch.ldexp(torch.round(torch.ldexp(x, -quantum)), quantum)  # torch.round: half to even
    rounded = torch.where(rounded.abs() > info.max, torch.copysign(torch.full_like(x, math.inf), rounded), rounded)
    return rounded.to(dtype)  # exact: every value is representable now


def _definition(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    rows, cols = q.shape
    grid = scale.double().reshape(-(-rows // block[0]), -(-cols // block[1]))
    s = grid[torch.arange(rows) // block[0]][:, torch.arange(cols) // block[1]]
    return round_once(q.double() * s, dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(shape: tuple[int, int], seed: int) -> torch.Tensor:
    raw = torch.randint(0, 256, shape, generator=_gen(seed), dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x3F  # no NaN codes
    return raw.view(E4M3)


def _scales(shape: tuple[int, ...], seed: int, code: str) -> torch.Tensor:
    s = torch.exp(torch.empty(shape).uniform_(math.log(1e-4), math.log(1e-2), generator=_gen(seed)))
    if code == "F8_E8M0":
        s = torch.exp2(torch.round(torch.log2(s)))
    return s.to(_TORCH[code])


def _scheme(strategy: str = "block", block: tuple[int, int] | None = (8, 8), *, convention: str = "fp8",
            scale_fmt: str = "float", scale_dtype: str = "F32") -> Fp8Scheme:
    return Fp8Scheme(weight="m.weight", scale=fp8_scale_key("m.weight", convention), convention=convention,
                     strategy=strategy, block=block if strategy == "block" else None, scale_fmt=scale_fmt,
                     scale_dtype=scale_dtype)


# id -> (scheme, weight shape); every block scheme has partial edge blocks
CASES = {
    "block8-36x32": (_scheme(), (36, 32)),  # DeepSeek-V3 kv_a_proj_with_mqa in small: grid 5x4, last row-block 4 rows
    "block8-37x29": (_scheme(), (37, 29)),  # partial in both dimensions
    "block128-576x7168": (_scheme(block=(128, 128)), (576, 7168)),  # the real kv_a_proj_with_mqa: grid 5x56
    "ue8m0-e8m0-37x29": (_scheme(scale_fmt="ue8m0", scale_dtype="F8_E8M0"), (37, 29)),
    "ct-block16-bf16-37x29": (_scheme(block=(16, 16), convention="compressed-tensors", scale_dtype="BF16"), (37, 29)),
    "ct-channel-bf16": (_scheme("channel", convention="compressed-tensors", scale_dtype="BF16"), (40, 24)),
    "ct-tensor-f16": (_scheme("tensor", convention="compressed-tensors", scale_dtype="F16"), (40, 24)),
    "fp8-tensor-scalar": (_scheme("tensor"), (40, 24)),
}


def _stored(case: str, seed: int = 0) -> tuple[Fp8Scheme, torch.Tensor, torch.Tensor]:
    scheme, shape = CASES[case]
    return scheme, _codes(shape, seed), _scales(scheme.scale_shapes(shape)[0], seed + 1, scheme.scale_dtype)


# --- dequantise --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_dequantize_is_the_definition_rounded_once(case: str, dtype: str) -> None:
    scheme, q, scale = _stored(case)
    block = scheme.block_size(tuple(q.shape))
    want = _definition(q, scale, block, DTYPES[dtype])
    for chunk in (1 << 20, 3 * q.shape[1] + 5):  # one chunk, and chunks that cut across blocks
        got = dequantize_fp8(q, scale, scheme, dtype=DTYPES[dtype], chunk_elements=chunk)
        assert got.dtype == DTYPES[dtype] and got.shape == q.shape
        assert torch.equal(_bits(got), _bits(want))


def test_dequantize_rounds_once_where_float32_then_bfloat16_would_not() -> None:
    # q = 1.25, s = 0x3C626666: q * s = 0.0172729487530887..., just below the bfloat16 midpoint 0.01727294921875.
    # Rounded to float32 first it lands on that midpoint, and the tie then goes up to the even 0.017333984375.
    q = torch.full((8, 8), 1.25).to(E4M3)
    scale = torch.tensor([[0x3C626666]], dtype=torch.int32).view(torch.float32)
    exact = 1.25 * scale.double().item()
    assert (torch.tensor(1.25) * scale).item() == 0.01727294921875 != exact
    got = dequantize_fp8(q, scale, _scheme(), dtype=torch.bfloat16)
    assert (got == 0.0172119140625).all()  # the nearest bfloat16 to the exact product
    assert torch.equal(_bits(got), _bits(round_once(torch.full((8, 8), exact, dtype=torch.float64), torch.bfloat16)))
    assert (dequantize_fp8(q, scale, _scheme()).to(torch.bfloat16) == 0.017333984375).all()  # float32, then bfloat16


def _transformers_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=dtype)


@pytest.mark.parametrize("shape, block", [((64, 96), (32, 32)), ((256, 384), (128, 128)), ((48, 16), (8, 16))])
def test_dequantize_matches_transformers_on_block_aligned_shapes(shape: tuple[int, int], block: tuple[int, int]) -> None:
    scheme = _scheme(block=block)
    q, scale = _codes(shape, 4), _scales(scheme.grid(shape), 5, "F32")
    ours = dequantize_fp8(q, scale, scheme)
    assert torch.equal(_bits(ours), _bits(_transformers_dequantize(q, scale, torch.float32)))
    # in bfloat16 transformers rounds twice (float32, then bfloat16): it agrees with ours wherever that is harmless
    theirs = _transformers_dequantize(q, scale, torch.bfloat16)
    assert torch.equal(theirs, ours.to(torch.bfloat16))


def test_transformers_gets_partial_edge_blocks_wrong() -> None:
    # transformers 5.25 infers the block as rows // grid rows: a hard error for 36 rows over 5 blocks of 8 ...
    scheme = _scheme()
    q, scale = _codes((36, 32), 6), _scales((5, 4), 7, "F32")
    with pytest.raises(ValueError, match="not divisible by scale grid"):
        _transformers_dequantize(q, scale, torch.float32)
    # ... and silently wrong for 12 columns over 2 blocks of 8 (it takes blocks of 6), like DeepSeek's kv_b_proj in small
    q, scale = _codes((48, 12), 8), _scales((6, 2), 9, "F32")
    want = _definition(q, scale, (8, 8), torch.float32)
    theirs = _transformers_dequantize(q, scale, torch.float32)
    assert (theirs != want).sum() > 0 and torch.equal(theirs[:, :6], want[:, :6])
    assert torch.equal(_bits(dequantize_fp8(q, scale, scheme)), _bits(want))


def _ct_args(scheme: Fp8Scheme):  # type: ignore[no-untyped-def]
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False, strategy=scheme.strategy,
                            block_structure=list(scheme.block) if scheme.block else None)


@pytest.mark.parametrize("case", ["ct-block16-bf16-37x29", "ct-channel-bf16", "ct-tensor-f16", "block8-37x29"])
def test_dequantize_and_codes_match_compressed_tensors(case: str) -> None:
    forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    scheme, q, scale = _stored(case, seed=10)
    scheme = Fp8Scheme(**{**scheme.__dict__, "convention": "compressed-tensors", "scale": "m.weight_scale"})
    scale = scale.reshape(scheme.scale_shapes(tuple(q.shape))[0])
    args = _ct_args(scheme)
    # compressed-tensors multiplies in the scale's dtype: exact there (a 4-bit times an 8- or 11-bit significand)
    theirs = forward.dequantize(q, scale, args=args)
    assert torch.equal(_bits(dequantize_fp8(q, scale, scheme, dtype=scale.dtype)), _bits(theirs))
    weight = torch.randn(q.shape, generator=_gen(11)) * 0.05
    codes, scale = quantize_fp8(weight, scheme)
    theirs = forward.quantize(weight, scale, None, args, dtype=E4M3)
    assert torch.equal(_bits(codes), _bits(theirs))


# --- quantise ----------------------------------------------------------------------------------


def _e4m3_nearest(x: torch.Tensor) -> torch.Tensor:
    """Codes of the E4M3 values nearest float64 ``x`` (|x| <= 448), ties to the even code, by table search."""
    table = torch.arange(0, 127, dtype=torch.uint8).view(E4M3).double()  # increasing with the code
    mag = x.abs().clamp(max=448.0).reshape(-1)
    upper = torch.searchsorted(table, mag).clamp(max=126)
    lower = (upper - 1).clamp(min=0)
    down, up = mag - table[lower], table[upper] - mag
    pick = torch.where((up < down) | ((up == down) & (upper % 2 == 0)), upper, lower)
    pick = torch.where(mag == table[upper], upper, pick)
    return (pick.to(torch.uint8) | (torch.signbit(x.reshape(-1)).to(torch.uint8) << 7)).reshape(x.shape)


def _block_scales(weight: torch.Tensor, scheme: Fp8Scheme) -> torch.Tensor:
    """The recipe's scale per block, block by block: amax / 448 in float32, 1 for zeros, ue8m0 up to 2**k."""
    rows, cols = weight.shape
    bn, bk = scheme.block_size((rows, cols))
    grid = torch.empty(scheme.grid((rows, cols)))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            amax = weight[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float().abs().max()
            s = (amax / 448.0).item() if amax > 0 else 1.0
            if scheme.scale_fmt == "ue8m0":
                mantissa, exponent = math.frexp(s)
                s = s if mantissa == 0.5 else math.ldexp(1.0, exponent)
            grid[i, j] = s
    return grid.to(_TORCH[scheme.scale_dtype]).double()


@pytest.mark.parametrize("case", CASES)
def test_quantize_follows_the_recipe(case: str) -> None:
    scheme, shape = CASES[case]
    bn, bk = scheme.block_size(shape)
    weight = torch.randn(shape, generator=_gen(20)) * 0.03
    if scheme.strategy != "tensor":
        weight[:bn, :bk] = 0  # an all-zero block (a row for channel)
    if shape[0] % bn:
        weight[-(shape[0] % bn):] = 0  # and an all-zero partial edge row-block
    kept = weight.clone()
    q, scale = quantize_fp8(weight, scheme)
    assert torch.equal(weight, kept)  # float32 input: not divided in place
    assert q.dtype == E4M3 and scale.dtype == _TORCH[scheme.scale_dtype]
    assert tuple(scale.shape) == scheme.scale_shapes(shape)[0]
    assert torch.equal(scale.double().reshape(scheme.grid(shape)), _block_scales(weight, scheme))
    s = scale.double().reshape(scheme.grid(shape))[torch.arange(shape[0]) // bn][:, torch.arange(shape[1]) // bk]
    want = _e4m3_nearest(weight.double() / s)
    # The recipe divides in float32, then rounds to E4M3: the two agree unless the float32 quotient lands on a tie.
    quotient = (weight.float() / s.float()).clamp(-448, 448).double()
    tie = _e4m3_nearest(quotient * (1 - 2 ** -40)) != _e4m3_nearest(quotient * (1 + 2 ** -40))
    assert torch.equal(_bits(q)[~tie], want[~tie])
    assert torch.equal(_bits(q), _bits(quotient.float().to(E4M3)))
    if scheme.scale_fmt == "ue8m0":
        assert not tie.any()  # a power-of-two scale divides exactly
    if scheme.strategy != "tensor":
        assert scale.float().reshape(scheme.grid(shape))[0, 0] == 1.0 and not _bits(q)[:bn, :bk].any()


def test_quantize_ties_go_to_the_even_code() -> None:
    scheme = _scheme(scale_fmt="ue8m0")
    # s = 1 (amax 448); midpoints between E4M3 neighbours: 1.0625 (1 | 1.125), 1.1875 (1.125 | 1.25), 232, 0.0029296875
    mids = torch.tensor([448.0, 1.0625, 1.1875, 232.0, -232.0, 3 * 2.0 ** -10, 0.0])
    q, scale = quantize_fp8(mids.repeat(8, 1).T.contiguous().reshape(7, 8), scheme)
    assert scale.item() == 1.0
    values = q[:, 0].float().tolist()
    assert values == [448.0, 1.0, 1.25, 224.0, -224.0, 2 * 2.0 ** -9, 0.0]


def test_quantize_saturates_where_a_rounded_scale_is_too_small() -> None:
    # bfloat16(amax / 448) < amax / 448 here, so amax / s > 448: the code must clamp to 448, not become NaN
    scheme = _scheme("tensor", convention="compressed-tensors", scale_dtype="BF16")
    amax = 448.0 * (1 + 2 ** -8 - 2 ** -12)
    q, scale = quantize_fp8(torch.tensor([[amax, -amax, 1.0, 0.0]]), scheme)
    assert scale.float().item() < amax / 448
    assert _bits(q)[0].tolist() == [0x7E, 0xFE, _bits(torch.tensor(1.0 / scale.float().item()).to(E4M3)).item(), 0]


@pytest.mark.parametrize("case", ["block8-37x29", "block128-576x7168", "ct-block16-bf16-37x29", "ct-channel-bf16",
                                  "ct-tensor-f16", "fp8-tensor-scalar"])
def test_round_trip_through_float32_is_byte_identical(case: str) -> None:
    scheme, shape = CASES[case]
    weight = torch.randn(shape, generator=_gen(30)) * 0.02
    q, scale = quantize_fp8(weight, scheme)
    again = quantize_fp8(dequantize_fp8(q, scale, scheme), scheme)
    assert torch.equal(_bits(again[0]), _bits(q)) and torch.equal(_bits(again[1]), _bits(scale))


@pytest.mark.parametrize("scale_dtype", ["F32", "F8_E8M0"])
def test_ue8m0_round_trip_changes_bytes_only_where_the_largest_code_is_224(scale_dtype: str) -> None:
    # s is the least power of two >= amax / 448, so amax / s lies in (224, 448]; in (224, 232] it rounds to 224,
    # and quantising those values again halves s and doubles every code: same values, other bytes.
    scheme = _scheme(scale_fmt="ue8m0", scale_dtype=scale_dtype)
    weight = torch.randn(36, 32, generator=_gen(31)) * 0.02
    weight[8:16, 8:16] *= 0.1 / weight[8:16, 8:16].abs().max()
    weight[9, 9] = 228 * 2.0 ** -8  # s = 2**-8, largest code 224
    q, scale = quantize_fp8(weight, scheme)
    q2, scale2 = quantize_fp8(dequantize_fp8(q, scale, scheme), scheme)
    largest = torch.tensor([[q[i:i + 8, j:j + 8].float().abs().max() for j in range(0, 32, 8)] for i in range(0, 36, 8)])
    assert largest[1, 1] == 224
    s, s2 = scale.float(), scale2.float()
    assert torch.equal(s2 != s, largest == 224)
    assert torch.equal(s2[largest == 224], s[largest == 224] / 2)
    assert torch.equal(dequantize_fp8(q2, scale2, scheme), dequantize_fp8(q, scale, scheme))
    assert (torch.frexp(s)[0] == 0.5).all()  # powers of two


def _transformers_quantize(weight: torch.Tensor, block: tuple[int, int], scale_fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = SimpleNamespace(weight_block_size=block, scale_fmt=scale_fmt)
    out = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one("m.weight", weight)
    return out["m.weight"], out["m.weight_scale_inv"]


def test_transformers_fp8_bytes_survive_dequantize_and_requantize_in_codes_but_not_all_scales() -> None:
    # transformers stores 1 / (448 / amax); from its dequantised values amax / 448 comes out 1 ulp apart in ~7% of blocks
    scheme = _scheme(block=(16, 16))
    q, scale = _transformers_quantize(torch.randn(256, 256, generator=_gen(40)) * 0.02, (16, 16), "float")
    again_q, again_scale = quantize_fp8(dequantize_fp8(q, scale, scheme), scheme)
    assert torch.equal(_bits(again_q), _bits(q))
    differ = again_scale != scale
    assert 0 < differ.sum() < 0.15 * differ.numel()
    assert torch.equal(again_scale[differ].view(torch.int32) - scale[differ].view(torch.int32),
                       (again_scale[differ] > scale[differ]).int() * 2 - 1)  # one ulp either way


def test_requantize_keeps_the_bytes_of_blocks_the_delta_left_alone() -> None:
    scheme = _scheme(block=(16, 16))
    # bytes from transformers' quantiser: re-quantising their values would rewrite some scales (test above)
    q, scale = _transformers_quantize(torch.randn(256, 256, generator=_gen(40)) * 0.02, (16, 16), "float")
    weight = dequantize_fp8(q, scale, scheme)
    delta = torch.zeros_like(weight)
    delta[16:32, 32:48] = 0.5  # one block, pushed beyond its old range (the old scale would clip it)
    delta[255, 255] = -1e-3  # and one element of the last block
    new_q, new_scale = requantize_fp8(weight + delta, q, scale, scheme, chunk_elements=16 * 256)
    changed = torch.zeros(16, 16, dtype=torch.bool)
    changed[1, 2] = changed[15, 15] = True
    assert torch.equal(new_scale[~changed], scale[~changed])
    want_q, want_scale = quantize_fp8(weight + delta, scheme)
    assert torch.equal(new_scale[changed], want_scale[changed])
    elements = changed.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(_bits(new_q)[~elements], _bits(q)[~elements])
    assert torch.equal(_bits(new_q)[elements], _bits(want_q)[elements])
    assert new_scale.dtype == scale.dtype and new_scale.shape == scale.shape
    # a clipping observer's checkpoint (scales below amax / 448): every untouched byte stays, too
    q, scale = _codes((36, 32), 43), _scales((5, 4), 44, "F32")
    weight = dequantize_fp8(q, scale, scheme := _scheme())
    weight[35, 31] += 1.0
    new_q, new_scale = requantize_fp8(weight, q, scale, scheme)
    assert torch.equal(new_scale[:4], scale[:4]) and torch.equal(new_scale[4, :3], scale[4, :3])
    assert new_scale[4, 3] != scale[4, 3] and torch.equal(_bits(new_q)[:32], _bits(q)[:32])


def test_requantize_keeps_untouched_ue8m0_bytes_and_the_scalar_scale_shape() -> None:
    scheme = _scheme("tensor")
    q, scale = quantize_fp8(torch.randn(8, 8, generator=_gen(41)), scheme)
    assert scale.shape == ()
    same = requantize_fp8(dequantize_fp8(q, scale, scheme), q, scale, scheme)
    assert torch.equal(_bits(same[0]), _bits(q)) and same[1].shape == () and same[1] == scale
    scheme = _scheme(scale_fmt="ue8m0", scale_dtype="F8_E8M0")
    weight = torch.randn(16, 8, generator=_gen(42)) * 0.02
    weight[0, 0] = 228 * 2.0 ** -8  # block 0: largest code 224, which plain requantisation would rewrite
    q, scale = quantize_fp8(weight, scheme)
    values = dequantize_fp8(q, scale, scheme)
    values[15, 7] += 0.01
    assert _bits(quantize_fp8(values, scheme)[1])[0, 0] != _bits(scale)[0, 0]  # plain quantisation rewrites block 0
    new_q, new_scale = requantize_fp8(values, q, scale, scheme)
    assert _bits(new_scale)[0, 0] == _bits(scale)[0, 0] and torch.equal(_bits(new_q)[:8], _bits(q)[:8])
    assert torch.equal(_bits(new_q)[8:], _bits(quantize_fp8(values, scheme)[0])[8:])


# --- layout and config -------------------------------------------------------------------------


def test_fp8_format_reads_both_conventions() -> None:
    assert fp8_format({"quant_method": "fp8", "weight_block_size": [128, 64]}) == Fp8Format("fp8", (("block", (128, 64)),))
    assert fp8_format({"quant_method": "fp8"}).layouts == (("block", (128, 128)),)  # transformers' default
    assert fp8_format({"quant_method": "fp8", "weight_block_size": None}).layouts == (("tensor", None),)
    assert fp8_format({"quant_method": "fp8", "weight_block_size": [8, 8], "scale_fmt": "ue8m0"}).scale_fmt == "ue8m0"
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    config = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "g0": {"targets": ["Linear"], "weights": {**weights, "strategy": "channel"}},
        "g1": {"targets": ["re:.*experts.*"], "weights": {**weights, "strategy": "block", "block_structure": [128, 128]}},
        "g2": {"targets": ["re:.*o_proj"], "weights": {**weights, "strategy": "channel"}}}}
    assert fp8_format(config) == Fp8Format("compressed-tensors", (("channel", None), ("block", (128, 128))))


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not an FP8 format"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size is \\[128\\]"),
    ({"quant_method": "fp8", "scale_fmt": "e5m2"}, "scale_fmt 'e5m2'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {"weights": {
        "num_bits": 8, "type": "float", "strategy": "group", "group_size": 128}}}}, "group g has weight strategy 'group'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "strategy": "channel"}}}}, "group g is not float-quantized FP8"),
])
def test_fp8_format_refuses_what_it_cannot_read(config: dict, message: str) -> None:
    with pytest.raises(AdapterToolError, match=f"^model: .*{message}"):
        fp8_format(config, source="model")


FP8_CONFIG = {"quant_method": "fp8", "weight_block_size": [8, 8], "activation_scheme": "dynamic"}


def test_find_fp8_weights_pairs_weights_and_scales() -> None:
    specs = {
        "embed.weight": ("BF16", (64, 32)),
        "a.weight": ("F8_E4M3", (36, 32)), "a.weight_scale_inv": ("F32", (5, 4)),
        "b.weight": ("F8_E4M3", (8, 8)), "b.weight_scale_inv": ("F8_E8M0", (1, 1)),
        "gate.weight": ("BF16", (4, 32)), "gate.weight_scale_inv": ("F32", (1, 4)),  # not FP8: passes through
    }
    found = find_fp8_weights(specs, FP8_CONFIG)
    assert list(found) == ["a.weight", "b.weight"]
    assert found["a.weight"] == Fp8Scheme(weight="a.weight", scale="a.weight_scale_inv", convention="fp8",
                                          strategy="block", block=(8, 8))
    assert found["b.weight"].scale_fmt == "ue8m0" and found["b.weight"].scale_dtype == "F8_E8M0"
    weights = {"num_bits": 8, "type": "float", "symmetric": True}
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "g0": {"weights": {**weights, "strategy": "channel"}},
        "g1": {"weights": {**weights, "strategy": "block", "block_structure": [16, 16]}},
        "g2": {"weights": {**weights, "strategy": "tensor"}}}}
    specs = {"c.weight": ("F8_E4M3", (40, 24)), "c.weight_scale": ("BF16", (40, 1)), "c.input_scale": ("BF16", (1,)),
             "d.weight": ("F8_E4M3", (40, 24)), "d.weight_scale": ("BF16", (3, 2)),
             "e.weight": ("F8_E4M3", (40, 24)), "e.weight_scale": ("F32", (1,))}
    found = find_fp8_weights(specs, ct)
    assert [(s.strategy, s.block, s.scale_dtype) for s in found.values()] == [
        ("channel", None, "BF16"), ("block", (16, 16), "BF16"), ("tensor", None, "F32")]


@pytest.mark.parametrize("specs, message", [
    ({"a.weight": ("F8_E4M3", (36, 32))}, "F8_E4M3 tensor a.weight has no a.weight_scale_inv"),
    ({"a.weight": ("F8_E4M3", (36, 32)), "a.weight_scale_inv": ("F32", (4, 4))},
     "scale a.weight_scale_inv has shape \\[4, 4\\] but weight a.weight \\[36, 32\\] needs \\[5, 4\\] \\(block \\[8, 8\\]\\)"),
    ({"a.weight": ("F8_E4M3", (36, 32)), "a.weight_scale_inv": ("I32", (5, 4))}, "scale a.weight_scale_inv is I32"),
    ({"a.weight": ("F8_E4M3", (2, 36, 32)), "a.weight_scale_inv": ("F32", (2, 5, 4))}, "weight a.weight has shape \\[2, 36, 32\\]"),
    ({"a.weight": ("F8_E5M2", (36, 32)), "a.weight_scale_inv": ("F32", (5, 4))}, "weight a.weight is F8_E5M2"),
])
def test_find_fp8_weights_refuses_broken_layouts(specs: dict, message: str) -> None:
    with pytest.raises(AdapterToolError, match=f"^model.safetensors: .*{message}"):
        find_fp8_weights(specs, FP8_CONFIG, source="model.safetensors")


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -1e-3, 1e36])
def test_dequantize_refuses_bad_scales(bad: float) -> None:
    scheme, q, scale = _stored("block8-36x32")
    scale[2, 1] = bad
    with pytest.raises(AdapterToolError, match="^src: FP8 scale m.weight_scale_inv holds a scale that is NaN"):
        dequantize_fp8(q, scale, scheme, source="src")
    q2, old = _stored("ue8m0-e8m0-37x29")[1:]
    old.view(torch.uint8)[0, 0] = 255  # NaN in E8M0
    with pytest.raises(AdapterToolError, match="m.weight_scale_inv holds a scale that is NaN"):
        requantize_fp8(torch.zeros(37, 29), q2, old, CASES["ue8m0-e8m0-37x29"][0])


def test_dequantize_refuses_tensors_that_do_not_fit_the_scheme() -> None:
    scheme, q, scale = _stored("block8-36x32")
    with pytest.raises(AdapterToolError, match="scale m.weight_scale_inv has shape \\[4, 4\\] but weight m.weight"):
        dequantize_fp8(q, scale[:4], scheme)
    with pytest.raises(AdapterToolError, match="weight m.weight is torch.bfloat16"):
        dequantize_fp8(q.to(torch.bfloat16), scale, scheme)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_quantize_refuses_nan_and_inf(bad: float) -> None:
    weight = torch.randn(36, 32, generator=_gen(50))
    weight[33, 2] = bad
    with pytest.raises(AdapterToolError, match="^src: tensor m.weight holds NaN or Inf; it cannot be quantised"):
        quantize_fp8(weight, _scheme(), source="src")


def test_scheme_refuses_inconsistent_settings() -> None:
    with pytest.raises(AdapterToolError, match="FP8 weight m.weight: unsupported block None for strategy 'block'"):
        _scheme(block=None)
    with pytest.raises(AdapterToolError, match="unsupported scale dtype F8_E8M0 with scale_fmt 'float'"):
        _scheme(scale_dtype="F8_E8M0")
