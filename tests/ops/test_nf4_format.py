"""fastft.nf4 quantize / dequantize / NF4State against bitsandbytes' bytes and formulas."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastft import nf4
from fastft.reference import nf4 as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((128, 96), (7, 13), (33, 77), (1, 5), (3,), (2, 3, 40))


def test_tables_match_bitsandbytes():
    assert torch.equal(ref.dynamic_map(), bnbf.create_dynamic_map())
    for quant_type in ref.QUANT_TYPES:
        assert torch.equal(ref.lut(quant_type), bnbf.get_4bit_type(quant_type, device="cpu"))


@pytest.mark.parametrize("quant_type", ref.QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", ref.BLOCKSIZES)
def test_quantize_bytes_equal_bitsandbytes(backend, quant_type, dtype, blocksize):
    for shape in SHAPES:
        weight = torch.randn(shape).to(dtype)
        weight.view(-1)[:3] = torch.tensor([0.0, -0.0, 0.0])
        packed, state = nf4.quantize(weight, blocksize, quant_type=quant_type)
        bnb_packed, bnb_state = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
        assert packed.shape == bnb_packed.shape and packed.dtype == torch.uint8
        assert torch.equal(packed, bnb_packed), (shape, blocksize)
        assert torch.equal(state.absmax, bnb_state.absmax)
        dense = nf4.dequantize(packed, state)
        assert dense.dtype == dtype and dense.shape == weight.shape
        expected = ref.dequantize_4bit_ref(bnb_packed, bnb_state.absmax, bnb_state.code, blocksize, shape, dtype)
        assert torch.equal(dense, expected)


@pytest.mark.parametrize("blocksize", (64, 256))
def test_dequantize_equals_bitsandbytes_where_its_cpu_kernel_is_right(backend, blocksize):
    for dtype in DTYPES:
        weight = torch.randn(96, 512).to(dtype)  # K % blocksize == 0: bnb's CPU dequant is correct here
        bnb_packed, bnb_state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=True)
        state = nf4.NF4State.from_bnb(bnb_state)
        assert torch.equal(nf4.dequantize(bnb_packed, state), bnbf.dequantize_4bit(bnb_packed, bnb_state))


@pytest.mark.parametrize("quant_type", ref.QUANT_TYPES)
@pytest.mark.parametrize("shape", ((300, 257), (64, 64), (1000,)))
def test_double_quant_matches_bitsandbytes_after_dequantization(backend, quant_type, shape):
    weight = torch.randn(shape)
    packed, state = nf4.quantize(weight, 64, double_quant=True, quant_type=quant_type)
    bnb_packed, bnb_state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type=quant_type)
    assert torch.equal(packed, bnb_packed)
    assert state.nested_offset == float(bnb_state.offset)
    assert torch.equal(state.nested_absmax, bnb_state.state2.absmax)
    ours = ref.nested_absmax_ref(state.absmax, state.nested_absmax, state.nested_code, state.nested_offset)
    theirs = bnbf.dequantize_blockwise(bnb_state.absmax, bnb_state.state2) + bnb_state.offset
    assert torch.equal(ours, theirs) or (ours != theirs).float().mean() < 0.01  # codes may differ on a few blocks
    # With bnb's own statistics, the dequantized weight is bit-identical.
    theirs_state = nf4.NF4State.from_bnb(bnb_state)
    expected = ref.dequantize_4bit_ref(bnb_packed, theirs, bnb_state.code, 64, shape, torch.float32)
    assert torch.equal(nf4.dequantize(bnb_packed, theirs_state), expected)


def test_zero_block_and_odd_tail():
    weight = torch.zeros(3, 43)
    weight[2, 5] = 1.5
    packed, state = nf4.quantize(weight, 32)
    assert packed.shape == ((3 * 43 + 1) // 2, 1)
    assert packed[0, 0].item() == 0x77 and state.absmax[0].item() == 0.0
    assert packed[-1, 0].item() & 0xF == 7  # padding nibble is the code of 0.0
    assert torch.equal(nf4.dequantize(packed, state), weight * (weight.abs() == 1.5))


@settings(max_examples=25, deadline=None)
@given(numel=st.integers(1, 3000), blocksize=st.sampled_from(ref.BLOCKSIZES[:4]), double=st.booleans(),
       quant_type=st.sampled_from(ref.QUANT_TYPES), dtype=st.sampled_from(DTYPES))
def test_native_quantize_and_dequantize_equal_reference(numel, blocksize, double, quant_type, dtype):
    from fastft.ops import use_backend

    weight = (torch.randn(numel) * 3).to(dtype)
    with use_backend("native"):
        packed, state = nf4.quantize(weight, blocksize, double, quant_type)
        dense = nf4.dequantize(packed, state)
    with use_backend("reference"):
        packed_ref, state_ref = nf4.quantize(weight, blocksize, double, quant_type)
        dense_ref = nf4.dequantize(packed, state)
    assert torch.equal(packed, packed_ref) and torch.equal(state.absmax, state_ref.absmax)
    assert torch.equal(dense, dense_ref)


def test_state_converts_to_and_from_bitsandbytes_without_copies():
    weight = torch.randn(64, 128)  # rows of whole blocks: bitsandbytes' AVX-512 CPU dequantize is wrong otherwise
    packed, state = nf4.quantize(weight, 64, double_quant=True)
    bnb_state = state.to_bnb()
    assert bnb_state.absmax.data_ptr() == state.absmax.data_ptr()
    assert bnb_state.state2.absmax.data_ptr() == state.nested_absmax.data_ptr()
    assert torch.equal(bnbf.dequantize_4bit(packed, bnb_state), nf4.dequantize(packed, state))
    back = nf4.NF4State.from_bnb(bnb_state)
    assert back.absmax.data_ptr() == state.absmax.data_ptr() and back.nested_offset == state.nested_offset


@pytest.mark.parametrize("double_quant", (False, True))
def test_state_dict_has_bitsandbytes_keys_and_values(double_quant):
    weight = torch.randn(64, 96)
    packed, state = nf4.quantize(weight, 64, double_quant=double_quant)
    ours = state.state_dict()
    theirs = state.to_bnb().as_dict(packed=True)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    loaded = nf4.NF4State.from_state_dict(ours)
    assert torch.equal(nf4.dequantize(packed, loaded), nf4.dequantize(packed, state))


def test_dequantize_into_out_reuses_the_buffer(backend):
    weight = torch.randn(33, 77)
    packed, state = nf4.quantize(weight, 64, double_quant=True)
    for dtype in DTYPES:
        out = torch.full((33, 77), float("nan"), dtype=dtype)
        result = nf4.dequantize(packed, state, out=out)
        assert result is out and torch.equal(out, nf4.dequantize(packed, state, dtype))
    torch.library.opcheck(torch.ops.fastft.nf4_dequantize_into.default,
                          (torch.empty(33, 77), packed, *state.op_args()))
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape \(33, 77\)"):
        nf4.dequantize(packed, state, out=torch.empty(77, 33).t())
    with pytest.raises(ValueError, match="out must be a contiguous"):
        nf4.dequantize(packed, state, out=torch.empty(33, 78))


def test_bad_inputs_raise_clear_errors():
    weight = torch.randn(8, 64)
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize(weight, 48)
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize(weight, 8192)
    with pytest.raises(TypeError, match="weight must be a float32"):
        nf4.quantize(weight.to(torch.int32))
    with pytest.raises(ValueError, match="quant_type"):
        nf4.quantize(weight, quant_type="int4")
    bad = weight.clone()
    bad[3, 7] = float("nan")
    bad[5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"2 NaN/Inf values \(first at index \(3, 7\)\)"):
        nf4.quantize(bad)
    packed, state = nf4.quantize(weight)
    with pytest.raises(ValueError, match="packed holds 128 bytes"):
        nf4.dequantize(packed[:128], state)
    with pytest.raises(TypeError, match="packed must be a uint8"):
        nf4.dequantize(packed.float(), state)
    other = nf4.quantize(torch.randn(16, 64))[1]
    with pytest.raises(ValueError, match="packed holds"):
        nf4.dequantize(packed, other)


def test_non_contiguous_or_malformed_state_tensors_are_refused():
    """The kernels read packed codes and statistics as flat arrays: a strided view or a short table would be read
    as garbage (or out of bounds), so every entry point refuses it, naming the tensor."""
    from dataclasses import replace

    from fastft.nn import NF4Linear

    weight = torch.randn(24, 128)
    packed, state = nf4.quantize(weight, 64, double_quant=True)
    strided = torch.empty(packed.shape[0], 2, dtype=torch.uint8)[:, :1]
    strided.copy_(packed)
    x = torch.randn(3, 128)
    for call in (lambda p, s: nf4.dequantize(p, s), lambda p, s: nf4.matmul(x, p, s),
                 lambda p, s: NF4Linear.from_packed(p, s)):
        with pytest.raises(ValueError, match="packed must be contiguous"):
            call(strided, state)
        absmax = torch.empty(state.absmax.numel(), 2, dtype=torch.uint8)[:, 0]
        absmax.copy_(state.absmax)
        with pytest.raises(ValueError, match="state.absmax must be contiguous"):
            call(packed, replace(state, absmax=absmax))
        with pytest.raises(ValueError, match="state.nested_code must be the 256 fp32 values"):
            call(packed, replace(state, nested_code=state.nested_code[:200]))
        with pytest.raises(ValueError, match="state.nested_absmax must be 1 fp32"):
            call(packed, replace(state, nested_absmax=state.nested_absmax.double()))
        with pytest.raises(ValueError, match="state.code must be 16 fp32"):
            call(packed, replace(state, code=state.code[:8]))
        with pytest.raises(ValueError, match="state.nested_offset must be finite"):
            call(packed, replace(state, nested_offset=float("nan")))
    assert torch.equal(nf4.dequantize(strided.contiguous(), state), nf4.dequantize(packed, state))
