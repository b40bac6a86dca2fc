"""Fused decode attention on the compressed storage, in Triton (flash-decoding in two passes).

Both passes read a stream as its :class:`~kvhub.plan.DecodePlan` says (the same plan the PyTorch and C backends
read): raw values in storage order (centred codes, tabled levels, 16-bit data) against the matrix ``[W | mean]``.

Pass 1, ``_history_kernel``, one program per (batch, KV head, token split, row block): walks its share of the
compressed history in tiles of ``BT`` tokens. Per tile it loads each segment's packed bytes once, takes every code
plane out with a shift and a mask in registers (a tabled level set is one gather from its 16- or 4-entry table),
and scores it against the matching columns of ``q W_k`` (tensor-core dots, fp32 accumulation); per-token scales
(fp16, or a byte looked up in the plan's scale table) scale the plane scores, ``q . mean_k`` is added once. An
online softmax keeps a running max and sum, and the value codes are accumulated the same way, weighted by ``p *
scale``, in the coordinates of ``W_v`` (storage order, one accumulator per plane). The rows of a program are all the
queries that share one KV head (``group * q_len``), so grouped-query attention reads each code once and never
repeats K/V. Offsets are int64 throughout (a 32k-token, 32-head context overflows int32 element offsets).

Pass 2, ``_combine_kernel``, one program per (batch, KV head, row block): merges the splits' partial softmax states,
adds the exact tokens (sink and recent) to the same online softmax, maps the history's accumulator back with
``W_v`` and adds ``sum(p) * mean_v``.

Scores are ``softcap(scaling * q.k)`` plus the additive masks, the same order as :mod:`kvhub.attention`. A row that
every mask hides gets zeros (no NaN).

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on CPU tensors: that is how
the test suite proves them without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import pow2
from .cpu import SCALE_KINDS  # the same codes for both kernels: fp16 values 1, byte codes looked up 2

_DOT_OPERAND = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "ieee"}


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """fp32-accumulated product; operands in the model's 16-bit type (tensor cores), or exact fp32 for fp32 models."""
    if DOT == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT == "bf16-interpreted":  # the interpreter's bf16 dot is wrong: round to bf16, multiply exactly in fp32
        out = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    elif DOT == "fp16":
        out = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return out


@triton.jit
def _tile(ptr, strides, b, h, t, t_ok, WIDTH: tl.constexpr, WPAD: tl.constexpr):
    """[BT, WPAD] stored rows of one segment (bytes, or 16-bit coefficients) for tokens ``t``; zero outside."""
    c = tl.arange(0, WPAD)
    offs = b.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[1] + t.to(tl.int64)[:, None] * strides[2] + c[None, :]
    return tl.load(ptr + offs, mask=t_ok[:, None] & (c[None, :] < WIDTH), other=0)


@triton.jit
def _zeros(ROWS: tl.constexpr, COLS: tl.constexpr):
    return tl.zeros([ROWS, COLS], tl.float32)


@triton.jit
def _columns(rows_ptr, row_ok, COL: tl.constexpr, N: tl.constexpr, NPAD: tl.constexpr):
    """[RB, NPAD] of a row-major matrix's columns ``COL .. COL+N`` (zero beyond)."""
    c = tl.arange(0, NPAD)
    return tl.load(rows_ptr + COL + c[None, :], mask=row_ok[:, None] & (c < N)[None, :], other=0.0)


@triton.jit
def _levels(tile, table, BITS: tl.constexpr, SHIFT: tl.constexpr, CENTRE: tl.constexpr, TABLED: tl.constexpr):
    """One code plane as raw values (:mod:`kvhub.plan`): ``code - CENTRE`` (exact in bf16), ``table[code]`` for a
    tabled level set; 16-bit data as is."""
    if BITS == 16:
        out = tile.to(tl.float32)
    else:
        code = (tile >> SHIFT) & ((1 << BITS) - 1)
        if TABLED:
            out = tl.load(table + code.to(tl.int32))
        else:
            out = code.to(tl.float32) - CENTRE
    return out


@triton.jit
def _token_scale(scales, strides, lut, groups, b, h, t, t_ok, INDEX: tl.constexpr, KIND: tl.constexpr,
                 BT: tl.constexpr):
    """[BT] per-token scale of one segment: read as fp16 (``KIND`` 1) or as a byte code looked up in the plan's
    scale table ``lut`` [H, groups, 256] (``KIND`` 2, log8). 1 where the scale is static (folded into the plan's
    matrix) or the segment is 16-bit."""
    if INDEX >= 0:
        offs = b.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[1] + t.to(tl.int64) * strides[2] + INDEX
        if KIND == 2:
            code = tl.load(scales + offs, mask=t_ok, other=0).to(tl.int64)
            step = tl.load(lut + (h.to(tl.int64) * groups + INDEX) * 256 + code, mask=t_ok, other=0.0)
        else:
            step = tl.load(scales + offs, mask=t_ok, other=0).to(tl.float32)
    else:
        step = tl.full([BT], 1.0, tl.float32)
    return step


@triton.jit
def _softcap(s, cap):
    """``cap * tanh(s / cap)``, written with exp so it saturates cleanly (exp overflow gives exactly +-cap)."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))


@triton.jit
def _online_step(s, m_i):
    """New running max, the factor that rescales the old state, and the tile's unnormalized weights. A row with no
    visible key so far keeps max -inf and gets zero weights instead of NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp(m_i - m_use), tl.exp(s - m_use[:, None])


@triton.jit
def _history_kernel(
    qk, qk_strides,
    k_codes, k_strides, k_tables, k_scales, k_scale_strides, k_lut, k_groups,
    v_codes, v_strides, v_tables, v_scales, v_scale_strides, v_lut, v_groups,
    mask, mask_strides,
    part_m, part_l, part_acc,
    H, R, M, length, split_tokens, scaling, softcap,
    K_SEGS: tl.constexpr, K_PLANES: tl.constexpr, V_SEGS: tl.constexpr, V_PLANES: tl.constexpr,
    K_SCALES: tl.constexpr, V_SCALES: tl.constexpr,
    RK: tl.constexpr, RV: tl.constexpr, RB: tl.constexpr, BT: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr,
):
    bh, split, rblock = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rows = rblock * RB + tl.arange(0, RB)
    row_ok = rows < R
    t_lo = split * split_tokens
    t_hi = tl.minimum(t_lo + split_tokens, length)

    # Per-segment and per-plane values are tuples built in unrolled loops (``tl.static_range``) over the constexpr
    # layouts, which are indexed in place (a local copy of one is not constexpr): this compiles on Triton 3.6 to 3.9.
    q_rows = qk + b.to(tl.int64) * qk_strides[0] + h.to(tl.int64) * qk_strides[1] + rows.to(tl.int64)[:, None] * qk_strides[2]
    q_planes = ()
    for i in tl.static_range(len(K_PLANES)):
        q_planes = q_planes + (_columns(q_rows, row_ok, K_PLANES[i][5], K_PLANES[i][3], K_PLANES[i][4]),)
    q_mean = tl.load(q_rows + RK, mask=row_ok[:, None], other=0.0)  # [RB, 1]: q . mean_k

    m_i = tl.full([RB], float("-inf"), tl.float32)
    l_i = tl.zeros([RB], tl.float32)
    accs = ()
    for i in tl.static_range(len(V_PLANES)):
        accs = accs + (_zeros(RB, V_PLANES[i][4]),)
    for t0 in range(t_lo, t_hi, BT):
        t = t0 + tl.arange(0, BT)
        t_ok = t < t_hi
        k_tiles = ()
        k_steps = ()
        for i in tl.static_range(len(K_SEGS)):
            k_tiles = k_tiles + (_tile(k_codes[i], k_strides[i], b, h, t, t_ok, K_SEGS[i][1], K_SEGS[i][2]),)
            k_steps = k_steps + (_token_scale(k_scales, k_scale_strides, k_lut, k_groups, b, h, t, t_ok, K_SEGS[i][3],
                                              K_SCALES, BT),)
        s = tl.broadcast_to(q_mean, [RB, BT])
        for i in tl.static_range(len(K_PLANES)):
            levels = _levels(k_tiles[K_PLANES[i][0]], k_tables[K_PLANES[i][0]], K_PLANES[i][1], K_PLANES[i][2],
                             K_SEGS[K_PLANES[i][0]][4], K_SEGS[K_PLANES[i][0]][5])
            s += _dot(q_planes[i], tl.trans(levels), DOT) * k_steps[K_PLANES[i][0]][None, :]
        s = s * scaling
        if SOFTCAP:
            s = _softcap(s, softcap)
        if HAS_MASK:
            offs = (b.to(tl.int64) * mask_strides[0] + (rows % M).to(tl.int64)[:, None] * mask_strides[1]
                    + t.to(tl.int64)[None, :] * mask_strides[2])
            s += tl.load(mask + offs, mask=row_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_i, alpha, p = _online_step(s, m_i)
        l_i = l_i * alpha + tl.sum(p, 1)

        v_tiles = ()
        v_weights = ()
        for i in tl.static_range(len(V_SEGS)):
            v_tiles = v_tiles + (_tile(v_codes[i], v_strides[i], b, h, t, t_ok, V_SEGS[i][1], V_SEGS[i][2]),)
            step = _token_scale(v_scales, v_scale_strides, v_lut, v_groups, b, h, t, t_ok, V_SEGS[i][3], V_SCALES, BT)
            v_weights = v_weights + (p * step[None, :],)
        updated = ()
        for i in tl.static_range(len(V_PLANES)):
            levels = _levels(v_tiles[V_PLANES[i][0]], v_tables[V_PLANES[i][0]], V_PLANES[i][1], V_PLANES[i][2],
                             V_SEGS[V_PLANES[i][0]][4], V_SEGS[V_PLANES[i][0]][5])
            updated = updated + (accs[i] * alpha[:, None] + _dot(v_weights[V_PLANES[i][0]], levels, DOT),)
        accs = updated

    out = (bh.to(tl.int64) * tl.num_programs(1) + split) * R + rows
    tl.store(part_m + out, m_i, mask=row_ok)
    tl.store(part_l + out, l_i, mask=row_ok)
    for i in tl.static_range(len(V_PLANES)):
        c = tl.arange(0, V_PLANES[i][4])
        tl.store(part_acc + out[:, None] * RV + V_PLANES[i][5] + c[None, :], accs[i],
                 mask=row_ok[:, None] & (c < V_PLANES[i][3])[None, :])


@triton.jit
def _combine_kernel(
    query, q_strides,
    part_m, part_l, part_acc, n_splits,
    exact_k, ek_strides, exact_v, ev_strides, n_exact, mask, mask_strides,
    matrix, matrix_strides,
    out, out_strides,
    H, G, R, M, D, RV, scaling, softcap,
    RB: tl.constexpr, DP: tl.constexpr, RVP: tl.constexpr, BE: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr,
):
    bh, rblock = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = rblock * RB + tl.arange(0, RB)
    row_ok = rows < R
    d = tl.arange(0, DP)
    d_ok = d < D
    c = tl.arange(0, RVP)
    c_ok = c < RV

    # Merge the history splits.
    m_i = tl.full([RB], float("-inf"), tl.float32)
    l_i = tl.zeros([RB], tl.float32)
    acc_z = tl.zeros([RB, RVP], tl.float32)
    for split in range(n_splits):
        part = (bh.to(tl.int64) * n_splits + split) * R + rows
        m_s = tl.load(part_m + part, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, beta = tl.exp(m_i - m_use), tl.exp(m_s - m_use)
        l_i = l_i * alpha + tl.load(part_l + part, mask=row_ok, other=0.0) * beta
        a_s = tl.load(part_acc + part[:, None] * RV + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        acc_z = acc_z * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new
    l_hist = l_i  # the history's share of the softmax sum, the weight of mean_v

    # The exact tokens join the same softmax.
    g, mq = rows // M, rows % M
    q_offs = (b.to(tl.int64) * q_strides[0] + (h * G + g).to(tl.int64)[:, None] * q_strides[1]
              + mq.to(tl.int64)[:, None] * q_strides[2])
    q = tl.load(query + q_offs + d[None, :] * q_strides[3], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    acc_x = tl.zeros([RB, DP], tl.float32)
    for e0 in range(0, n_exact, BE):
        e = e0 + tl.arange(0, BE)
        e_ok = e < n_exact
        kv_mask = e_ok[:, None] & d_ok[None, :]
        k_offs = (b.to(tl.int64) * ek_strides[0] + h.to(tl.int64) * ek_strides[1] + e.to(tl.int64)[:, None] * ek_strides[2]
                  + d[None, :] * ek_strides[3])
        k = tl.load(exact_k + k_offs, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT) * scaling
        if SOFTCAP:
            s = _softcap(s, softcap)
        if HAS_MASK:
            offs = (b.to(tl.int64) * mask_strides[0] + mq.to(tl.int64)[:, None] * mask_strides[1]
                    + e.to(tl.int64)[None, :] * mask_strides[2])
            s += tl.load(mask + offs, mask=row_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(e_ok[None, :], s, float("-inf"))
        m_i, alpha, p = _online_step(s, m_i)
        l_i = l_i * alpha + tl.sum(p, 1)
        l_hist = l_hist * alpha
        acc_z = acc_z * alpha[:, None]
        v_offs = (b.to(tl.int64) * ev_strides[0] + h.to(tl.int64) * ev_strides[1] + e.to(tl.int64)[:, None] * ev_strides[2]
                  + d[None, :] * ev_strides[3])
        acc_x = acc_x * alpha[:, None] + _dot(p, tl.load(exact_v + v_offs, mask=kv_mask, other=0.0), DOT)

    # Back from the plan's coordinates: (sum_t p_t s_t c_t) W_v^T + (sum_t p_t) mean_v (matrix column RV).
    m_rows = matrix + h.to(tl.int64) * matrix_strides[0] + d[:, None] * matrix_strides[1]
    u = tl.load(m_rows + c[None, :] * matrix_strides[2], mask=d_ok[:, None] & c_ok[None, :], other=0.0)
    mu = tl.load(matrix + h.to(tl.int64) * matrix_strides[0] + d * matrix_strides[1] + RV * matrix_strides[2], mask=d_ok,
                 other=0.0)
    o = _dot(acc_z, tl.trans(u), DOT) + l_hist[:, None] * mu[None, :] + acc_x
    o = tl.where(l_i[:, None] > 0, o / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    o_offs = (b.to(tl.int64) * out_strides[0] + (h * G + g).to(tl.int64)[:, None] * out_strides[1]
              + mq.to(tl.int64)[:, None] * out_strides[2])
    tl.store(out + o_offs + d[None, :] * out_strides[3], o.to(out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _stored(stream, length: int):
    """Per kept segment: the stored tensor over the first ``length`` tokens and its (batch, head, token) strides."""
    views = [store.view().narrow(2, 0, length) for store in stream.codes]
    return tuple(views), tuple(tuple(v.stride()[:3]) for v in views)


def _constants(plan):
    """The plan as the kernels' compile-time tuples: per segment ``(bits, width, width_pad, scale index, centre,
    tabled)``, per code plane ``(segment, bits, shift, n, n_pad, column)``."""
    segments, planes = [], []
    for i, seg in enumerate(plan.segments):
        segments.append((seg.bits, seg.width, pow2(seg.width), -1 if seg.scale is None else seg.scale,
                         float(seg.centre), seg.table is not None))
        for j in range(seg.planes):
            planes.append((i, seg.bits, j * seg.bits if seg.bits < 16 else 0, seg.width, pow2(seg.width),
                           seg.start + j * seg.width))
    return tuple(segments), tuple(planes)


def _stream_args(stream, plan, length: int, fallback: torch.Tensor):
    """Codes, strides, level tables, scales, scale strides, scale table and its group count of one stream."""
    codes, strides = _stored(stream, length)
    tables = tuple(seg.table if seg.table is not None else fallback for seg in plan.segments)
    if not stream.n_scaled:
        return codes, strides, tables, fallback, (0, 0, 0), fallback, 1
    scales = stream.stored_scales(0, length)
    assert scales.stride(-1) == 1
    lut = plan.scale_table if plan.scale_table is not None else fallback
    return codes, strides, tables, scales, tuple(scales.stride()[:3]), lut, max(1, plan.scaled_groups)


def _scale_kind(stream) -> int:
    return SCALE_KINDS[stream.scales.buf.dtype] if stream.n_scaled else 0


def _mask(mask: torch.Tensor | None, fallback: torch.Tensor):
    return (fallback, (0, 0, 0)) if mask is None else (mask, tuple(mask.stride()))


def default_split_tokens(programs: int, length: int, block: int, device: torch.device) -> int:
    """Tokens per split (a multiple of ``block``): enough splits for about two waves of programs over the GPU's
    multiprocessors, never less than four tiles per split (a split's fixed cost is one partial state)."""
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = max(1, min(triton.cdiv(2 * units, programs), triton.cdiv(length, 4 * block)))
    return triton.cdiv(triton.cdiv(length, splits), block) * block


def decode_attention(query, keys, values, length, exact_k, exact_v, history_mask, exact_mask, scaling, softcap=None,
                     *, block_tokens: int = 64, split_tokens: int | None = None, num_warps: int = 4, num_stages: int = 3):
    """See :func:`kvhub.kernels.decode_attention`. ``block_tokens``: tokens per tile; ``split_tokens``: tokens per
    history split (default: :func:`default_split_tokens`); ``num_warps``, ``num_stages``: the history kernel's
    Triton launch options (stages: how many tiles' loads are in flight)."""
    bsz, q_heads, q_len, dim = query.shape
    kv_heads = exact_k.shape[1]
    group, rows = q_heads // kv_heads, (q_heads // kv_heads) * q_len
    device = query.device
    if query.dtype not in _DOT_OPERAND:
        raise ValueError(f"decode_attention takes bf16, fp16 or fp32 queries, not {query.dtype}")
    dot = _DOT_OPERAND[query.dtype]
    if dot == "bf16" and os.environ.get("TRITON_INTERPRET") == "1":
        dot = "bf16-interpreted"
    rb = min(pow2(rows), 64)
    row_blocks = triton.cdiv(rows, rb)
    k_plan, v_plan = keys.plan(), values.plan()
    k_segs, k_planes = _constants(k_plan)
    v_segs, v_planes = _constants(v_plan)
    rv = v_plan.rank
    softcap_on = bool(softcap)
    softcap = float(softcap) if softcap_on else 1.0

    if length > 0:
        split_tokens = split_tokens or default_split_tokens(bsz * kv_heads * row_blocks, length, block_tokens, device)
        n_splits = triton.cdiv(length, split_tokens)
    else:
        n_splits = 0
    part_m = torch.empty(bsz * kv_heads, n_splits, rows, device=device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(bsz * kv_heads, n_splits, rows, rv, device=device)
    if n_splits:
        # q U_k and q . mean_k for every row: [B, Hkv, group * q_len, r_k + 1], the rows sharing a KV head together.
        qk = torch.matmul(query.float().reshape(bsz, kv_heads, rows, dim), k_plan.matrix)
        h_mask, h_mask_strides = _mask(history_mask, qk)
        _history_kernel[(bsz * kv_heads, n_splits, row_blocks)](
            qk, tuple(qk.stride()[:3]),
            *_stream_args(keys, k_plan, length, qk),
            *_stream_args(values, v_plan, length, qk),
            h_mask, h_mask_strides,
            part_m, part_l, part_acc,
            kv_heads, rows, q_len, length, split_tokens, float(scaling), softcap,
            K_SEGS=k_segs, K_PLANES=k_planes, V_SEGS=v_segs, V_PLANES=v_planes,
            K_SCALES=_scale_kind(keys), V_SCALES=_scale_kind(values),
            RK=k_plan.rank, RV=rv, RB=rb, BT=block_tokens,
            HAS_MASK=history_mask is not None, SOFTCAP=softcap_on, DOT=dot, num_warps=num_warps, num_stages=num_stages,
        )
    out = torch.empty(bsz, q_heads, q_len, dim, dtype=query.dtype, device=device)
    e_mask, e_mask_strides = _mask(exact_mask, query)
    _combine_kernel[(bsz * kv_heads, row_blocks)](
        query, tuple(query.stride()),
        part_m, part_l, part_acc, n_splits,
        exact_k, tuple(exact_k.stride()), exact_v, tuple(exact_v.stride()), exact_k.shape[2], e_mask, e_mask_strides,
        v_plan.matrix, tuple(v_plan.matrix.stride()),
        out, tuple(out.stride()),
        kv_heads, group, rows, q_len, dim, rv, float(scaling), softcap,
        RB=rb, DP=pow2(dim), RVP=pow2(rv), BE=16, HAS_MASK=exact_mask is not None, SOFTCAP=softcap_on, DOT=dot,
        num_warps=4,  # ptxas for sm_90, bf16, head_dim 128, r 128: 198 registers, no spill (tests/hopper_compile.py)
    )
    return out
