# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""Fused Triton attention for ViCA2, selected with `attn_implementation="vica2_fused"`.

One kernel family (forward with an online softmax and fp32 accumulation; backward as dK/dV and dQ passes)
serves the three attention shapes of ViCA2:

* plain sequences (Qwen2 prefill and multi-token steps, SigLIP): any head_dim up to 128 (lanes padded to a
  power of two and masked, or split in two tiles where that is narrower: 72 as 64 + 16), GQA without repeating
  K/V, causal, key padding or any boolean mask from `sdpa_mask`, L_q != L_k, fp16 / bf16 / fp32;
* Hiera windows: the kernel reads each window of the (B, H, W, 3C) `qkv` grid in place, with the 2x2 query
  max-pool of the stage-change blocks done while loading the queries, and writes straight into the
  (B, H', W', C) output grid; no window partition, padding or unpartition copies are made.

Every launch folds (sequence or window, head, block) into grid axis 0, whose limit is 2^31 - 1, so the 32,768
windows x 2 heads of a 32-frame Hiera stage 1 (past the 65,535 limit of axes 1 and 2) need no chunking.

Unpadded one-token decode steps go to SDPA by design: its flash path splits a long cache over the GPU with
native GQA, where this kernel family would have one program per (batch, head).

The kernels run on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1` (set before `triton` is first
imported: Triton decorates its own library and these kernels at import); anywhere else, and when Triton is
missing, attention falls back to the library's SDPA function with a one-time log line.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import Counter
from dataclasses import dataclass

import torch

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.sam2.modeling_sam2 import Sam2MultiScaleBlock, do_pool
from transformers.utils import logging


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


logger = logging.get_logger(__name__)

ATTENTION_NAME = "vica2_fused"
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_MAX_PROGRAMS = 2**31 - 1

# How often each path ran in this process; tests read it to prove that the kernels (not the fallback) ran.
KERNEL_CALLS: Counter = Counter()


def kernel_call_counts() -> dict:
    """A copy of the per-path call counts: `attention_forward`, `attention_backward`, `hiera_window_forward`,
    `hiera_window_backward` (Triton kernels), `decode_sdpa` (unpadded one-token decode steps, SDPA's by design) and
    `fallback` (SDPA where the kernels cannot run)."""
    return dict(KERNEL_CALLS)


def reset_kernel_call_counts() -> None:
    KERNEL_CALLS.clear()


# ============================================================================================== Triton kernels
if triton is not None:

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr):
        # The interpreter multiplies bf16 tiles as raw uint16; products of 16-bit floats are exact in fp32, so
        # upcasting there gives what the tensor cores compute (fp32 accumulation) on a GPU.
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision="ieee")

    @triton.jit
    def _aligned(s_b, s_h, s_y, s_x, ALIGN: tl.constexpr):
        """Strides arrive in units of ALIGN elements (the largest power of two up to 16 dividing them all).
        Multiplying by the constant tells the compiler what Triton's launcher cannot (it only marks arguments
        divisible by 16, and `tl.multiple_of` does not stick to arguments): rows of head_dim 56 or 72 are then
        16-byte aligned, so tiles load as full vectors and the key/value loads can be pipelined."""
        return s_b * ALIGN, s_h * ALIGN, s_y * ALIGN, s_x * ALIGN

    @triton.jit
    def _sequence_coords(seq, n_win_h, n_win_w, WINDOWED: tl.constexpr):
        """(batch, window row, window column) of a sequence index; plain sequences are their own batch."""
        if WINDOWED:
            windows_per_image = n_win_h * n_win_w
            window = seq % windows_per_image
            batch = seq // windows_per_image
            win_y = window // n_win_w
            win_x = window % n_win_w
        else:
            batch = seq
            win_y = seq * 0
            win_x = seq * 0
        return batch, win_y, win_x

    @triton.jit
    def _token_offsets(t, win_y, win_x, grid_h, grid_w, win_h, win_w, stride_y, stride_x, WINDOWED: tl.constexpr):
        """Offsets of the tokens `t` of a sequence (or window) from its (batch, head) base, and whether they lie
        inside the grid. int32 keeps address tiles small; the launchers check that one batch element fits."""
        if WINDOWED:
            y = win_y * win_h + t // win_w
            x = win_x * win_w + t % win_w
            offsets = y * stride_y + x * stride_x
            inside = (y < grid_h) & (x < grid_w)
        else:
            offsets = t * stride_x
            inside = t >= 0
        return offsets, inside

    @triton.jit
    def _load_queries(
        q_base, offs_m, offs_d, d_mask, rows, win_y, win_x, grid_h, grid_w, win_h, win_w, stride_y, stride_x,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, WINDOWED: tl.constexpr, POOL: tl.constexpr,
    ):
        """A (BLOCK_M, BLOCK_D) query tile, max-pooled POOL x POOL inside each window when POOL > 1.

        Also returns, per element, which of the POOL*POOL sources won (the first maximum in row-major order, as
        `max_pool2d` picks it), so that the backward pass routes dQ to the same element.
        """
        winner = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
        if POOL == 1:
            offsets, inside = _token_offsets(
                offs_m, win_y, win_x, grid_h, grid_w, win_h, win_w, stride_y, stride_x, WINDOWED
            )
            q = tl.load(
                q_base + (offsets[:, None] + offs_d[None, :]),
                mask=(rows & inside)[:, None] & d_mask[None, :],
                other=0.0,
            )
        else:
            pooled_w = win_w // POOL
            py = offs_m // pooled_w
            px = offs_m % pooled_w
            # Compared in fp32 (exact for 16-bit inputs; the interpreter cannot compare bf16).
            q = tl.full([BLOCK_M, BLOCK_D], float("-inf"), tl.float32)
            for dy in tl.static_range(POOL):
                for dx in tl.static_range(POOL):
                    y = win_y * win_h + py * POOL + dy
                    x = win_x * win_w + px * POOL + dx
                    inside = rows & (y < grid_h) & (x < grid_w)
                    offsets = y * stride_y + x * stride_x
                    # Pooled queries with a source outside the grid are cropped from the output: 0 is as good as any.
                    source = tl.load(
                        q_base + (offsets[:, None] + offs_d[None, :]), mask=inside[:, None] & d_mask[None, :], other=0.0
                    ).to(tl.float32)
                    wins = source > q
                    q = tl.where(wins, source, q)
                    winner = tl.where(wins, dy * POOL + dx, winner)
            q = q.to(q_base.dtype.element_ty)
        return q, winner

    @triton.jit
    def _query_program(
        num_q_blocks, num_heads, kv_group, n_win_h, n_win_w, len_q,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, WINDOWED: tl.constexpr,
    ):
        """What a forward or dQ program works on: (q_block, head, kv_head, seq, batch, win_y, win_x, offs_m, rows,
        offs_d, d_mask). Heaviest (last, for causal) query blocks first; blocks of one (sequence, head) run side by
        side."""
        pid = tl.program_id(0)
        q_block = num_q_blocks - 1 - pid % num_q_blocks
        head = (pid // num_q_blocks) % num_heads
        seq = pid // (num_q_blocks * num_heads)
        batch, win_y, win_x = _sequence_coords(seq, n_win_h, n_win_w, WINDOWED)
        offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        kv_head = head // kv_group
        return q_block, head, kv_head, seq, batch, win_y, win_x, offs_m, offs_m < len_q, offs_d, offs_d < HEAD_DIM

    @triton.jit
    def _key_range(q_block, len_k, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """(interior, hi) for the key loop of query block `q_block`: keys [0, interior) lie inside L_k and below
        every query's causal limit (no checks needed), [interior, hi) need them, keys from hi on are masked for
        every query of the block and never read."""
        hi = len_k
        interior = (len_k // BLOCK_N) * BLOCK_N
        if CAUSAL:
            hi = tl.maximum(tl.minimum(len_k, (q_block + 1) * BLOCK_M + causal_offset), 0)
            interior = (tl.maximum(tl.minimum(len_k, q_block * BLOCK_M + causal_offset + 1), 0) // BLOCK_N) * BLOCK_N
        return interior, hi

    @triton.jit
    def _load_key_value(
        k_base, v_base, bias_k, bias_v, offs_n, offs_d, d_mask, len_k, win_y, win_x, grid_h, grid_w, win_h, win_w,
        sk_y, sk_x, sv_y, sv_x, WINDOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """(BLOCK_N, lanes) key and value tiles, whether each key is inside L_k, and inside the grid. Window
        positions past the grid hold what the library computes there: the qkv projection of the zero padding, i.e.
        its bias (they are attended, not masked)."""
        cols = offs_n < len_k
        k_offsets, inside = _token_offsets(offs_n, win_y, win_x, grid_h, grid_w, win_h, win_w, sk_y, sk_x, WINDOWED)
        v_offsets, v_inside = _token_offsets(offs_n, win_y, win_x, grid_h, grid_w, win_h, win_w, sv_y, sv_x, WINDOWED)
        load_mask = (cols & inside)[:, None] & d_mask[None, :]
        k = tl.load(k_base + (k_offsets[:, None] + offs_d[None, :]), mask=load_mask, other=0.0)
        v = tl.load(v_base + (v_offsets[:, None] + offs_d[None, :]), mask=load_mask, other=0.0)
        if HAS_BIAS:
            padded = (cols & ~inside)[:, None]
            k = tl.where(padded, bias_k[None, :], k)
            v = tl.where(padded, bias_v[None, :], v)
        return k, v, cols, inside

    @triton.jit
    def _allowed(
        offs_m, offs_n, rows, cols, batch, head, KEY_VALID, MASK, skv_b, skv_j, sm_b, sm_h, sm_i, sm_j, causal_offset,
        CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, HAS_MASK: tl.constexpr, TRANSPOSED: tl.constexpr,
        EDGE: tl.constexpr = True,
    ):
        """Which (query, key) pairs take part; a (BLOCK_M, BLOCK_N) tile, or (BLOCK_N, BLOCK_M) if TRANSPOSED.
        EDGE=False: a key block known to lie inside L_k and below the causal diagonal, so only the key padding or
        mask (and, for the mask's loads, the query bound) apply."""
        if TRANSPOSED:
            qi = offs_m[None, :]
            kj = offs_n[:, None]
            ok = rows[None, :] & cols[:, None]
        else:
            qi = offs_m[:, None]
            kj = offs_n[None, :]
            ok = rows[:, None] & cols[None, :]
        if CAUSAL and EDGE:
            ok = ok & (kj <= qi + causal_offset)
        if HAS_KEY_VALID:
            key_valid = tl.load(KEY_VALID + batch.to(tl.int64) * skv_b + offs_n * skv_j, mask=cols, other=0)
            if TRANSPOSED:
                ok = ok & (key_valid != 0)[:, None]
            else:
                ok = ok & (key_valid != 0)[None, :]
        if HAS_MASK:
            mask_base = MASK + batch.to(tl.int64) * sm_b + head.to(tl.int64) * sm_h
            mask_ptrs = mask_base + (qi * sm_i + kj * sm_j)
            ok = ok & (tl.load(mask_ptrs, mask=ok, other=0) != 0)
        return ok

    @triton.jit
    def _load_bias(BIAS, head, offs_d, d_mask, DATA, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Lanes `offs_d` of one head's padding key or value (zeros when no window overhangs), in DATA's dtype."""
        bias = tl.zeros_like(offs_d).to(DATA.dtype.element_ty)
        if HAS_BIAS:
            bias = tl.load(BIAS + head * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(DATA.dtype.element_ty)
        return bias

    @triton.jit
    def _load_query_lanes(
        q_base, offs_m, offs_d, d_mask, rows, win_y, win_x, grid_h, grid_w, win_h, win_w, sq_y, sq_x, BIAS_K, BIAS_V,
        head, Q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, WINDOWED: tl.constexpr,
        POOL: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """The query tile of lanes `offs_d` (pooled, with the winning sources), and the padding key and value
        lanes its key blocks need: (q, winner, bias_k, bias_v)."""
        q, winner = _load_queries(
            q_base, offs_m, offs_d, d_mask, rows, win_y, win_x, grid_h, grid_w, win_h, win_w, sq_y, sq_x,
            BLOCK_M, BLOCK_D, WINDOWED, POOL,
        )
        bias_k = _load_bias(BIAS_K, head, offs_d, d_mask, Q, HEAD_DIM, HAS_BIAS)
        bias_v = _load_bias(BIAS_V, head, offs_d, d_mask, Q, HEAD_DIM, HAS_BIAS)
        return q, winner, bias_k, bias_v

    @triton.jit
    def _store_query_grad(
        dq_base, dq, winner, offs_m, offs_d, d_mask, kept, win_y, win_x, grid_h, grid_w, win_h, win_w, sdq_y, sdq_x,
        WINDOWED: tl.constexpr, POOL: tl.constexpr,
    ):
        """Writes a (BLOCK_M, lanes) dQ tile; pooled queries send it to the source that won the max."""
        if POOL == 1:
            dq_offsets, dq_inside = _token_offsets(
                offs_m, win_y, win_x, grid_h, grid_w, win_h, win_w, sdq_y, sdq_x, WINDOWED
            )
            tl.store(dq_base + (dq_offsets[:, None] + offs_d[None, :]), dq, mask=kept[:, None] & d_mask[None, :])
        else:
            # max-pool backward: each pooled element's gradient goes to the source that won the max; the other
            # sources keep the zeros the caller allocated.
            pooled_w = win_w // POOL
            py = offs_m // pooled_w
            px = offs_m % pooled_w
            for dy in tl.static_range(POOL):
                for dx in tl.static_range(POOL):
                    y = win_y * win_h + py * POOL + dy
                    x = win_x * win_w + px * POOL + dx
                    offsets = y * sdq_y + x * sdq_x
                    chosen = kept[:, None] & d_mask[None, :] & (winner == dy * POOL + dx)
                    tl.store(dq_base + (offsets[:, None] + offs_d[None, :]), dq, mask=chosen)

    @triton.jit
    def _forward_key_block(
        acc, acc_t, m_i, l_i, q, q_t, start_n, k_base, v_base, bias_k, bias_v, bias_k_t, bias_v_t,
        offs_m, offs_d, d_mask, offs_t, t_mask, rows, batch, head, len_k, win_y, win_x, grid_h, grid_w, win_h, win_w,
        sk_y, sk_x, sv_y, sv_x, KEY_VALID, MASK, skv_b, skv_j, sm_b, sm_h, sm_i, sm_j, causal_offset, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, WINDOWED: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        UPCAST: tl.constexpr, EDGE: tl.constexpr,
    ):
        """One key block of the forward's online softmax: returns the updated (acc, acc_t, m_i, l_i).

        Interior blocks (EDGE=False: inside L_k and wholly below the causal diagonal) skip the bounds and the
        causal rule, and without key padding or a mask build no mask at all, as the causal diagonal and the
        partial last block (EDGE=True) must. With no tail (BLOCK_T = 0) `*_t` are placeholders, left untouched."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, cols, k_inside = _load_key_value(
            k_base, v_base, bias_k, bias_v, offs_n, offs_d, d_mask, len_k, win_y, win_x, grid_h, grid_w,
            win_h, win_w, sk_y, sk_x, sv_y, sv_x, WINDOWED, HAS_BIAS,
        )
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST)
        if BLOCK_T > 0:
            k_t, v_t, cols_t, k_inside_t = _load_key_value(
                k_base, v_base, bias_k_t, bias_v_t, offs_n, offs_t, t_mask, len_k, win_y, win_x, grid_h, grid_w,
                win_h, win_w, sk_y, sk_x, sv_y, sv_x, WINDOWED, HAS_BIAS,
            )
            s = _dot(q_t, tl.trans(k_t), s, UPCAST)
        s = s * qk_scale
        if EDGE or HAS_KEY_VALID or HAS_MASK:
            ok = _allowed(
                offs_m, offs_n, rows, cols, batch, head, KEY_VALID, MASK, skv_b, skv_j, sm_b, sm_h, sm_i, sm_j,
                causal_offset, CAUSAL, HAS_KEY_VALID, HAS_MASK, False, EDGE,
            )
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no allowed key yet keeps m = -inf; shift by 0 there so no inf - inf appears.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        acc = _dot(p, v, acc * alpha[:, None], UPCAST)
        if BLOCK_T > 0:
            acc_t = _dot(p, v_t, acc_t * alpha[:, None], UPCAST)
        return acc, acc_t, m_new, l_i

    @triton.jit
    def _dq_key_block(
        dq, dq_t, q, q_t, do, do_t, lse, delta, start_n, k_base, v_base, bias_k, bias_v, bias_k_t, bias_v_t,
        offs_m, offs_d, d_mask, offs_t, t_mask, kept, batch, head, len_k, win_y, win_x, grid_h, grid_w, win_h, win_w,
        sk_y, sk_x, sv_y, sv_x, KEY_VALID, MASK, skv_b, skv_j, sm_b, sm_h, sm_i, sm_j, causal_offset, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, WINDOWED: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        UPCAST: tl.constexpr, EDGE: tl.constexpr,
    ):
        """One key block of the dQ pass: returns the updated (dq, dq_t). Interior blocks (EDGE=False) need no
        bounds or causal mask: rows past L_q have lse = inf (p = 0), rows cropped from a window's output have
        dO = delta = 0 (dS = 0), and every score of an interior block is allowed, so p <= 1."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, cols, k_inside = _load_key_value(
            k_base, v_base, bias_k, bias_v, offs_n, offs_d, d_mask, len_k, win_y, win_x, grid_h, grid_w,
            win_h, win_w, sk_y, sk_x, sv_y, sv_x, WINDOWED, HAS_BIAS,
        )
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST)
        if BLOCK_T > 0:
            k_t, v_t, cols_t, k_inside_t = _load_key_value(
                k_base, v_base, bias_k_t, bias_v_t, offs_n, offs_t, t_mask, len_k, win_y, win_x, grid_h, grid_w,
                win_h, win_w, sk_y, sk_x, sv_y, sv_x, WINDOWED, HAS_BIAS,
            )
            s = _dot(q_t, tl.trans(k_t), s, UPCAST)
            dp = _dot(do_t, tl.trans(v_t), dp, UPCAST)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if EDGE or HAS_KEY_VALID or HAS_MASK:
            ok = _allowed(
                offs_m, offs_n, kept, cols, batch, head, KEY_VALID, MASK, skv_b, skv_j, sm_b, sm_h, sm_i, sm_j,
                causal_offset, CAUSAL, HAS_KEY_VALID, HAS_MASK, False, EDGE,
            )
            p = tl.where(ok, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = _dot(ds, k, dq, UPCAST)
        if BLOCK_T > 0:
            dq_t = _dot(ds, k_t, dq_t, UPCAST)
        return dq, dq_t

    # Head dims that are not a power of two are split in two lane tiles rather than padded to the next power:
    # BLOCK_D lanes, then BLOCK_T more (0: none). SigLIP's 72 runs as 64 + 16 (80 lanes of matmul work, not 128);
    # every matmul over the head dim becomes two accumulating ones, every tile over it two tiles.

    @triton.jit
    def _attention_forward_kernel(
        Q, K, V, O, LSE, BIAS_K, BIAS_V, KEY_VALID, MASK,
        sq_b, sq_h, sq_y, sq_x,
        sk_b, sk_h, sk_y, sk_x,
        sv_b, sv_h, sv_y, sv_x,
        so_b, so_h, so_y, so_x,
        skv_b, skv_j, sm_b, sm_h, sm_i, sm_j,
        num_heads, kv_group, n_win_h, n_win_w, grid_h, grid_w, win_h, win_w, out_h, out_w,
        len_q, len_k, num_q_blocks, causal_offset, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr, POOL: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_KEY_VALID: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        sq_b, sq_h, sq_y, sq_x = _aligned(sq_b, sq_h, sq_y, sq_x, ALIGN)
        sk_b, sk_h, sk_y, sk_x = _aligned(sk_b, sk_h, sk_y, sk_x, ALIGN)
        sv_b, sv_h, sv_y, sv_x = _aligned(sv_b, sv_h, sv_y, sv_x, ALIGN)
        so_b, so_h, so_y, so_x = _aligned(so_b, so_h, so_y, so_x, ALIGN)
        q_block, head, kv_head, seq, batch, win_y, win_x, offs_m, rows, offs_d, d_mask = _query_program(
            num_q_blocks, num_heads, kv_group, n_win_h, n_win_w, len_q, HEAD_DIM, BLOCK_M, BLOCK_D, WINDOWED
        )
        q_base = Q + batch.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h
        k_base = K + batch.to(tl.int64) * sk_b + kv_head.to(tl.int64) * sk_h
        v_base = V + batch.to(tl.int64) * sv_b + kv_head.to(tl.int64) * sv_h
        q, unused_winner, bias_k, bias_v = _load_query_lanes(
            q_base, offs_m, offs_d, d_mask, rows, win_y, win_x, grid_h, grid_w, win_h, win_w, sq_y, sq_x, BIAS_K,
            BIAS_V, head, Q, HEAD_DIM, BLOCK_M, BLOCK_D, WINDOWED, POOL, HAS_BIAS,
        )
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if BLOCK_T > 0:
            offs_t = BLOCK_D + tl.arange(0, BLOCK_T)
            t_mask = offs_t < HEAD_DIM
            q_t, unused_winner_t, bias_k_t, bias_v_t = _load_query_lanes(
                q_base, offs_m, offs_t, t_mask, rows, win_y, win_x, grid_h, grid_w, win_h, win_w, sq_y, sq_x, BIAS_K,
                BIAS_V, head, Q, HEAD_DIM, BLOCK_M, BLOCK_T, WINDOWED, POOL, HAS_BIAS,
            )
            acc_t = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if BLOCK_T == 0:  # placeholders the key-block steps pass through untouched
            q_t, acc_t, bias_k_t, bias_v_t, offs_t, t_mask = q, acc, bias_k, bias_v, offs_d, d_mask
        interior, hi = _key_range(q_block, len_k, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
        for start_n in range(0, interior, BLOCK_N):
            acc, acc_t, m_i, l_i = _forward_key_block(
                acc, acc_t, m_i, l_i, q, q_t, start_n, k_base, v_base, bias_k, bias_v, bias_k_t, bias_v_t,
                offs_m, offs_d, d_mask, offs_t, t_mask, rows, batch, head, len_k, win_y, win_x, grid_h, grid_w,
                win_h, win_w, sk_y, sk_x, sv_y, sv_x, KEY_VALID, MASK, skv_b, skv_j, sm_b, sm_h, sm_i, sm_j,
                causal_offset, qk_scale, BLOCK_M, BLOCK_N, BLOCK_T, WINDOWED, CAUSAL, HAS_KEY_VALID, HAS_MASK,
                HAS_BIAS, UPCAST, False,
            )
        for start_n in range(interior, hi, BLOCK_N):
            acc, acc_t, m_i, l_i = _forward_key_block(
                acc, acc_t, m_i, l_i, q, q_t, start_n, k_base, v_base, bias_k, bias_v, bias_k_t, bias_v_t,
                offs_m, offs_d, d_mask, offs_t, t_mask, rows, batch, head, len_k, win_y, win_x, grid_h, grid_w,
                win_h, win_w, sk_y, sk_x, sv_y, sv_x, KEY_VALID, MASK, skv_b, skv_j, sm_b, sm_h, sm_i, sm_j,
                causal_offset, qk_scale, BLOCK_M, BLOCK_N, BLOCK_T, WINDOWED, CAUSAL, HAS_KEY_VALID, HAS_MASK,
                HAS_BIAS, UPCAST, True,
            )

        # A row with no allowed key (e.g. a left-padding query under a causal mask) outputs 0, as torch's SDPA does.
        has_keys = l_i > 0.0
        norm = tl.where(has_keys, l_i, 1.0)
        lse = tl.where(has_keys, m_i + tl.log2(norm), float("inf"))

        o_offsets, o_inside = _token_offsets(
            offs_m, win_y, win_x, out_h, out_w, win_h // POOL, win_w // POOL, so_y, so_x, WINDOWED
        )
        o_base = O + batch.to(tl.int64) * so_b + head.to(tl.int64) * so_h
        stored = rows & o_inside
        out = (acc / norm[:, None]).to(O.dtype.element_ty)
        tl.store(o_base + (o_offsets[:, None] + offs_d[None, :]), out, mask=stored[:, None] & d_mask[None, :])
        if BLOCK_T > 0:
            out_t = (acc_t / norm[:, None]).to(O.dtype.element_ty)
            tl.store(o_base + (o_offsets[:, None] + offs_t[None, :]), out_t, mask=stored[:, None] & t_mask[None, :])
        lse_row = (seq.to(tl.int64) * num_heads + head) * len_q
        tl.store(LSE + lse_row + offs_m, lse, mask=rows)

    @triton.jit
    def _attention_backward_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, DBIAS, BIAS_K, BIAS_V, KEY_VALID, MASK,
        sq_b, sq_h, sq_y, sq_x,
        sk_b, sk_h, sk_y, sk_x,
        sv_b, sv_h, sv_y, sv_x,
        sdo_b, sdo_h, sdo_y, sdo_x,
        sdl_b, sdl_h, sdl_y, sdl_x,
        sdk_b, sdk_h, sdk_y, sdk_x,
        sdv_b, sdv_h, sdv_y, sdv_x,
        skv_b, skv_j, sm_b, sm_h, sm_i, sm_j,
        num_heads, num_kv_heads, kv_group, n_win_h, n_win_w, grid_h, grid_w, win_h, win_w, out_h, out_w,
        len_q, len_k, num_k_blocks, causal_offset, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr, POOL: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_KEY_VALID: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        sq_b, sq_h, sq_y, sq_x = _aligned(sq_b, sq_h, sq_y, sq_x, ALIGN)
        sk_b, sk_h, sk_y, sk_x = _aligned(sk_b, sk_h, sk_y, sk_x, ALIGN)
        sv_b, sv_h, sv_y, sv_x = _aligned(sv_b, sv_h, sv_y, sv_x, ALIGN)
        sdo_b, sdo_h, sdo_y, sdo_x = _aligned(sdo_b, sdo_h, sdo_y, sdo_x, ALIGN)
        sdk_b, sdk_h, sdk_y, sdk_x = _aligned(sdk_b, sdk_h, sdk_y, sdk_x, ALIGN)
        sdv_b, sdv_h, sdv_y, sdv_x = _aligned(sdv_b, sdv_h, sdv_y, sdv_x, ALIGN)
        pid = tl.program_id(0)
        k_block = pid % num_k_blocks
        kv_head = (pid // num_k_blocks) % num_kv_heads
        seq = pid // (num_k_blocks * num_kv_heads)
        batch, win_y, win_x = _sequence_coords(seq, n_win_h, n_win_w, WINDOWED)

        offs_n = k_block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        k_base = K + batch.to(tl.int64) * sk_b + kv_head.to(tl.int64) * sk_h
        v_base = V + batch.to(tl.int64) * sv_b + kv_head.to(tl.int64) * sv_h
        bias_k = _load_bias(BIAS_K, kv_head, offs_d, d_mask, K, HEAD_DIM, HAS_BIAS)
        bias_v = _load_bias(BIAS_V, kv_head, offs_d, d_mask, K, HEAD_DIM, HAS_BIAS)
        k, v, cols, k_inside = _load_key_value(
            k_base, v_base, bias_k, bias_v, offs_n, offs_d, d_mask, len_k, win_y, win_x, grid_h, grid_w,
            win_h, win_w, sk_y, sk_x, sv_y, sv_x, WINDOWED, HAS_BIAS,
        )
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if BLOCK_T > 0:
            offs_t = BLOCK_D + tl.arange(0, BLOCK_T)
            t_mask = offs_t < HEAD_DIM
            bias_k_t = _load_bias(BIAS_K, kv_head, offs_t, t_mask, K, HEAD_DIM, HAS_BIAS)
            bias_v_t = _load_bias(BIAS_V, kv_head, offs_t, t_mask, K, HEAD_DIM, HAS_BIAS)
            k_t, v_t, cols_t, k_inside_t = _load_key_value(
                k_base, v_base, bias_k_t, bias_v_t, offs_n, offs_t, t_mask, len_k, win_y, win_x, grid_h, grid_w,
                win_h, win_w, sk_y, sk_x, sv_y, sv_x, WINDOWED, HAS_BIAS,
            )
            dk_t = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
            dv_t = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)

        lo = 0
        if CAUSAL:
            lo = (tl.maximum(k_block * BLOCK_N - causal_offset, 0) // BLOCK_M) * BLOCK_M
        # GQA: the query heads that share this K/V head are summed here, so K/V are never repeated.
        for group_member in range(0, kv_group):
            head = kv_head * kv_group + group_member
            q_base = Q + batch.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h
            do_base = DO + batch.to(tl.int64) * sdo_b + head.to(tl.int64) * sdo_h
            lse_row = (seq.to(tl.int64) * num_heads + head) * len_q
            for start_m in range(lo, len_q, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                rows = offs_m < len_q
                q, unused_winner = _load_queries(
                    q_base, offs_m, offs_d, d_mask, rows, win_y, win_x, grid_h, grid_w, win_h, win_w, sq_y, sq_x,
                    BLOCK_M, BLOCK_D, WINDOWED, POOL,
                )
                # Queries cropped from the output (window padding) have no gradient: leave them out entirely.
                o_offsets, o_inside = _token_offsets(
                    offs_m, win_y, win_x, out_h, out_w, win_h // POOL, win_w // POOL, sdo_y, sdo_x, WINDOWED
                )
                kept = rows & o_inside
                do = tl.load(
                    do_base + (o_offsets[:, None] + offs_d[None, :]), mask=kept[:, None] & d_mask[None, :], other=0.0
                )
                dl_offsets, dl_inside = _token_offsets(
                    offs_m, win_y, win_x, out_h, out_w, win_h // POOL, win_w // POOL, sdl_y, sdl_x, WINDOWED
                )
                delta = tl.load(
                    DELTA + batch.to(tl.int64) * sdl_b + head.to(tl.int64) * sdl_h + dl_offsets, mask=kept, other=0.0
                )
                lse = tl.load(LSE + lse_row + offs_m, mask=rows, other=float("inf"))
                s_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST)
                if BLOCK_T > 0:
                    q_t, unused_winner_t = _load_queries(
                        q_base, offs_m, offs_t, t_mask, rows, win_y, win_x, grid_h, grid_w, win_h, win_w, sq_y, sq_x,
                        BLOCK_M, BLOCK_T, WINDOWED, POOL,
                    )
                    do_t = tl.load(
                        do_base + (o_offsets[:, None] + offs_t[None, :]), mask=kept[:, None] & t_mask[None, :],
                        other=0.0,
                    )
                    s_t = _dot(k_t, tl.trans(q_t), s_t, UPCAST)
                s_t = s_t * qk_scale
                ok = _allowed(
                    offs_m, offs_n, kept, cols, batch, head, KEY_VALID, MASK, skv_b, skv_j, sm_b, sm_h, sm_i, sm_j,
                    causal_offset, CAUSAL, HAS_KEY_VALID, HAS_MASK, True,
                )
                p_t = tl.where(ok, tl.exp2(s_t - lse[None, :]), 0.0)
                p_in = p_t.to(do.dtype)
                dv = _dot(p_in, do, dv, UPCAST)
                dp_t = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST)
                if BLOCK_T > 0:
                    dv_t = _dot(p_in, do_t, dv_t, UPCAST)
                    dp_t = _dot(v_t, tl.trans(do_t), dp_t, UPCAST)
                ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
                dk = _dot(ds_t, q, dk, UPCAST)
                if BLOCK_T > 0:
                    dk_t = _dot(ds_t, q_t, dk_t, UPCAST)
        dk = dk * sm_scale

        dk_offsets, dk_inside = _token_offsets(
            offs_n, win_y, win_x, grid_h, grid_w, win_h, win_w, sdk_y, sdk_x, WINDOWED
        )
        dv_offsets, dv_inside = _token_offsets(
            offs_n, win_y, win_x, grid_h, grid_w, win_h, win_w, sdv_y, sdv_x, WINDOWED
        )
        dk_base = DK + batch.to(tl.int64) * sdk_b + kv_head.to(tl.int64) * sdk_h
        dv_base = DV + batch.to(tl.int64) * sdv_b + kv_head.to(tl.int64) * sdv_h
        stored = cols & k_inside
        tl.store(dk_base + (dk_offsets[:, None] + offs_d[None, :]), dk.to(DK.dtype.element_ty),
                 mask=stored[:, None] & d_mask[None, :])
        tl.store(dv_base + (dv_offsets[:, None] + offs_d[None, :]), dv.to(DV.dtype.element_ty),
                 mask=stored[:, None] & d_mask[None, :])
        if BLOCK_T > 0:
            dk_t = dk_t * sm_scale
            tl.store(dk_base + (dk_offsets[:, None] + offs_t[None, :]), dk_t.to(DK.dtype.element_ty),
                     mask=stored[:, None] & t_mask[None, :])
            tl.store(dv_base + (dv_offsets[:, None] + offs_t[None, :]), dv_t.to(DV.dtype.element_ty),
                     mask=stored[:, None] & t_mask[None, :])
        if HAS_BIAS:
            # Padded window positions hold qkv(0) (the bias): their dK/dV flow there. One partial sum per program,
            # reduced by the caller (deterministic, no atomics).
            padded = (cols & ~k_inside)[:, None]
            part = DBIAS + pid.to(tl.int64) * (2 * HEAD_DIM)
            tl.store(part + offs_d, tl.sum(tl.where(padded, dk, 0.0), 0), mask=d_mask)
            tl.store(part + HEAD_DIM + offs_d, tl.sum(tl.where(padded, dv, 0.0), 0), mask=d_mask)
            if BLOCK_T > 0:
                tl.store(part + offs_t, tl.sum(tl.where(padded, dk_t, 0.0), 0), mask=t_mask)
                tl.store(part + HEAD_DIM + offs_t, tl.sum(tl.where(padded, dv_t, 0.0), 0), mask=t_mask)

    @triton.jit
    def _attention_backward_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, BIAS_K, BIAS_V, KEY_VALID, MASK,
        sq_b, sq_h, sq_y, sq_x,
        sk_b, sk_h, sk_y, sk_x,
        sv_b, sv_h, sv_y, sv_x,
        sdo_b, sdo_h, sdo_y, sdo_x,
        sdl_b, sdl_h, sdl_y, sdl_x,
        sdq_b, sdq_h, sdq_y, sdq_x,
        skv_b, skv_j, sm_b, sm_h, sm_i, sm_j,
        num_heads, kv_group, n_win_h, n_win_w, grid_h, grid_w, win_h, win_w, out_h, out_w,
        len_q, len_k, num_q_blocks, causal_offset, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr, POOL: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_KEY_VALID: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        sq_b, sq_h, sq_y, sq_x = _aligned(sq_b, sq_h, sq_y, sq_x, ALIGN)
        sk_b, sk_h, sk_y, sk_x = _aligned(sk_b, sk_h, sk_y, sk_x, ALIGN)
        sv_b, sv_h, sv_y, sv_x = _aligned(sv_b, sv_h, sv_y, sv_x, ALIGN)
        sdo_b, sdo_h, sdo_y, sdo_x = _aligned(sdo_b, sdo_h, sdo_y, sdo_x, ALIGN)
        sdq_b, sdq_h, sdq_y, sdq_x = _aligned(sdq_b, sdq_h, sdq_y, sdq_x, ALIGN)
        q_block, head, kv_head, seq, batch, win_y, win_x, offs_m, rows, offs_d, d_mask = _query_program(
            num_q_blocks, num_heads, kv_group, n_win_h, n_win_w, len_q, HEAD_DIM, BLOCK_M, BLOCK_D, WINDOWED
        )
        q_base = Q + batch.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h
        k_base = K + batch.to(tl.int64) * sk_b + kv_head.to(tl.int64) * sk_h
        v_base = V + batch.to(tl.int64) * sv_b + kv_head.to(tl.int64) * sv_h
        do_base = DO + batch.to(tl.int64) * sdo_b + head.to(tl.int64) * sdo_h
        q, winner, bias_k, bias_v = _load_query_lanes(
            q_base, offs_m, offs_d, d_mask, rows, win_y, win_x, grid_h, grid_w, win_h, win_w, sq_y, sq_x, BIAS_K,
            BIAS_V, head, Q, HEAD_DIM, BLOCK_M, BLOCK_D, WINDOWED, POOL, HAS_BIAS,
        )
        o_offsets, o_inside = _token_offsets(
            offs_m, win_y, win_x, out_h, out_w, win_h // POOL, win_w // POOL, sdo_y, sdo_x, WINDOWED
        )
        kept = rows & o_inside
        do = tl.load(do_base + (o_offsets[:, None] + offs_d[None, :]), mask=kept[:, None] & d_mask[None, :], other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if BLOCK_T > 0:
            offs_t = BLOCK_D + tl.arange(0, BLOCK_T)
            t_mask = offs_t < HEAD_DIM
            q_t, winner_t, bias_k_t, bias_v_t = _load_query_lanes(
                q_base, offs_m, offs_t, t_mask, rows, win_y, win_x, grid_h, grid_w, win_h, win_w, sq_y, sq_x, BIAS_K,
                BIAS_V, head, Q, HEAD_DIM, BLOCK_M, BLOCK_T, WINDOWED, POOL, HAS_BIAS,
            )
            do_t = tl.load(
                do_base + (o_offsets[:, None] + offs_t[None, :]), mask=kept[:, None] & t_mask[None, :], other=0.0
            )
            dq_t = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
        dl_offsets, dl_inside = _token_offsets(
            offs_m, win_y, win_x, out_h, out_w, win_h // POOL, win_w // POOL, sdl_y, sdl_x, WINDOWED
        )
        delta = tl.load(
            DELTA + batch.to(tl.int64) * sdl_b + head.to(tl.int64) * sdl_h + dl_offsets, mask=kept, other=0.0
        )
        lse = tl.load(LSE + (seq.to(tl.int64) * num_heads + head) * len_q + offs_m, mask=rows, other=float("inf"))

        if BLOCK_T == 0:  # placeholders the key-block steps pass through untouched
            q_t, do_t, dq_t, bias_k_t, bias_v_t, offs_t, t_mask = q, do, dq, bias_k, bias_v, offs_d, d_mask
        interior, hi = _key_range(q_block, len_k, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
        for start_n in range(0, interior, BLOCK_N):
            dq, dq_t = _dq_key_block(
                dq, dq_t, q, q_t, do, do_t, lse, delta, start_n, k_base, v_base, bias_k, bias_v, bias_k_t, bias_v_t,
                offs_m, offs_d, d_mask, offs_t, t_mask, kept, batch, head, len_k, win_y, win_x, grid_h, grid_w,
                win_h, win_w, sk_y, sk_x, sv_y, sv_x, KEY_VALID, MASK, skv_b, skv_j, sm_b, sm_h, sm_i, sm_j,
                causal_offset, qk_scale, BLOCK_M, BLOCK_N, BLOCK_T, WINDOWED, CAUSAL, HAS_KEY_VALID, HAS_MASK,
                HAS_BIAS, UPCAST, False,
            )
        for start_n in range(interior, hi, BLOCK_N):
            dq, dq_t = _dq_key_block(
                dq, dq_t, q, q_t, do, do_t, lse, delta, start_n, k_base, v_base, bias_k, bias_v, bias_k_t, bias_v_t,
                offs_m, offs_d, d_mask, offs_t, t_mask, kept, batch, head, len_k, win_y, win_x, grid_h, grid_w,
                win_h, win_w, sk_y, sk_x, sv_y, sv_x, KEY_VALID, MASK, skv_b, skv_j, sm_b, sm_h, sm_i, sm_j,
                causal_offset, qk_scale, BLOCK_M, BLOCK_N, BLOCK_T, WINDOWED, CAUSAL, HAS_KEY_VALID, HAS_MASK,
                HAS_BIAS, UPCAST, True,
            )

        dq_base = DQ + batch.to(tl.int64) * sdq_b + head.to(tl.int64) * sdq_h
        _store_query_grad(
            dq_base, (dq * sm_scale).to(DQ.dtype.element_ty), winner, offs_m, offs_d, d_mask, kept, win_y, win_x,
            grid_h, grid_w, win_h, win_w, sdq_y, sdq_x, WINDOWED, POOL,
        )
        if BLOCK_T > 0:
            _store_query_grad(
                dq_base, (dq_t * sm_scale).to(DQ.dtype.element_ty), winner_t, offs_m, offs_t, t_mask, kept, win_y,
                win_x, grid_h, grid_w, win_h, win_w, sdq_y, sdq_x, WINDOWED, POOL,
            )


KERNELS_INTERPRETED = triton is not None and type(_attention_forward_kernel).__name__ == "InterpretedFunction"


# ============================================================================================== launchers
@dataclass
class _Problem:
    """Everything but the tensors: how sequences, heads and tokens map onto memory."""

    windowed: bool
    pool: int
    num_heads: int
    num_kv_heads: int
    n_seq: int
    len_q: int
    len_k: int
    head_dim: int
    scale: float
    causal: bool = False
    causal_offset: int = 0
    n_win_h: int = 1
    n_win_w: int = 1
    grid_h: int = 1
    grid_w: int = 1
    win_h: int = 1
    win_w: int = 1
    out_h: int = 1
    out_w: int = 1

    @property
    def kv_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head_blocks(self) -> tuple[int, int]:
        """(BLOCK_D, BLOCK_T): the head dim's lanes as one power-of-two tile, or as two (a tail of >= 16 lanes)
        where that is narrower: 72 -> 64 + 16, 80 -> 64 + 16, 96 -> 64 + 32, 40 -> 32 + 16; 56 -> 64, 128 -> 128."""
        whole = max(16, triton.next_power_of_2(self.head_dim))
        main = whole // 2
        tail = max(16, triton.next_power_of_2(max(self.head_dim - main, 1)))
        return (main, tail) if main >= 16 and main + tail < whole else (whole, 0)

    def geometry(self) -> tuple:
        return (
            self.n_win_h, self.n_win_w, self.grid_h, self.grid_w, self.win_h, self.win_w, self.out_h, self.out_w,
            self.len_q, self.len_k,
        )


# Tile sizes and warps per kernel. Not autotuned (no GPU was at hand): chosen by compiling for sm_90 with the
# specialisation a real launch gets (benchmarks/bench_attention.py --compile-only records the launchers' real
# arguments): the largest tiles that keep tensor-core (wgmma) matmuls and pipelined loads without register spills.
# The backward kernels want transposed shapes: dK/dV accumulate over BLOCK_N key rows (the M side of their
# matmuls, so it needs >= 64 rows for wgmma) while queries stream by, dQ the other way round.
#   (kind, dtype class) -> (BLOCK_M cap, BLOCK_N cap, num_warps, num_stages)
_FORWARD_TILES = {
    ("window", "16bit"): (64, 64, 8, 2),
    ("wide", "16bit"): (128, 64, 8, 3),  # more than 64 lanes (Qwen2 128; SigLIP 72 as 64 + 16)
    ("narrow", "16bit"): (128, 128, 8, 3),
    ("any", "fp32"): (32, 32, 8, 2),
}
_DKDV_TILES = {
    ("window", "16bit"): (32, 128, 8, 2),
    ("wide", "16bit"): (32, 128, 8, 2),
    ("narrow", "16bit"): (32, 128, 8, 2),
    ("any", "fp32"): (32, 32, 8, 2),
}
_DQ_TILES = {
    ("window", "16bit"): (128, 64, 8, 2),
    ("wide", "16bit"): (128, 64, 8, 2),
    ("narrow", "16bit"): (128, 64, 8, 2),
    ("any", "fp32"): (32, 32, 8, 2),
}
# The interpreter pays per operation, not per element: whole sequences in one tile keep tests fast (tests that
# need several tiles pass block sizes explicitly).
_INTERPRETER_TILE = (256, 256, 4, 1)


def _tiles(table: dict, problem: _Problem, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if KERNELS_INTERPRETED:
        return _INTERPRETER_TILE
    if dtype == torch.float32:
        return table[("any", "fp32")]
    # Hiera windows (64 / 196 / 49 tokens) get their own tiles; a global block is one 4,096-token "window" and
    # takes the sequence tiles.
    if problem.windowed and problem.len_k <= 256:
        kind = "window"
    else:
        kind = "wide" if sum(problem.head_blocks) > 64 else "narrow"
    return table[(kind, "16bit")]


def _pow2_block(length: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(length, 1))))


def _blocks(table: dict, problem: _Problem, dtype: torch.dtype, block_m=None, block_n=None) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one kernel: the table's caps, shrunk to the lengths."""
    cap_m, cap_n, warps, stages = _tiles(table, problem, dtype)
    return block_m or _pow2_block(problem.len_q, cap_m), block_n or _pow2_block(problem.len_k, cap_n), warps, stages


def _strides4(tensor: torch.Tensor, b: int, h: int | None, y: int | None, x: int, h_step: int | None = None):
    """(batch, head, row, column) element strides of a tensor; `None` dims contribute 0, `h_step` overrides."""
    head = h_step if h_step is not None else (tensor.stride(h) if h is not None else 0)
    return (tensor.stride(b), head, tensor.stride(y) if y is not None else 0, tensor.stride(x))


def _stride_alignment(*strides: tuple) -> int:
    """The largest power of two up to 16 that divides every given element stride (for the kernels' hints).

    1 when a stride does not fit in int32: the kernels multiply the divided strides back in the arguments' own
    integer type, which must then stay the int64 Triton gives such an argument."""
    flat = [stride for group in strides for stride in group]
    if any(abs(stride) >= 2**31 for stride in flat):
        return 1
    return math.gcd(16, *flat)


def _mask_args(key_valid, mask, reference: torch.Tensor):
    placeholder = reference  # any tensor: the kernel never reads it when the flag is off
    key_valid_arg = key_valid if key_valid is not None else placeholder
    kv_strides = (0, 0)
    if key_valid is not None:
        kv_strides = (key_valid.stride(0) if key_valid.shape[0] > 1 else 0, key_valid.stride(1))
    mask_arg = mask if mask is not None else placeholder
    m_strides = tuple(mask.stride()) if mask is not None else (0, 0, 0, 0)
    if mask is not None and mask.shape[1] == 1:
        m_strides = (m_strides[0], 0, m_strides[2], m_strides[3])
    if mask is not None and mask.shape[0] == 1:
        m_strides = (0,) + m_strides[1:]
    return key_valid_arg, kv_strides, mask_arg, m_strides


def _device_guard(tensor: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _launch_forward(problem, q, k, v, out, q_s, k_s, v_s, o_s, bias_k=None, bias_v=None, key_valid=None, mask=None,
                    block_m=None, block_n=None):
    bm, bn, warps, stages = _blocks(_FORWARD_TILES, problem, q.dtype, block_m, block_n)
    num_q_blocks = triton.cdiv(problem.len_q, bm)
    programs = problem.n_seq * problem.num_heads * num_q_blocks
    if programs > _MAX_PROGRAMS:
        raise ValueError(f"vica2_fused: {programs} programs exceed the launch grid limit; split the batch.")
    lse = torch.empty((problem.n_seq, problem.num_heads, problem.len_q), device=q.device, dtype=torch.float32)
    key_valid_arg, kv_strides, mask_arg, m_strides = _mask_args(key_valid, mask, lse)
    has_bias = bias_k is not None
    align = _stride_alignment(q_s, k_s, v_s, o_s)
    q_s, k_s, v_s, o_s = (tuple(stride // align for stride in group) for group in (q_s, k_s, v_s, o_s))
    with _device_guard(q):
        _attention_forward_kernel[(programs,)](
            q, k, v, out, lse, bias_k if has_bias else lse, bias_v if has_bias else lse, key_valid_arg, mask_arg,
            *q_s, *k_s, *v_s, *o_s, *kv_strides, *m_strides,
            problem.num_heads, problem.kv_group, *problem.geometry(), num_q_blocks, problem.causal_offset,
            problem.scale * _LOG2E,
            HEAD_DIM=problem.head_dim, BLOCK_D=problem.head_blocks[0], BLOCK_T=problem.head_blocks[1], BLOCK_M=bm,
            BLOCK_N=bn,
            WINDOWED=problem.windowed, POOL=problem.pool, CAUSAL=problem.causal,
            HAS_KEY_VALID=key_valid is not None, HAS_MASK=mask is not None, HAS_BIAS=has_bias,
            UPCAST=KERNELS_INTERPRETED, ALIGN=align, num_warps=warps, num_stages=stages,
        )
    return lse


def _launch_backward(problem, q, k, v, do, lse, delta, dq, dk, dv, strides, bias_k=None, bias_v=None, key_valid=None,
                     mask=None, block_m=None, block_n=None):
    """Fills dq, dk, dv (and returns the padded-position dK/dV partial sums when a bias is given)."""
    q_s, k_s, v_s, do_s, dl_s, dq_s, dk_s, dv_s = strides
    align = _stride_alignment(q_s, k_s, v_s, do_s, dq_s, dk_s, dv_s)
    q_s, k_s, v_s, do_s, dq_s, dk_s, dv_s = (
        tuple(stride // align for stride in group) for group in (q_s, k_s, v_s, do_s, dq_s, dk_s, dv_s)
    )
    dkdv_m, dkdv_n, dkdv_warps, dkdv_stages = _blocks(_DKDV_TILES, problem, q.dtype, block_m, block_n)
    dq_m, dq_n, dq_warps, dq_stages = _blocks(_DQ_TILES, problem, q.dtype, block_m, block_n)
    key_valid_arg, kv_strides, mask_arg, m_strides = _mask_args(key_valid, mask, lse)
    has_bias = bias_k is not None
    num_k_blocks = triton.cdiv(problem.len_k, dkdv_n)
    kv_programs = problem.n_seq * problem.num_kv_heads * num_k_blocks
    num_q_blocks = triton.cdiv(problem.len_q, dq_m)
    q_programs = problem.n_seq * problem.num_heads * num_q_blocks
    if max(kv_programs, q_programs) > _MAX_PROGRAMS:
        raise ValueError("vica2_fused: the backward launch grid exceeds 2^31 - 1 programs; split the batch.")
    dbias_parts = None
    if has_bias:
        # One (dK, dV) row per program, i.e. per (window, head, key block): every row is written.
        dbias_parts = torch.empty((kv_programs, 2, problem.head_dim), device=q.device, dtype=torch.float32)
    common = dict(
        HEAD_DIM=problem.head_dim, BLOCK_D=problem.head_blocks[0], BLOCK_T=problem.head_blocks[1],
        WINDOWED=problem.windowed, POOL=problem.pool,
        CAUSAL=problem.causal, HAS_KEY_VALID=key_valid is not None, HAS_MASK=mask is not None, HAS_BIAS=has_bias,
        UPCAST=KERNELS_INTERPRETED, ALIGN=align,
    )
    bias_k_arg = bias_k if has_bias else lse
    bias_v_arg = bias_v if has_bias else lse
    with _device_guard(q):
        _attention_backward_dkdv_kernel[(kv_programs,)](
            q, k, v, do, lse, delta, dk, dv, dbias_parts if has_bias else lse, bias_k_arg, bias_v_arg,
            key_valid_arg, mask_arg,
            *q_s, *k_s, *v_s, *do_s, *dl_s, *dk_s, *dv_s, *kv_strides, *m_strides,
            problem.num_heads, problem.num_kv_heads, problem.kv_group, *problem.geometry(), num_k_blocks,
            problem.causal_offset, problem.scale * _LOG2E, problem.scale, **common,
            BLOCK_M=dkdv_m, BLOCK_N=dkdv_n, num_warps=dkdv_warps, num_stages=dkdv_stages,
        )
        _attention_backward_dq_kernel[(q_programs,)](
            q, k, v, do, lse, delta, dq, bias_k_arg, bias_v_arg, key_valid_arg, mask_arg,
            *q_s, *k_s, *v_s, *do_s, *dl_s, *dq_s, *kv_strides, *m_strides,
            problem.num_heads, problem.kv_group, *problem.geometry(), num_q_blocks,
            problem.causal_offset, problem.scale * _LOG2E, problem.scale, **common,
            BLOCK_M=dq_m, BLOCK_N=dq_n, num_warps=dq_warps, num_stages=dq_stages,
        )
    return dbias_parts


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


# ============================================================================================== sequences
def _sequence_problem(query, key, causal, causal_offset, scale) -> _Problem:
    batch, num_heads, len_q, head_dim = query.shape
    return _Problem(
        windowed=False, pool=1, num_heads=num_heads, num_kv_heads=key.shape[1], n_seq=batch, len_q=len_q,
        len_k=key.shape[2], head_dim=head_dim, scale=scale, causal=causal, causal_offset=causal_offset,
    )


def _bhld_strides(tensor):  # (B, H, L, D)
    return _strides4(tensor, 0, 1, None, 2)


def _blhd_strides(tensor):  # (B, L, H, D)
    return _strides4(tensor, 0, 2, None, 1)


class _FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, key_valid, mask, causal, causal_offset, scale, block_m, block_n):
        query, key, value = (_last_dim_contiguous(t) for t in (query, key, value))
        problem = _sequence_problem(query, key, causal, causal_offset, scale)
        out = torch.empty(
            (query.shape[0], query.shape[2], query.shape[1], query.shape[3]), device=query.device, dtype=query.dtype
        )
        lse = _launch_forward(
            problem, query, key, value, out, _bhld_strides(query), _bhld_strides(key), _bhld_strides(value),
            _blhd_strides(out), key_valid=key_valid, mask=mask, block_m=block_m, block_n=block_n,
        )
        KERNEL_CALLS["attention_forward"] += 1
        ctx.save_for_backward(query, key, value, out, lse, key_valid, mask)
        ctx.problem, ctx.blocks = problem, (block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, key_valid, mask = ctx.saved_tensors
        grad_out = _last_dim_contiguous(grad_out)
        delta = (grad_out.float() * out.float()).sum(-1)  # (B, L_q, H)
        dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        strides = (
            _bhld_strides(query), _bhld_strides(key), _bhld_strides(value), _blhd_strides(grad_out),
            _strides4(delta, 0, 2, None, 1), _bhld_strides(dq), _bhld_strides(dk), _bhld_strides(dv),
        )
        _launch_backward(
            ctx.problem, query, key, value, grad_out, lse, delta, dq, dk, dv, strides, key_valid=key_valid, mask=mask,
            block_m=ctx.blocks[0], block_n=ctx.blocks[1],
        )
        KERNEL_CALLS["attention_backward"] += 1
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool = False,
    causal_offset: int = 0,
    key_valid: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of query (B, H_q, L_q, D) over key/value (B, H_kv, L_k, D); returns (B, L_q, H_q, D).

    Args:
        causal: query i sees keys j <= i + causal_offset (0: torch's upper-left `is_causal`).
        key_valid: (B, L_k) bool, False for padding keys.
        mask: (B or 1, 1 or H_q, L_q, L_k) bool, True where attention is allowed (as `sdpa_mask` makes it).
        scale: softmax scale (default 1/sqrt(D)).
        block_m, block_n: tile sizes (powers of two >= 16) instead of the heuristic; for tests.
    A query row with no allowed key returns zeros. H_q must be a multiple of H_kv (GQA), D <= 128.
    """
    if triton is None:
        raise RuntimeError("flash_attention needs Triton; install the `kernels` extra (triton>=3.6).")
    _check_inputs(query, key, value)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if key_valid is not None:
        key_valid = key_valid.to(device=query.device, dtype=torch.bool).view(torch.uint8)
    if mask is not None:
        mask = mask.to(device=query.device, dtype=torch.bool).view(torch.uint8)
        _check_int32_offsets(mask)
    return _FlashAttentionFunction.apply(
        query, key, value, key_valid, mask, causal, int(causal_offset), float(scale), block_m, block_n
    )


def _span_within_batch(tensor: torch.Tensor) -> int:
    """The largest element offset inside one batch element of `tensor` (the kernels' int32 tile offsets)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape[1:], tensor.stride()[1:]))


def _check_int32_offsets(*tensors):
    if any(t is not None and _span_within_batch(t) >= 2**31 for t in tensors):
        raise ValueError("vica2_fused: one batch element spans more than 2^31 elements; split the sequence.")


def _check_inputs(query, key, value):
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("query, key and value must be (batch, heads, length, head_dim) tensors.")
    if query.shape[-1] > MAX_HEAD_DIM or key.shape[-1] != query.shape[-1] or value.shape[-1] != query.shape[-1]:
        raise ValueError(f"vica2_fused supports equal q/k/v head dims up to {MAX_HEAD_DIM}.")
    if query.shape[1] % key.shape[1] or key.shape[1] != value.shape[1]:
        raise ValueError("The number of query heads must be a multiple of the number of key/value heads.")
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"vica2_fused supports fp16, bf16 and fp32 inputs of one dtype, got {query.dtype}.")
    _check_int32_offsets(query, key, value)
    if math.prod(query.shape[1:]) >= 2**31:  # the (B, L_q, H_q, D) output
        raise ValueError("vica2_fused: one batch element spans more than 2^31 elements; split the sequence.")


# ============================================================================================== Hiera windows
class _HieraWindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, padding_qkv, num_heads, window, pool, scale, out_hw, block_m, block_n):
        qkv = qkv.contiguous()
        _check_int32_offsets(qkv)
        batch, height, width, three_c = qkv.shape
        channels = three_c // 3
        head_dim = channels // num_heads
        win_h, win_w = window
        out_h, out_w = out_hw
        problem = _Problem(
            windowed=True, pool=pool, num_heads=num_heads, num_kv_heads=num_heads,
            n_seq=batch * math.ceil(height / win_h) * math.ceil(width / win_w),
            len_q=(win_h // pool) * (win_w // pool), len_k=win_h * win_w, head_dim=head_dim, scale=scale,
            n_win_h=math.ceil(height / win_h), n_win_w=math.ceil(width / win_w), grid_h=height, grid_w=width,
            win_h=win_h, win_w=win_w, out_h=out_h, out_w=out_w,
        )
        query, key, value = qkv.split(channels, dim=-1)
        out = torch.empty((batch, out_h, out_w, channels), device=qkv.device, dtype=qkv.dtype)
        grid_strides = _strides4(qkv, 0, None, 1, 2, h_step=head_dim)
        bias_k = bias_v = None
        if padding_qkv is not None:
            padding_qkv = padding_qkv.to(qkv.dtype).contiguous()
            bias_k, bias_v = padding_qkv[channels : 2 * channels], padding_qkv[2 * channels :]
        lse = _launch_forward(
            problem, query, key, value, out, grid_strides, grid_strides, grid_strides,
            _strides4(out, 0, None, 1, 2, h_step=head_dim), bias_k=bias_k, bias_v=bias_v,
            block_m=block_m, block_n=block_n,
        )
        KERNEL_CALLS["hiera_window_forward"] += 1
        ctx.save_for_backward(qkv, padding_qkv, out, lse)
        ctx.problem, ctx.blocks = problem, (block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, padding_qkv, out, lse = ctx.saved_tensors
        problem = ctx.problem
        channels, head_dim = problem.num_heads * problem.head_dim, problem.head_dim
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).unflatten(-1, (problem.num_heads, head_dim)).sum(-1).contiguous()
        # Pooled queries send their gradient to one source of each 2x2 cell: the rest must stay zero.
        grad_qkv = torch.zeros_like(qkv)
        query, key, value = qkv.split(channels, dim=-1)
        dq, dk, dv = grad_qkv.split(channels, dim=-1)
        grid_strides = _strides4(qkv, 0, None, 1, 2, h_step=head_dim)
        out_strides = _strides4(grad_out, 0, None, 1, 2, h_step=head_dim)
        delta_strides = _strides4(delta, 0, None, 1, 2, h_step=1)
        strides = (grid_strides,) * 3 + (out_strides, delta_strides) + (grid_strides,) * 3
        bias_k = bias_v = None
        if padding_qkv is not None:
            bias_k, bias_v = padding_qkv[channels : 2 * channels], padding_qkv[2 * channels :]
        parts = _launch_backward(
            problem, query, key, value, grad_out, lse, delta, dq, dk, dv, strides, bias_k=bias_k, bias_v=bias_v,
            block_m=ctx.blocks[0], block_n=ctx.blocks[1],
        )
        KERNEL_CALLS["hiera_window_backward"] += 1
        grad_padding = None
        if padding_qkv is not None and ctx.needs_input_grad[1]:
            # (window, head, key block, dK|dV, head_dim) -> (dK|dV, head, head_dim): the padded positions' share.
            # Padded queries are cropped from the output, so the query part gets nothing.
            parts = parts.view(problem.n_seq, problem.num_heads, -1, 2, head_dim).sum(dim=(0, 2))
            padded = parts.transpose(0, 1).flatten()
            grad_padding = torch.cat([padded.new_zeros(channels), padded]).to(padding_qkv.dtype)
        return grad_qkv, grad_padding, None, None, None, None, None, None, None


def hiera_window_attention(
    qkv: torch.Tensor,
    padding_qkv: torch.Tensor | None,
    num_heads: int,
    window_size: tuple[int, int],
    query_stride: int,
    scale: float,
    out_hw: tuple[int, int],
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Windowed attention of a Hiera block, read from the (B, H, W, 3C) `qkv` projection in place.

    Reproduces `Sam2MultiScaleBlock` + `Sam2MultiScaleAttention` between the qkv and output projections: the grid
    is cut into (window_h, window_w) windows, the last ones overhanging it; their padded positions take part in
    attention with the keys/values `padding_qkv` (3C,), what the qkv projection makes of the zero padding (its
    bias, for an `nn.Linear`; None when no window overhangs). Queries are max-pooled query_stride x query_stride
    inside each window, and the result is written to the (B, out_h, out_w, C) grid, overhang cropped. A global
    block is one window covering the whole grid. Gradients flow to `qkv` and `padding_qkv`.
    """
    if triton is None:
        raise RuntimeError("hiera_window_attention needs Triton; install the `kernels` extra (triton>=3.6).")
    return _HieraWindowAttentionFunction.apply(
        qkv, padding_qkv, num_heads, tuple(window_size), int(query_stride), float(scale), tuple(out_hw),
        block_m, block_n,
    )


class Vica2FusedHieraBlock(Sam2MultiScaleBlock):
    """`Sam2MultiScaleBlock` whose attention runs as one fused windowed kernel (same weights, same outputs).

    Put in place of each library block by `use_fused_hiera_blocks` when the Hiera config selects `vica2_fused`,
    built by `sharing(block)` around the block's own sub-modules; it defers to the library forward whenever the
    fused path does not apply (another backend selected since, no kernel for the device,
    attention weights requested, or a grid/window shape the library itself handles in an odd way).
    """

    @classmethod
    def sharing(cls, block: Sam2MultiScaleBlock) -> "Vica2FusedHieraBlock":
        """A fused block holding `block`'s own sub-modules (the same parameters, not copies) and geometry."""
        fused = cls.__new__(cls)
        super(Sam2MultiScaleBlock, fused).__init__()  # the library block's base (GradientCheckpointingLayer)
        for name in ("dim", "dim_out", "window_size", "query_stride"):
            setattr(fused, name, getattr(block, name))
        for name, child in block.named_children():
            fused.add_module(name, child)
        return fused.train(block.training)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if not self._fused_path_applies(hidden_states, kwargs):
            return super().forward(hidden_states, **kwargs)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        if self.dim != self.dim_out:
            residual = do_pool(self.proj(hidden_states), self.query_stride)
        hidden_states = residual + self.windowed_attention(hidden_states)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))

    def windowed_attention(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the library block does between its first layer norm and the residual (window partition, the
        attention module with its q-pool and projections, unpartition), as one fused kernel between the qkv and
        output projections: (B, H, W, C) normed grid -> (B, H / stride, W / stride, C_out)."""
        height, width = hidden_states.shape[1:3]
        stride = self.query_stride[0] if self.query_stride else 1
        window = (self.window_size, self.window_size) if self.window_size > 0 else (height, width)
        padding_qkv = None
        if height % window[0] or width % window[1]:
            # The library zero-pads the normed input, so padded positions hold qkv(0): the bias of a plain Linear,
            # computed through the module so that wrapped projections (LoRA, quantized) stay exact.
            padding_qkv = self.attn.qkv(hidden_states.new_zeros(1, self.dim))[0]
        attention = hiera_window_attention(
            self.attn.qkv(hidden_states),
            padding_qkv,
            self.attn.num_attention_heads,
            window,
            stride,
            self.attn.scale,
            out_hw=(height // stride, width // stride),
        )
        return self.attn.proj(attention)

    def _fused_path_applies(self, hidden_states: torch.Tensor, kwargs: dict) -> bool:
        if self.attn.config._attn_implementation != ATTENTION_NAME or kwargs.get("output_attentions"):
            return False
        if not _kernels_can_run(hidden_states) or hidden_states.dtype not in SUPPORTED_DTYPES:
            return False
        if (self.attn.dim_out // self.attn.num_attention_heads) > MAX_HEAD_DIM:
            return False
        if self.query_stride:
            stride_h, stride_w = self.query_stride
            height, width = hidden_states.shape[1:3]
            window = self.window_size
            # The library un-partitions pooled windows of size window // stride over the pooled grid; that lines
            # up with the windows it partitioned only when the strides divide the grid and the window.
            if stride_h != stride_w or height % stride_h or width % stride_w or (window > 0 and window % stride_h):
                return False
        return True


def use_fused_hiera_blocks(hiera_model: torch.nn.Module) -> int:
    """Put a `Vica2FusedHieraBlock` sharing each library Hiera block's parameters in that block's place inside
    `hiera_model`; returns how many. Parameter names, the state dict and every other module are untouched."""
    library_blocks = [
        (parent, name, child)
        for parent in hiera_model.modules()
        for name, child in parent.named_children()
        if type(child) is Sam2MultiScaleBlock
    ]
    for parent, name, child in library_blocks:
        setattr(parent, name, Vica2FusedHieraBlock.sharing(child))
    return len(library_blocks)


# ============================================================================================== attention interface
def _kernels_can_run(tensor: torch.Tensor) -> bool:
    if triton is None:
        return False
    if KERNELS_INTERPRETED:
        return True  # the interpreter runs on host copies of any tensor
    return tensor.is_cuda


class _MaskSplitCache:
    """The compact form of the last 4D mask seen: every layer of a forward gets the same mask tensor."""

    def __init__(self):
        self._ref = None
        self._key = None
        self._value = None

    def get(self, mask: torch.Tensor):
        key = (mask.data_ptr(), tuple(mask.shape), tuple(mask.stride()), mask._version, mask.device)
        if self._ref is not None and self._ref() is mask and self._key == key:
            return self._value
        value = _split_mask(mask)
        self._ref, self._key, self._value = weakref.ref(mask), key, value
        return value


def _split_mask(mask: torch.Tensor):
    """(key_valid, causal, causal_offset, dense_mask) for a boolean (B, 1|H, L_q, L_k) mask.

    `sdpa_mask` makes causal-and-padding masks; the kernel reads those as a (B, L_k) key-padding vector plus a
    causal rule instead of a whole (L_q, L_k) tile per head. Any other pattern is passed through densely.
    """
    if mask.shape[1] == 1:
        grid = mask[:, 0]
        len_q, len_k = grid.shape[-2:]
        key_valid = grid.any(dim=1)
        padding_only = key_valid[:, None, :].expand_as(grid)
        causal_rule = torch.ones(len_q, len_k, dtype=torch.bool, device=mask.device).tril(len_k - len_q)
        if torch.equal(grid, padding_only & causal_rule):
            return key_valid, True, len_k - len_q, None
        if torch.equal(grid, padding_only):
            return key_valid, False, 0, None
    return None, False, 0, mask


_mask_split_cache = _MaskSplitCache()


def _fallback(reason: str, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    logger.warning_once(f"vica2_fused attention falls back to SDPA: {reason}.")
    KERNEL_CALLS["fallback"] += 1
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def vica2_fused_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` entry: query (B, H_q, L_q, D), key/value (B, H_kv, L_k, D) -> ((B, L_q, H_q, D), None).

    Same semantics as `sdpa_attention_forward` with an `sdpa_mask` mask: with no mask, causal (upper-left, like
    SDPA's `is_causal`) when the module is causal and L_q > 1; a boolean mask is used as given.
    """
    if not _kernels_can_run(query):
        reason = "Triton is not installed" if triton is None else (
            f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 before import), got {query.device.type}"
        )
        return _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    unsupported = None
    if dropout > 0.0:
        unsupported = "attention dropout is not implemented"
    elif any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux")):
        unsupported = "position_bias / softcap / attention sinks are not implemented"
    elif kwargs.get("output_attentions"):
        unsupported = "attention weights are not computed"
    elif attention_mask is not None and (
        attention_mask.dtype != torch.bool
        or attention_mask.dim() != 4
        or tuple(attention_mask.shape[-2:]) != (query.shape[2], key.shape[2])
    ):
        unsupported = "only boolean (batch, 1 or heads, L_q, L_k) masks, as sdpa_mask makes them, are supported"
    else:
        try:
            _check_inputs(query, key, value)
        except ValueError as error:
            unsupported = str(error)
    if unsupported is not None:
        return _fallback(unsupported, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if query.shape[2] == 1 and attention_mask is None:
        # An unpadded one-token decode step. The kernel parallelises over query blocks, of which such a step has
        # one per (batch, head): it would stream the whole cache through a few dozen programs, re-reading each K/V
        # head for every query head sharing it, while SDPA runs it as flash attention with native GQA and split-KV
        # over the cache. So these steps go to SDPA by design (no log line). With a padding mask SDPA would lose
        # both (transformers then repeats K/V or packs the group into the query, off the flash path): those stay.
        KERNEL_CALLS["decode_sdpa"] += 1
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )

    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    key_valid = mask = None
    causal, causal_offset = bool(is_causal) and query.shape[2] > 1, 0
    if attention_mask is not None:
        key_valid, causal, causal_offset, mask = _mask_split_cache.get(attention_mask)
    out = flash_attention(
        query, key, value, causal=causal, causal_offset=causal_offset, key_valid=key_valid, mask=mask, scale=scaling
    )
    return out, None


def register_vica2_attention() -> None:
    """Register `vica2_fused` with transformers' attention and mask interfaces (idempotent).

    Qwen2, SigLIP and the Hiera tower all dispatch through `ALL_ATTENTION_FUNCTIONS`, so the one name serves
    the whole model; `sdpa_mask` makes the masks (None when purely causal without padding).
    """
    AttentionInterface.register(ATTENTION_NAME, vica2_fused_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


__all__ = [
    "ATTENTION_NAME",
    "KERNELS_INTERPRETED",
    "Vica2FusedHieraBlock",
    "flash_attention",
    "hiera_window_attention",
    "kernel_call_counts",
    "register_vica2_attention",
    "reset_kernel_call_counts",
    "use_fused_hiera_blocks",
    "vica2_fused_attention_forward",
]
