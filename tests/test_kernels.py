"""The `vica2_fused` Triton attention (kernels_vica2.py) against float64 references and against SDPA.

The kernels run under Triton's CPU interpreter, which must be switched on before `triton` itself is imported
(Triton decorates its own `tl` library, and ours, at import). This module sets `TRITON_INTERPRET=1` before
importing anything; when another test module of the same session imported triton first, the in-process
kernel tests skip and `test_kernel_tests_in_a_fresh_interpreter` runs them in a child pytest instead. Shapes
are tiny because the interpreter executes every program in Python. On a CUDA machine,
`TRITON_INTERPRET=0 pytest tests/test_kernels.py` runs the same tests on the compiled kernels and GPU tensors.
Tolerances, relative to the largest reference value:

    fp32 1e-5 (outputs) / 2e-5 (gradients);  fp16 2e-3 / 4e-3;  bf16 1.6e-2 / 3e-2

An fp16 / bf16 result rounded once is off by up to 2^-11 / 2^-8 of that scale; gradients also round P and dS to
the input dtype before their matmuls, as on the GPU. Measured: the kernels' errors are those of torch's own SDPA
in the same dtype (fp16 3e-4 / 6e-4, bf16 5e-3 / 9e-3, fp32 1e-7 / 2e-7 on the 56-dim causal GQA case).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

if "triton" not in sys.modules:  # it only takes effect before triton's first import (and must then stay set)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vica2 import kernels_vica2 as kernels  # noqa: E402


try:
    import triton  # noqa: F401
except ImportError:
    triton = None

# False when triton is missing, or was imported (by another test module) before TRITON_INTERPRET was set.
INTERPRETER_IN_PROCESS = triton is not None and kernels.KERNELS_INTERPRETED
kernels.register_vica2_attention()  # (modeling_vica2 does this at import; these tests may run before it is imported)

from transformers import Sam2HieraDetConfig  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import sdpa_mask  # noqa: E402
from transformers.models.sam2.modeling_sam2 import Sam2MultiScaleBlock  # noqa: E402

from conftest import REPO_ROOT, random_video_pixels, tiny_model  # noqa: E402


requires_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")
# On a GPU machine, `TRITON_INTERPRET=0 pytest tests/test_kernels.py` runs the same tests on the compiled kernels.
ON_CUDA = triton is not None and not kernels.KERNELS_INTERPRETED and torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
if ON_CUDA:  # fp32 references in IEEE fp32, as on the CPU (cuDNN convolutions default to TF32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
if triton is None:
    _NO_KERNELS = "triton is not installed"
elif os.environ.get("TRITON_INTERPRET") == "0":
    _NO_KERNELS = "TRITON_INTERPRET=0 and no CUDA device"
else:
    _NO_KERNELS = (
        "triton was imported before TRITON_INTERPRET was set; test_kernel_tests_in_a_fresh_interpreter runs these"
    )
requires_kernels = pytest.mark.skipif(not (INTERPRETER_IN_PROCESS or ON_CUDA), reason=_NO_KERNELS)

TOLERANCE = {  # (outputs, gradients), relative to the largest reference value
    torch.float32: (1e-5, 2e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 3e-2),
}
FP32_OUT, FP32_GRAD = TOLERANCE[torch.float32]


def on_device(tensor: torch.Tensor, dtype: torch.dtype | None = None, grad: bool = False) -> torch.Tensor:
    """A (CPU-generated, so seeds give the same values everywhere) tensor moved to the kernels' device."""
    tensor = tensor.to(DEVICE, dtype)
    return tensor.requires_grad_() if grad else tensor


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str = ""):
    scale = expected.abs().max().item()
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tolerance * max(scale, 1e-6), f"{what}: max error {error:.3g} > {tolerance:g} x {scale:.3g}"


@pytest.fixture
def kernel_calls():
    kernels.reset_kernel_call_counts()
    yield kernels.KERNEL_CALLS


@pytest.fixture
def fast_interpreter():
    """Switch off the interpreter's int32-overflow sanitizer for the whole-model tests (it doubles their
    runtime); the kernel-level tests keep it on, so index overflows are still caught there."""
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    interpreter.interpreter_builder.options = interpreter.InterpreterOptions(sanitize_overflow=False)
    yield
    interpreter.interpreter_builder.options = options


# ============================================================================================== references
def reference_attention(q, k, v, causal=False, causal_offset=0, key_valid=None, mask=None, scale=None):
    """float64 attention -> (B, L_q, H_q, D); rows with no allowed key give 0, as SDPA does."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril(causal_offset)
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :]
    if mask is not None:
        allowed &= mask
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2)


def hiera_block(stage, block, total_block, windows, global_blocks=(), dims=(8, 16, 32, 64), heads=(1, 2, 2, 4)):
    """A library `Sam2MultiScaleBlock` with random weights and biases (SDPA backend)."""
    config = Sam2HieraDetConfig(
        hidden_size=dims[0],
        embed_dim_per_stage=list(dims),
        num_attention_heads_per_stage=list(heads),
        window_size_per_stage=list(windows),
        global_attention_blocks=list(global_blocks),
        blocks_per_stage=[1, 2, 2, 1],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    module = Sam2MultiScaleBlock(config, stage, block, total_block)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.3)
    return module.to(DEVICE)


def fused_copy(module):
    """A fused block in place of a copy of `module`: a new instance sharing the copy's parameters (no class swap)."""
    library = copy.deepcopy(module)
    library.attn.config = copy.deepcopy(module.attn.config)
    library.attn.config._attn_implementation = kernels.ATTENTION_NAME
    holder = torch.nn.Sequential(library)
    assert kernels.use_fused_hiera_blocks(holder) == 1
    fused = holder[0]
    assert type(library) is type(module) and type(fused) is kernels.Vica2FusedHieraBlock
    assert all(a is b for a, b in zip(fused.parameters(), library.parameters(), strict=True))
    return fused


# ============================================================================================== plain sequences
SEQUENCE_CASES = [
    # head_dim, q heads, kv heads, L_q, L_k, causal, left padding, dtype
    (16, 4, 4, 40, 40, False, False, torch.float32),
    (56, 4, 1, 33, 33, True, True, torch.float32),
    (72, 7, 1, 20, 45, False, True, torch.float32),
    (128, 8, 2, 24, 24, True, True, torch.float32),
    (80, 2, 2, 17, 30, True, False, torch.float32),
    (20, 2, 1, 9, 13, True, True, torch.float32),  # strides only 4-aligned: ALIGN 4
    (17, 3, 3, 11, 7, False, True, torch.float32),  # odd strides: ALIGN 1
    (128, 7, 1, 1, 37, True, True, torch.float32),  # one query over a left-padded cache (a padded decode step)
    (56, 4, 1, 33, 33, True, True, torch.float16),
    (128, 7, 1, 18, 40, True, True, torch.bfloat16),
]


@requires_kernels
@pytest.mark.parametrize("head_dim,q_heads,kv_heads,len_q,len_k,causal,left_pad,dtype", SEQUENCE_CASES)
def test_sequence_attention_matches_float64(head_dim, q_heads, kv_heads, len_q, len_k, causal, left_pad, dtype,
                                            kernel_calls):
    generator = torch.Generator().manual_seed(head_dim + len_q)
    q = on_device(torch.randn(2, q_heads, len_q, head_dim, generator=generator), dtype, grad=True)
    k = on_device(torch.randn(2, kv_heads, len_k, head_dim, generator=generator), dtype, grad=True)
    v = on_device(torch.randn(2, kv_heads, len_k, head_dim, generator=generator), dtype, grad=True)
    key_valid = None
    if left_pad:
        key_valid = torch.ones(2, len_k, dtype=torch.bool, device=DEVICE)
        key_valid[1, : len_k // 3] = False  # row 1 is left-padded: its first queries see no key under causality
    offset = len_k - len_q  # bottom-right alignment, as a KV cache gives
    # 16-wide tiles: several query and key blocks, partial last tiles, the causal diagonal inside a tile.
    out = kernels.flash_attention(
        q, k, v, causal=causal, causal_offset=offset, key_valid=key_valid, block_m=16, block_n=16
    )
    reference = reference_attention(q, k, v, causal, offset, key_valid)
    out_tol, grad_tol = TOLERANCE[dtype]
    assert out.shape == (2, len_q, q_heads, head_dim) and out.dtype == dtype
    assert_relative_close(out, reference, out_tol, "output")

    grad = on_device(torch.randn(out.shape, generator=generator), dtype)
    actual = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.autograd.grad(reference, (q, k, v), grad.double())
    for name, a, e in zip(("dq", "dk", "dv"), actual, expected):
        assert a.dtype == dtype
        assert_relative_close(a, e, grad_tol, name)
    assert kernel_calls["attention_forward"] == 1 and kernel_calls["attention_backward"] == 1


@requires_triton
def test_head_dim_lane_split():
    """Head dims between powers of two run as two lane tiles when that is narrower (SigLIP's 72 as 64 + 16): the
    72 / 80 sequence cases and the 40-wide window test above go through the split path, 56 / 128 do not."""
    def blocks(head_dim):
        return kernels._Problem(windowed=False, pool=1, num_heads=1, num_kv_heads=1, n_seq=1, len_q=1, len_k=1,
                                head_dim=head_dim, scale=1.0).head_blocks

    expected = {16: (16, 0), 17: (32, 0), 20: (32, 0), 40: (32, 16), 56: (64, 0), 64: (64, 0), 72: (64, 16),
                80: (64, 16), 96: (64, 32), 100: (128, 0), 128: (128, 0)}
    assert {d: blocks(d) for d in expected} == expected


def test_stride_alignment_hint():
    """The ALIGN the launchers pass is the largest power of two up to 16 dividing every stride (strides are then
    passed divided by it), so the hint can never claim more than the tensors have."""
    assert kernels._stride_alignment((8 * 729 * 72, 72, 0, 8 * 72), (1152, 72, 0, 1152)) == 8
    assert kernels._stride_alignment((4096 * 128, 128, 0, 128)) == 16
    assert kernels._stride_alignment((60, 20, 0, 40)) == 4
    assert kernels._stride_alignment((51, 17, 0, 17)) == 1
    assert kernels._stride_alignment((2**31, 128, 0, 128)) == 1  # int64 strides are passed undivided


@requires_kernels
def test_dense_mask_and_strided_inputs(kernel_calls):
    """A pattern that is not causal-plus-padding goes through the dense mask path; (B, L, H, D) views work."""
    generator = torch.Generator().manual_seed(3)
    q = on_device(torch.randn(2, 21, 4, 32, generator=generator)).transpose(1, 2).requires_grad_()  # a view
    k = on_device(torch.randn(2, 21, 2, 32, generator=generator)).transpose(1, 2).requires_grad_()
    v = on_device(torch.randn(2, 21, 2, 32, generator=generator)).transpose(1, 2).requires_grad_()
    mask = on_device(torch.rand(2, 1, 21, 21, generator=generator) > 0.4)
    mask[0, 0, 5] = False  # a row with no key
    out = kernels.flash_attention(q, k, v, mask=mask, block_m=16, block_n=16)
    reference = reference_attention(q, k, v, mask=mask)
    assert_relative_close(out, reference, FP32_OUT, "output")
    assert out[0, 5].abs().max() == 0
    grad = on_device(torch.randn(out.shape, generator=generator))
    actual = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.autograd.grad(reference, (q, k, v), grad.double())
    for name, a, e in zip(("dq", "dk", "dv"), actual, expected):
        assert_relative_close(a, e, FP32_GRAD, name)


# ============================================================================================== the interface
def _module(causal: bool, groups: int):
    return SimpleNamespace(is_causal=causal, num_key_value_groups=groups, training=False)


MASK_CASES = {
    # name: (L_q, L_k, padding, mask kind) with the mask as sdpa_mask builds it for a Qwen2 layer
    "causal_no_padding": (19, 19, False, "none"),
    "causal_left_padding": (19, 19, True, "compact"),
    "decode_one_token_left_padding": (1, 23, True, "compact"),
    "two_token_step_left_padding": (2, 23, True, "compact"),  # e.g. assisted decoding's candidate tokens
    "chunked_prefill_with_cache": (6, 23, False, "compact"),
    "sliding_window": (19, 19, True, "dense"),
}


@requires_kernels
@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_interface_matches_sdpa(case, kernel_calls):
    """`vica2_fused_attention_forward` with `sdpa_mask` masks equals `sdpa_attention_forward` (Qwen2-style GQA)."""
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

    len_q, len_k, padding, kind = MASK_CASES[case]
    generator = torch.Generator().manual_seed(len_q * 31 + len_k)
    q = on_device(torch.randn(2, 4, len_q, 16, generator=generator))
    k = on_device(torch.randn(2, 2, len_k, 16, generator=generator))
    v = on_device(torch.randn(2, 2, len_k, 16, generator=generator))
    padding_mask = torch.ones(2, len_k, dtype=torch.bool, device=DEVICE)
    if padding:
        padding_mask[1, :5] = False
    mask_function = causal_mask_function
    if kind == "dense":
        mask_function = and_masks(causal_mask_function, sliding_window_overlay(6))
    mask = sdpa_mask(
        batch_size=2, q_length=len_q, kv_length=len_k, q_offset=len_k - len_q, mask_function=mask_function,
        attention_mask=padding_mask if padding else None, device=DEVICE,
    )
    assert (mask is None) == (kind == "none")
    if mask is not None:
        key_valid, _, _, dense = kernels._split_mask(mask)
        assert (dense is None) == (kind == "compact")
    module = _module(causal=True, groups=2)
    out, weights = kernels.vica2_fused_attention_forward(module, q, k, v, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert weights is None and out.shape == expected.shape == (2, len_q, 4, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert kernel_calls["attention_forward"] == 1 and kernel_calls["fallback"] == 0


@requires_kernels
def test_interface_sends_unpadded_one_token_steps_to_sdpa(kernel_calls):
    """An unpadded decode step (L_q = 1, no mask: flash with GQA and split-KV in SDPA) is SDPA's by design, without
    a log line; a padded one (the decode case of MASK_CASES) stays on the kernel."""
    generator = torch.Generator().manual_seed(9)
    q = on_device(torch.randn(2, 4, 1, 16, generator=generator))
    k, v = (on_device(torch.randn(2, 2, 23, 16, generator=generator)) for _ in range(2))
    module = _module(causal=True, groups=2)
    out, _ = kernels.vica2_fused_attention_forward(module, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, None, scaling=0.25)[0])
    assert dict(kernel_calls) == {"decode_sdpa": 1}


@requires_kernels
def test_interface_non_causal_module_and_unsupported_kwargs(kernel_calls):
    generator = torch.Generator().manual_seed(5)
    q, k, v = (on_device(torch.randn(2, 2, 13, 72, generator=generator)) for _ in range(3))
    module = _module(causal=False, groups=1)  # SigLIP: is_causal=False, passed explicitly as well
    out, _ = kernels.vica2_fused_attention_forward(module, q, k, v, None, is_causal=False)
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, None, is_causal=False)[0])
    assert kernel_calls["attention_forward"] == 1
    # Attention dropout is not implemented: SDPA takes over (counted, logged once).
    kernels.vica2_fused_attention_forward(module, q, k, v, None, dropout=0.5)
    assert kernel_calls["fallback"] == 1 and kernel_calls["attention_forward"] == 1


# ============================================================================================== Hiera
HIERA_CASES = {
    # name: (block factory arguments, grid size); windows overhanging the grid are zero-padded
    "window_4_pads_10_to_12": (dict(stage=0, block=0, total_block=0, windows=(4, 4, 4, 4)), 10),
    "q_pool_window_8_pads_12_to_16": (dict(stage=1, block=0, total_block=1, windows=(8, 4, 4, 4)), 12),
    "q_pool_window_4_no_padding": (dict(stage=1, block=0, total_block=1, windows=(4, 4, 4, 4)), 8),
    "global_block": (dict(stage=0, block=0, total_block=0, windows=(4, 4, 4, 4), global_blocks=(0,)), 6),
    # The 7B stage-4 entry in miniature: a window 14 q-pool block over a grid smaller than the window.
    "q_pool_window_14_over_grid_4": (dict(stage=3, block=0, total_block=5, windows=(8, 4, 14, 7)), 4),
}


@requires_kernels
@pytest.mark.parametrize("case", sorted(HIERA_CASES))
def test_fused_hiera_block_matches_library_float64(case, kernel_calls):
    """The fused block in fp32 against the library block in float64: output, input and parameter gradients
    (the qkv bias gradient includes the padded positions' keys and values)."""
    arguments, grid = HIERA_CASES[case]
    library = hiera_block(**arguments)
    fused = fused_copy(library)
    reference = copy.deepcopy(library).double()
    x = on_device(torch.randn(2, grid, grid, library.dim, generator=torch.Generator().manual_seed(grid)), grad=True)
    x64 = x.detach().double().requires_grad_()
    out, expected = fused(x), reference(x64)
    assert out.shape == expected.shape
    assert_relative_close(out, expected, FP32_OUT, "output")
    grad = on_device(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    out.backward(grad)
    expected.backward(grad.double())
    assert_relative_close(x.grad, x64.grad, FP32_GRAD, "input gradient")
    for (name, param), reference_param in zip(fused.named_parameters(), reference.parameters()):
        assert_relative_close(param.grad, reference_param.grad, FP32_GRAD, name)
    assert kernel_calls["hiera_window_forward"] == 1 and kernel_calls["hiera_window_backward"] == 1
    assert kernel_calls["attention_forward"] == 0


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_hiera_block_half_precision(dtype, kernel_calls):
    library = hiera_block(stage=1, block=0, total_block=1, windows=(8, 4, 4, 4))
    fused = fused_copy(library).to(dtype)
    reference = copy.deepcopy(library).double()
    x = on_device(torch.randn(1, 12, 12, library.dim, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        out, expected = fused(x.to(dtype)), reference(x.double())
    assert out.dtype == dtype
    # The block's own layers (layer norms, linears, GELU) round to `dtype` too: twice the kernel's margin.
    assert_relative_close(out, expected, 2 * TOLERANCE[dtype][0], "output")
    assert kernel_calls["hiera_window_forward"] == 1


def _windowed_reference(qkv, bias, heads, window, pool, scale, out_hw):
    """The library's steps on a qkv grid: pad with the bias (what zero inputs project to), partition, split
    heads, max-pool queries, attend (float64), un-partition, crop."""
    from transformers.models.sam2.modeling_sam2 import do_pool, window_partition, window_unpartition

    batch, height, width, three_c = qkv.shape
    channels = three_c // 3
    padded = F.pad(qkv.double() - bias.double(), (0, 0, 0, (-width) % window, 0, (-height) % window)) + bias.double()
    windows, pad_hw = window_partition(padded, window)
    n, size = windows.shape[0], window * window
    q, k, v = windows.reshape(n, size, 3, heads, -1).unbind(2)
    if pool > 1:
        q = do_pool(q.reshape(n, window, window, -1), (pool, pool)).reshape(n, -1, heads, channels // heads)
    out = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    out = out.reshape(n, window // pool, window // pool, channels)
    pooled_pad = tuple(math.ceil(s / (window // pool)) * (window // pool) for s in out_hw)
    return window_unpartition(out, window // pool, pooled_pad, out_hw)


@requires_kernels
@pytest.mark.parametrize("pool", [1, 2])
def test_hiera_window_attention_multi_tile(pool, kernel_calls):
    """8x8 windows over a 12x12 grid in 32-wide (or 16 pooled) tiles: several tiles per window, with a head dim
    split into two lane tiles."""
    generator = torch.Generator().manual_seed(pool)
    # head_dim 40 runs as a 32-lane tile plus a 16-lane tail (8 lanes masked).
    qkv = on_device(torch.randn(1, 12, 12, 3 * 2 * 40, generator=generator), grad=True)
    bias = on_device(torch.randn(3 * 2 * 40, generator=generator), grad=True)
    out_hw = (12 // pool, 12 // pool)
    out = kernels.hiera_window_attention(qkv, bias, 2, (8, 8), pool, 0.2, out_hw, block_m=32 // pool, block_n=32)
    qkv64, bias64 = qkv.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    expected = _windowed_reference(qkv64, bias64, 2, 8, pool, 0.2, out_hw)
    assert_relative_close(out, expected, FP32_OUT, "output")
    grad = on_device(torch.randn(out.shape, generator=generator))
    actual = torch.autograd.grad(out, (qkv, bias), grad)
    reference = torch.autograd.grad(expected, (qkv64, bias64), grad.double())
    assert_relative_close(actual[0], reference[0], FP32_GRAD, "qkv gradient")
    assert_relative_close(actual[1], reference[1], FP32_GRAD, "bias gradient")
    assert kernel_calls["hiera_window_forward"] == 1 and kernel_calls["hiera_window_backward"] == 1


@requires_kernels
def test_fused_block_defers_to_library_where_it_does_not_apply(kernel_calls):
    """An odd window under a q-pool block is left to the library's own forward, which then routes its attention
    through the `vica2_fused` interface: the sequence kernel with L_q != L_k."""
    library = hiera_block(stage=1, block=0, total_block=1, windows=(7, 4, 4, 4))
    fused = fused_copy(library)
    # A 7x7 grid in one 7x7 window pools to 3x3: odd sizes, which the fused path leaves to the library.
    x = on_device(torch.randn(1, 7, 7, library.dim, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), library(x), rtol=1e-5, atol=1e-5)
    assert kernel_calls["hiera_window_forward"] == 0 and kernel_calls["attention_forward"] == 1
    # A later switch to another backend is honoured too.
    fused.attn.config._attn_implementation = "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(fused(x), library(x))
    assert kernel_calls["attention_forward"] == 1


@requires_kernels
def test_window_count_folds_into_grid_axis_0(monkeypatch):
    """70,225 windows (more than CUDA's 65,535 limit on grid axes 1 and 2) launch as one axis-0 grid."""
    launches = []

    class RecordingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kernels, "_attention_forward_kernel", RecordingKernel())
    qkv = torch.zeros(1, 265, 265, 3 * 16)
    kernels.hiera_window_attention(qkv, None, 1, (1, 1), 1, 0.25, (265, 265))
    assert launches == [(265 * 265,)]


# ============================================================================================== whole model
def _video_batch(model):
    """Row 0: a video and text; row 1: text only, left-padded (its padding queries see no key at all)."""
    config = model.config
    siglip, hiera = (on_device(pixels) for pixels in random_video_pixels(config, num_frames=2, seed=1))
    with torch.no_grad():
        num_video_tokens = model.get_video_features(siglip, hiera)[0].shape[0]
    row0 = [5, 6, 7] + [config.video_token_id] * num_video_tokens + [8, 9, 10, 11]
    row1 = [12, 13, 14, 15, 16]
    pad = len(row0) - len(row1)
    input_ids = torch.tensor([row0, [0] * pad + row1])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :pad] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=siglip,
                 hiera_pixel_values_videos=hiera, labels=labels)
    return {name: on_device(tensor) for name, tensor in batch.items()}


@requires_kernels
def test_tiny_vica2_matches_sdpa_logits_loss_and_gradients(tmp_path, kernel_calls, fast_interpreter):
    from vica2.modeling_vica2 import Vica2ForConditionalGeneration

    reference = tiny_model(attn_implementation="sdpa")
    reference.save_pretrained(tmp_path)
    model = Vica2ForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="vica2_fused", dtype=torch.float32
    ).to(DEVICE)
    reference.to(DEVICE)
    config = model.config
    for sub in (config.text_config, config.vision_config, config.hiera_config):
        assert sub._attn_implementation == "vica2_fused"
    assert all(type(block) is kernels.Vica2FusedHieraBlock for block in model.model.hiera_tower.blocks)
    assert model.state_dict().keys() == reference.state_dict().keys()

    batch = _video_batch(reference)
    model.train(), reference.train()
    kernels.reset_kernel_call_counts()
    out = model(**batch)
    expected = reference(**batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], expected.logits[valid], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.loss.backward()
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        assert (param.grad is None) == (ref_param.grad is None), name
        if param.grad is not None:
            torch.testing.assert_close(param.grad, ref_param.grad, rtol=1e-4, atol=1e-6, msg=name)
    calls = dict(kernel_calls)
    # Qwen2 (2 layers) and SigLIP (2 layers) through the sequence kernel, all 6 Hiera blocks fused; no fallback.
    assert calls["attention_forward"] == 4 and calls["attention_backward"] == 4, calls
    assert calls["hiera_window_forward"] == 6 and calls["hiera_window_backward"] == 6, calls
    assert calls.get("fallback", 0) == 0


@requires_kernels
def test_tiny_vica2_generation_and_per_sub_config_selection(kernel_calls, fast_interpreter):
    """Greedy decoding of a left-padded batch (decode steps carry (B, 1, 1, L_k) masks) matches SDPA; the
    backend can be chosen per sub-config."""
    reference = tiny_model(attn_implementation="sdpa").to(DEVICE)
    model = tiny_model(attn_implementation="sdpa").to(DEVICE)
    model.set_attn_implementation({"text_config": "vica2_fused", "vision_config": "sdpa", "hiera_config": "sdpa"})
    assert model.config.text_config._attn_implementation == "vica2_fused"
    assert model.config.vision_config._attn_implementation == "sdpa"
    batch = _video_batch(reference)
    batch.pop("labels")
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        tokens = model.generate(**batch, **settings)
        expected = reference.generate(**batch, **settings)
    torch.testing.assert_close(tokens, expected)
    # Prefill and both decode steps of both Qwen2 layers ran the kernel (the left padding keeps decode steps there).
    assert kernel_calls["attention_forward"] == 2 * 3 and kernel_calls.get("decode_sdpa", 0) == 0, dict(kernel_calls)
    assert kernel_calls["hiera_window_forward"] == 0 and kernel_calls.get("fallback", 0) == 0


# ============================================================================================== no Triton / no GPU
def test_check_imports_passes_without_triton(monkeypatch):
    """Remote code imports every file's top-level packages: triton must be guarded in each file."""
    from transformers.dynamic_module_utils import check_imports

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    for name in ("kernels_vica2.py", "modeling_vica2.py"):
        check_imports(REPO_ROOT / name)


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(env)
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "tests"), environment.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=300
    )


FALLBACK_SCRIPT = """
    import json, sys
    if {hide_triton}:
        sys.modules["triton"] = None  # as on a machine without triton
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from vica2 import kernels_vica2 as kernels
    from conftest import tiny_model
    from types import SimpleNamespace
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    out, _ = kernels.vica2_fused_attention_forward(module, q, k, v, None)
    out2, _ = kernels.vica2_fused_attention_forward(module, q, k, v, None)
    same = torch.equal(out, sdpa_attention_forward(module, q, k, v, None)[0])
    model = tiny_model(attn_implementation="vica2_fused")  # loads and runs without kernels
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    print(json.dumps(dict(same=same, finite=bool(logits.isfinite().all()), calls=kernels.kernel_call_counts())))
"""


@pytest.mark.parametrize("hide_triton", [False, True], ids=["cpu_without_interpreter", "triton_missing"])
def test_fallback_to_sdpa(hide_triton):
    """Without TRITON_INTERPRET on CPU tensors, or without triton at all, attention is SDPA's, logged once."""
    result = _run_python(FALLBACK_SCRIPT.format(hide_triton=hide_triton), {"TRANSFORMERS_VERBOSITY": "warning"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same"] and report["finite"]
    assert report["calls"]["fallback"] >= 2 and "attention_forward" not in report["calls"]
    reason = "Triton is not installed" if (hide_triton or triton is None) else "need CUDA tensors"
    assert result.stderr.count("vica2_fused attention falls back to SDPA") == 1, result.stderr[-3000:]
    assert reason in result.stderr


@requires_triton
def test_kernels_compile_for_sm90():
    """The kernels compile for an H100 with the tile table and the specialisation real launches get (no GPU
    needed: Triton's bundled ptxas and cuobjdump); see the benchmark's --compile-only."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend registered here")
    script = REPO_ROOT / "benchmarks" / "bench_attention.py"
    result = subprocess.run(
        [sys.executable, str(script), "--compile-only", "--quick"], capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("attention_")]
    assert len(rows) == 9, result.stdout  # 3 shapes (Hiera window, SigLIP, Qwen2) x 3 kernels, bf16
    for row in rows:
        usage = dict(re.findall(r"(REG|STACK|wgmma|cp\.async):(\d+)", row))
        assert "STACK" in usage, f"no register report (cuobjdump missing from triton?): {row}"
        # What the tile table and the stride hints are for: no register spills, loads pipelined with
        # asynchronous copies (SigLIP's 72-wide rows only qualify through the ALIGN hint), tensor-core matmuls.
        assert usage["STACK"] == "0", row
        assert int(usage["cp.async"]) > 0, row
        assert int(usage["wgmma"]) > 0, row


# The tests above that need the interpreter (not the subprocess-based ones, which run here either way).
NOT_INTERPRETER_TESTS = "not fallback_to_sdpa and not compile_for_sm90 and not check_imports and not fresh_interpreter"


@requires_triton
@pytest.mark.skipif(INTERPRETER_IN_PROCESS or ON_CUDA, reason="the kernel tests run in this process")
def test_kernel_tests_in_a_fresh_interpreter():
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", NOT_INTERPRETER_TESTS],
        capture_output=True, text=True, env=environment, cwd=REPO_ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]
