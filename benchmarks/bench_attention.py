#!/usr/bin/env python
"""Times the `vica2_fused` Triton attention against torch SDPA (and flash-attn) on ViCA2-7B shapes.

    python benchmarks/bench_attention.py                 # on a CUDA machine; prints the tables of RESULTS.md
    python benchmarks/bench_attention.py --compile-only  # no GPU needed: record the launches the benchmark's
                                                         # shapes make, compile each for sm_90 as Triton would
                                                         # specialise it, report registers, spills, wgmma and
                                                         # cp.async (pipelined load) counts

Attention level (ms, TFLOP/s, forward and forward+backward), for each shape: our kernel, each SDPA backend
that accepts the shape (flash, efficient, cuDNN, math), flash-attn if importable. FLOPs count 4*L_q*L_k*D per
head (halved for causal); forward+backward counts 3.5x the forward. Hiera windows are timed for SDPA on
already-partitioned windows (the favourable case). Then the Hiera blocks of the 7B tower, library module (SDPA)
vs `Vica2FusedHieraBlock`: first the part the fused kernel replaces, from the normed grid to the projected
attention output (window partition/pad, qkv, q-pool, attention, output projection, unpartition: the issue's
target measure), then whole blocks (layer norms, residuals and MLP included), each with the max |difference|.
Targets (issue 6): Hiera windowed / q-pooled blocks >= 1.5x the library module with SDPA; SigLIP and Qwen2
prefill within 1.15x of the best SDPA backend.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Shape:
    name: str
    batch: int
    q_heads: int
    kv_heads: int
    len_q: int
    len_k: int
    head_dim: int
    causal: bool = False
    # Hiera windows: (grid, window, query stride); `batch` is then the number of frames.
    hiera: tuple[int, int, int] | None = None

    def flops(self) -> float:
        return 4.0 * self.batch * self.q_heads * self.len_q * self.len_k * self.head_dim * (0.5 if self.causal else 1.0)


def hiera_shape(name, frames, grid, window, channels, heads, pool=1):
    windows_per_side = -(-grid // window)
    return Shape(
        name, frames * windows_per_side**2, heads, heads, (window // pool) ** 2, window**2, channels // heads,
        hiera=(grid, window, pool),
    )


def attention_shapes(frames: int, quick: bool) -> list[Shape]:
    shapes = [
        # Stage 1: 256x256 grid, 8x8 windows, 2 heads of 56: 1,024 windows per frame.
        hiera_shape("hiera s1 window 8x8", frames, 256, 8, 112, 2),
        # Stage-2 entry: queries 2x2 max-pooled inside each 8x8 window (L_q = L_k / 4), 4 heads of 56.
        hiera_shape("hiera s2 q-pool 8x8->4x4", frames, 256, 8, 224, 4, pool=2),
        # Stage 3: 64x64 grid padded to 70x70 for 14x14 windows, 8 heads of 56.
        hiera_shape("hiera s3 window 14x14 (pad 64->70)", frames, 64, 14, 448, 8),
        # Stage 3 global blocks: 4,096 tokens per frame (the fused block runs them as one 64x64 window).
        hiera_shape("hiera s3 global 4096", frames, 64, 64, 448, 8),
        Shape("siglip 729 tokens", 2 * frames, 16, 16, 729, 729, 72),
        Shape("qwen2 prefill 22k causal", 1, 28, 4, 22144, 22144, 128, causal=True),
    ]
    return shapes[:1] + shapes[4:] if quick else shapes


# 7B Hiera (SAM2.1 base-plus): which block of which stage, at what grid.
HIERA_BLOCKS = [
    ("s1 windowed block (8x8)", 0, 1, 1, 256),
    ("s2 q-pool block (8x8 -> 4x4)", 1, 0, 2, 256),
    ("s3 windowed block (14x14, pad 64->70)", 2, 1, 6, 64),
    ("s3 global block (4096)", 2, 7, 12, 64),
    ("s4 q-pool block (14x14 -> 7x7, pad 64->70)", 3, 0, 21, 64),
]


def hiera_7b_config():
    from transformers import Sam2HieraDetConfig

    return Sam2HieraDetConfig(
        hidden_size=112,
        blocks_per_stage=[2, 3, 16, 3],
        embed_dim_per_stage=[112, 224, 448, 896],
        num_attention_heads_per_stage=[2, 4, 8, 16],
        window_size_per_stage=[8, 4, 14, 7],
        global_attention_blocks=[12, 16, 20],
        window_positional_embedding_background_size=[14, 14],
    )


# ============================================================================================== compile only
class _LaunchRecorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **keywords)` records the launch instead of running it."""

    def __init__(self, kernel, sink: list):
        self.kernel, self.sink, self.label = kernel, sink, ""

    def __getitem__(self, grid):
        def launch(*args, **keywords):
            self.sink.append((self.label, self.kernel, args, keywords))
        return launch


def record_launches(kernels, shapes, dtypes, with_masks: bool) -> list:
    """Run the real launchers, forward and backward, on CPU tensors of each shape (one frame or sequence), with
    the kernels replaced by recorders: the arguments are those a GPU run passes, strides and offsets included."""
    names = ("_attention_forward_kernel", "_attention_backward_dkdv_kernel", "_attention_backward_dq_kernel")
    launches, originals = [], {name: getattr(kernels, name) for name in names}
    recorders = [_LaunchRecorder(originals[name], launches) for name in names]
    try:
        for name, recorder in zip(names, recorders):
            setattr(kernels, name, recorder)
        for shape in shapes:
            extras = ("", "key padding", "dense mask") if with_masks and shape.hiera is None else ("",)
            for dtype in dtypes:
                for extra in extras:
                    for recorder in recorders:
                        recorder.label = shape.name + (f" +{extra}" if extra else "")
                    _drive_launchers(kernels, shape, dtype, extra)
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)
    return launches


def _drive_launchers(kernels, shape, dtype, extra):
    import torch

    if shape.hiera is not None:
        grid, window, pool = shape.hiera
        channels = shape.q_heads * shape.head_dim
        qkv = torch.zeros(1, grid, grid, 3 * channels, dtype=dtype, requires_grad=True)
        padding = torch.zeros(3 * channels, dtype=dtype, requires_grad=True) if grid % window else None
        out = kernels.hiera_window_attention(
            qkv, padding, shape.q_heads, (window, window), pool, shape.head_dim**-0.5, (grid // pool, grid // pool)
        )
    else:
        # (B, L, H, D) activations seen as (B, H, L, D), as the models' attention modules pass them.
        q = torch.zeros(1, shape.len_q, shape.q_heads, shape.head_dim, dtype=dtype).transpose(1, 2)
        k = torch.zeros(1, shape.len_k, shape.kv_heads, shape.head_dim, dtype=dtype).transpose(1, 2)
        v = torch.zeros_like(k)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        key_valid = torch.ones(1, shape.len_k, dtype=torch.bool) if extra == "key padding" else None
        mask = torch.ones(1, 1, shape.len_q, shape.len_k, dtype=torch.bool) if extra == "dense mask" else None
        out = kernels.flash_attention(q, k, v, causal=shape.causal, key_valid=key_valid, mask=mask)
    out.backward(torch.zeros_like(out))


def specialise(kernel, args, keywords):
    """(signature, constexprs, attrs, options) of one recorded launch, as Triton's launcher derives them from the
    arguments: 16-divisible integers and 16-byte aligned pointers marked, integers equal to 1 made constants."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.backends.nvidia.compiler import CUDABackend

    options = {name: keywords[name] for name in ("num_warps", "num_stages")}
    values = dict(zip([p.name for p in kernel.params if not p.is_constexpr], args))
    values.update({k: v for k, v in keywords.items() if k not in options})
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(index,)] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = key
        elif isinstance(key, str):
            attrs[(index,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs, options


def _resource_usage(compiled) -> str:
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = "?"
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            text = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True).stdout
        found = re.findall(r"REG:\d+ STACK:\d+", text)
        usage = found[0] if found else "?"
    ptx = compiled.asm["ptx"]
    # Tensor-core (wgmma) matmuls and asynchronous (pipelined) copies: what a fast Hopper kernel should show.
    async_copies = ptx.count("cp.async.cg") + ptx.count("cp.async.ca")
    return f"{usage} wgmma:{ptx.count('wgmma.mma_async')} cp.async:{async_copies}"


def compile_only(quick: bool) -> int:
    """Compile each kernel variant the benchmark's shapes launch for sm_90; print registers, spills, wgmma and
    cp.async counts."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("--compile-only needs compiled kernels: unset TRITON_INTERPRET.")
        return 2
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    from vica2 import kernels_vica2 as kernels

    dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    launches = record_launches(kernels, attention_shapes(frames=1, quick=quick), dtypes, with_masks=not quick)
    seen, failures = set(), 0
    print(f"{'kernel':32} {'dtype':8} {'tiles (M,N,warps,stages)':25} {'usage':48} shape")
    for label, kernel, args, keywords in launches:
        dtype = str(args[0].dtype).replace("torch.", "")
        signature, constexprs, attrs, options = specialise(kernel, args, keywords)
        key = repr((kernel.__name__, signature, constexprs, attrs, options))
        if key in seen:
            continue
        seen.add(key)
        tiles = ",".join(str(keywords[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
        try:
            source = triton.compiler.ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
            usage = _resource_usage(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options))
        except Exception as error:  # noqa: BLE001 - report every failing variant
            failures += 1
            usage = f"FAILED: {str(error)[-300:]}"
        print(f"{kernel.__name__[1:]:32} {dtype:8} {tiles:25} {usage:48} {label}")
    print(f"compiled {len(seen) - failures} of {len(seen)} kernel variants for sm_90")
    return 1 if failures else 0


# ============================================================================================== GPU timing
def time_ms(fn, warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_attention_table(shapes, dtype, warmup, iters, device="cuda") -> list[dict]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vica2 import kernels_vica2 as kernels

    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None

    backends = {
        "sdpa flash": SDPBackend.FLASH_ATTENTION,
        "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa math": SDPBackend.MATH,
    }
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        results = {}
        if shape.hiera is not None:
            grid, window, pool = shape.hiera
            frames = shape.batch // (-(-grid // window)) ** 2
            channels = shape.q_heads * shape.head_dim
            qkv = torch.randn(frames, grid, grid, 3 * channels, device=device, dtype=dtype, requires_grad=True)
            bias = torch.randn(3 * channels, device=device, dtype=dtype)
            out_hw = (grid // pool, grid // pool)

            def ours():
                return kernels.hiera_window_attention(qkv, bias, shape.q_heads, (window, window), pool,
                                                      shape.head_dim**-0.5, out_hw)
            ours_inputs = (qkv,)
        else:
            q = torch.randn(shape.batch, shape.q_heads, shape.len_q, shape.head_dim, device=device, dtype=dtype,
                            requires_grad=True)
            k = torch.randn(shape.batch, shape.kv_heads, shape.len_k, shape.head_dim, device=device, dtype=dtype,
                            requires_grad=True)
            v = torch.randn_like(k, requires_grad=True)

            def ours():
                return kernels.flash_attention(q, k, v, causal=shape.causal)
            ours_inputs = (q, k, v)
            results["check"] = _check_against_sdpa(ours, q, k, v, shape.causal)
        results["vica2_fused"] = _time_pair(ours, warmup, iters)
        del ours_inputs

        # SDPA on (B, H, L, D) inputs; Hiera windows pre-partitioned (not timed), queries pre-pooled.
        q = torch.randn(shape.batch, shape.q_heads, shape.len_q, shape.head_dim, device=device, dtype=dtype,
                        requires_grad=True)
        k = torch.randn(shape.batch, shape.kv_heads, shape.len_k, shape.head_dim, device=device, dtype=dtype,
                        requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        gqa = shape.kv_heads != shape.q_heads
        for name, backend in backends.items():
            if name == "sdpa math" and shape.batch * shape.q_heads * shape.len_q * shape.len_k * 2 > 8e9:
                results[name] = ("skipped (scores > 8 GB)", None)
                continue

            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=shape.causal, enable_gqa=gqa
                    )
            results[name] = _time_pair(sdpa, warmup, iters)
        if flash_attn_func is not None:
            qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            results["flash-attn"] = _time_pair(lambda: flash_attn_func(qf, kf, vf, causal=shape.causal), warmup, iters)
        rows.append(dict(shape=shape, results=results))
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _check_against_sdpa(ours, q, k, v, causal):
    """Max |ours - SDPA| of the output and of dq/dk/dv at full size (what tiny interpreter tests cannot reach:
    index overflow, real tile counts), each relative to the largest SDPA value."""
    import torch

    try:
        grad = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], device=q.device, dtype=q.dtype)
        out = ours()
        got = (out.float(), *torch.autograd.grad(out, (q, k, v), grad))
        groups = q.shape[1] // k.shape[1]  # K/V repeated for the reference, so that every SDPA backend applies
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=causal
        ).transpose(1, 2)
        want = (expected.float(), *torch.autograd.grad(expected, (q, k, v), grad))
        return tuple(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, want))
    except (RuntimeError, torch.OutOfMemoryError) as error:
        print(f"error check failed: {str(error).splitlines()[0][:200]}")
        return None


def _time_pair(fn, warmup, iters):
    """(forward ms, forward+backward ms), or (error text, None)."""
    import torch

    try:
        forward = time_ms(lambda: fn(), warmup, iters)
        out = fn()
        grad = torch.randn_like(out)

        def step():
            fn().backward(grad)
        both = time_ms(step, warmup, iters)
        return forward, both
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = str(error).splitlines()[0][:60]
        return (f"n/a ({message})", None)


def print_attention_table(rows):
    print("\n### Attention kernels (ms, TFLOP/s; ratio = best SDPA time / our time, > 1 means we are faster)\n")
    print("| shape | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        shape, results = row["shape"], row["results"]
        flops = shape.flops()
        check = results.pop("check", None)
        for name, (forward, both) in results.items():
            if both is None:
                print(f"| {shape.name} | {name} | {forward} | | | |")
                continue
            print(f"| {shape.name} | {name} | {forward:.3f} | {flops / forward / 1e9:.1f} | {both:.3f} | "
                  f"{3.5 * flops / both / 1e9:.1f} |")
        sdpa = {k: v for k, v in results.items() if k.startswith("sdpa") and v[1] is not None}
        ours = results["vica2_fused"]
        if sdpa and ours[1] is not None:
            best_forward = min(v[0] for v in sdpa.values())
            best_both = min(v[1] for v in sdpa.values())
            print(f"| {shape.name} | **ratio vs best SDPA** | **{best_forward / ours[0]:.2f}x** | | "
                  f"**{best_both / ours[1]:.2f}x** | |")
        if check is not None:
            print(f"| {shape.name} | max error vs SDPA, relative (out / dq / dk / dv) | "
                  + " / ".join(f"{error:.1e}" for error in check) + " | | | |")


def library_windowed_attention(block, normed):
    """The library block's steps between its first layer norm and the residual, as in
    `Sam2MultiScaleBlock.forward`: window partition, the attention module (qkv, q-pool, SDPA, projection),
    window unpartition. The part `Vica2FusedHieraBlock.windowed_attention` replaces."""
    from transformers.models.sam2.modeling_sam2 import window_partition, window_unpartition

    height, width = normed.shape[1:3]
    hidden_states, pad_hw = normed, (height, width)
    if block.window_size > 0:
        hidden_states, pad_hw = window_partition(normed, block.window_size)
    hidden_states = block.attn(hidden_states)
    window = block.window_size
    if block.query_stride:
        window = block.window_size // block.query_stride[0]
        height, width = height // block.query_stride[0], width // block.query_stride[1]
        pad_hw = (height + (-height) % window, width + (-width) % window)
    if block.window_size > 0:
        hidden_states = window_unpartition(hidden_states, window, pad_hw, (height, width))
    return hidden_states


def _hiera_rows(name, library, fused, x, warmup, iters) -> dict:
    """One table row per measure for one block: "part" (the target's measure: partition + attention +
    unpartition, from the normed grid) and "block" (the whole block)."""
    import torch

    cases = {
        "part": (lambda: library_windowed_attention(library, x), lambda: fused.windowed_attention(x)),
        "block": (lambda: library(x), lambda: fused(x)),
    }
    rows = {}
    for kind, (run_library, run_fused) in cases.items():
        with torch.no_grad():
            difference = (run_fused() - run_library()).abs().max().item()
        (lib_f, lib_b), (fus_f, fus_b) = (_time_pair(fn, warmup, iters) for fn in (run_library, run_fused))
        if lib_b is None or fus_b is None:
            rows[kind] = f"| {name} | {lib_f} | {fus_f} | | | | | |"
            continue
        rows[kind] = (f"| {name} | {lib_f:.2f} | {fus_f:.2f} | {lib_f / fus_f:.2f}x | {lib_b:.2f} | {fus_b:.2f} | "
                      f"{lib_b / fus_b:.2f}x | {difference:.1e} |")
    return rows


def run_hiera_blocks(frames, dtype, warmup, iters, device="cuda"):
    import torch
    from transformers.models.sam2.modeling_sam2 import Sam2MultiScaleBlock

    from vica2 import kernels_vica2 as kernels

    kernels.register_vica2_attention()
    config = hiera_7b_config()
    config._attn_implementation = "sdpa"
    label = f"{frames} frames, {str(dtype).replace('torch.', '')}; ratio = library / fused"
    header = ("| block | library fwd ms | fused fwd ms | ratio | library fwd+bwd ms | fused fwd+bwd ms | ratio | "
              "max abs diff |\n|---|---|---|---|---|---|---|---|")
    tables = {"part": [], "block": []}
    for name, stage, block, total, grid in HIERA_BLOCKS:
        torch.manual_seed(0)
        library = Sam2MultiScaleBlock(config, stage, block, total).to(device, dtype)
        fused = copy.deepcopy(library)
        fused.attn.config = copy.deepcopy(config)
        fused.attn.config._attn_implementation = kernels.ATTENTION_NAME
        kernels.use_fused_hiera_blocks(fused)
        x = torch.randn(frames, grid, grid, library.dim, device=device, dtype=dtype, requires_grad=True)
        for kind, row in _hiera_rows(name, library, fused, x, warmup, iters).items():
            tables[kind].append(row)
        del library, fused, x
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\n### Hiera windowed attention: partition + attention + unpartition ({label})\n")
    print(header)
    print("\n".join(tables["part"]))
    print(f"\n### Hiera blocks end to end, layer norms and MLP included ({label})\n")
    print(header)
    print("\n".join(tables["block"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-only", action="store_true", help="compile the kernel variants for sm_90 (no GPU)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes / dtypes")
    parser.add_argument("--frames", type=int, default=32, help="Hiera frames per call (7B video: 32)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip-blocks", action="store_true", help="skip the end-to-end Hiera block table")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT.parent))  # only if the `vica2` package is not installed

    if args.compile_only:
        return compile_only(args.quick)

    import torch

    if not torch.cuda.is_available():
        print("bench_attention.py times CUDA kernels and found no CUDA device; nothing was measured.\n"
              "Run it on a GPU machine, or use --compile-only to check that the kernels compile for sm_90.")
        return 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: timings would be of the CPU interpreter. Unset it.")
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    import transformers

    print(f"# bench_attention.py  {datetime.date.today()}  {torch.cuda.get_device_name()}  torch {torch.__version__}"
          f"  transformers {transformers.__version__}  triton {__import__('triton').__version__}  {args.dtype}")
    rows = run_attention_table(attention_shapes(args.frames, args.quick), dtype, args.warmup, args.iters)
    print_attention_table(rows)
    if not args.skip_blocks:
        run_hiera_blocks(args.frames, dtype, args.warmup, args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
