"""The fused Triton decode kernels against an independent PyTorch reference.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py`` before
anything imports triton). The reference rebuilds K/V with ``CompressedStream.decode``
(unpack, dequantize, project back) and runs plain float64 softmax attention with repeated KV heads: it shares no
code with the kernels' storage-order planes, folded steps or online softmax."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvhub.kernels import backend, decode_attention
from tests.paths import ROOT
from tests.tiny_models import random_stream as stream

pytest.importorskip("triton")

pytestmark = pytest.mark.triton
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Error allowed, relative to the largest output magnitude (measured: fp32 3e-7, fp16 4e-4, bf16 6e-3). fp32 runs
# exact dots; with 16-bit queries the operands of every tensor-core dot (q U_k, the softmax weights, the exact
# tokens, the coefficient accumulator) are rounded to the query's dtype, as SDPA rounds its softmax weights.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference(query, keys, values, length, exact_k, exact_v, history_mask, exact_mask, scaling, softcap):
    group = query.shape[1] // exact_k.shape[1]
    k = torch.cat([keys.decode(torch.float32)[:, :, :length], exact_k.float()], 2).double().repeat_interleave(group, 1)
    v = torch.cat([values.decode(torch.float32)[:, :, :length], exact_v.float()], 2).double().repeat_interleave(group, 1)
    s = query.double() @ k.transpose(-1, -2) * scaling
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if history_mask is not None:
        s = s + torch.cat([history_mask, exact_mask], -1).double()[:, None]
    return torch.softmax(s, -1) @ v


# (head_dim, GQA group, query tokens, key segments, key projection/scale[/scale format], value segments, value ...)
CASES = {
    "llama-shaped": (128, 4, 1, [(128, 4)], ("pca", "token"), [(64, 4), (64, 2)], ("pca", "rms")),
    "every-width-dropped-tail": (64, 1, 3, [(8, 16), (8, 8), (16, 4), (16, 2), (16, 0)], ("pca", "channel"),
                                 [(8, 16), (24, 8), (12, 4), (20, 2)], ("pca", "token")),
    "identity-gqa8": (64, 8, 2, [(64, 8)], ("identity", "token"), [(32, 16), (32, 4)], ("identity", "rms")),
    "speculative-16": (128, 2, 16, [(32, 8), (96, 2)], ("pca", "rms"), [(96, 4), (32, 0)], ("pca", "channel")),
    "log8-scales": (64, 2, 1, [(16, 8), (48, 4)], ("pca", "token", "log8"), [(32, 4), (32, 2)], ("pca", "rms", "log8")),
    # the bundled SmolLM2 preset's formats: Lloyd-Max values, log8 scales on both streams
    "bundled-formats": (64, 3, 1, [(64, 4)], ("pca", "token", "log8"), [(32, 4), (32, 2)],
                        ("pca", "rms", "log8", "lloyd-max")),
}


def fmt(kind: tuple[str, ...]) -> str:
    return kind[2] if len(kind) > 2 else "fp16"


def quantizer(kind: tuple[str, ...]) -> str:
    return kind[3] if len(kind) > 3 else "uniform"


def inputs(case, dtype, length, padded, softcap, device=DEVICE):
    """Arguments of ``decode_attention`` for one of ``CASES``: 2 sequences, 2 KV heads, 211 stored tokens, 6 exact
    tokens plus the queries' own. ``padded``: sequence 1 is left-padded (its 2 sink tokens and first 13 history
    tokens hidden) and the queries see each other causally."""
    dim, group, q_len, k_segs, k_kind, v_segs, v_kind = CASES[case]
    bsz, kv_heads, stored, n_exact = 2, 2, 211, 6 + q_len
    gen = torch.Generator().manual_seed(7)
    # 16-bit segments of the keys in the queries' dtype (fp32: the lossless mode), of the values in fp16
    keys = stream(k_segs, *k_kind[:2], kv_heads, dim, bsz, stored, dtype, 1, device, scale_format=fmt(k_kind),
                  quantizer=quantizer(k_kind))
    values = stream(v_segs, *v_kind[:2], kv_heads, dim, bsz, stored, torch.float16, 2, device,
                    scale_format=fmt(v_kind), quantizer=quantizer(v_kind))
    query = torch.randn(bsz, kv_heads * group, q_len, dim, generator=gen).to(device, dtype)
    exact_k = torch.randn(bsz, kv_heads, n_exact, dim, generator=gen).to(device, dtype)
    exact_v = torch.randn(bsz, kv_heads, n_exact, dim, generator=gen).to(device, dtype)
    history_mask = exact_mask = None
    if padded:
        history_mask = torch.zeros(bsz, q_len, length, device=device)
        exact_mask = torch.zeros(bsz, q_len, n_exact, device=device)
        history_mask[1, :, :13] = float("-inf")
        exact_mask[1, :, :2] = float("-inf")
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).triu(1)
        exact_mask[:, :, -q_len:].masked_fill_(causal, float("-inf"))
    return query, keys, values, length, exact_k, exact_v, history_mask, exact_mask, dim**-0.5, softcap


# (case, dtype, history length, padded batch, softcap, tokens per split: None = the GPU heuristic)
RUNS = [
    ("llama-shaped", torch.bfloat16, 203, False, None, None),
    ("every-width-dropped-tail", torch.float32, 150, True, 30.0, 64),
    ("identity-gqa8", torch.float16, 77, True, None, 32),
    ("speculative-16", torch.bfloat16, 95, True, 20.0, None),
    ("every-width-dropped-tail", torch.float16, 0, True, None, None),
    ("log8-scales", torch.float16, 120, True, None, None),
    ("bundled-formats", torch.bfloat16, 180, True, None, 64),
]


@pytest.mark.parametrize("case, dtype, length, padded, softcap, split", RUNS)
def test_kernel_matches_reference(case, dtype, length, padded, softcap, split):
    args = inputs(case, dtype, length, padded, softcap)
    got = decode_attention(*args, block_tokens=32, split_tokens=split)
    ref = reference(*args)
    assert got.shape == args[0].shape and got.dtype == dtype
    err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= TOL[dtype], f"relative error {err:.2e}"


def test_fully_masked_query_gets_zeros_not_nan():
    args = list(inputs("identity-gqa8", torch.float16, 77, True, None))
    args[6][1], args[7][1] = float("-inf"), float("-inf")  # sequence 1 sees nothing (a padding query)
    got = decode_attention(*args, block_tokens=32, split_tokens=32)
    ref = reference(*args)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    err = (got[0].double() - ref[0]).abs().max().item() / ref[0].abs().max().item()
    assert err <= TOL[torch.float16]


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("KVHUB_KERNELS", "torch")
    assert backend(DEVICE) == "torch"
    monkeypatch.setenv("KVHUB_KERNELS", "triton")
    assert backend(DEVICE) == "triton"
    monkeypatch.setenv("KVHUB_KERNELS", "auto")
    assert backend(torch.device("cpu")) != "triton"  # CPU tensors: the C kernels, or PyTorch (test_cpu_kernels.py)
    monkeypatch.setenv("KVHUB_KERNELS", "fast")
    with pytest.raises(ValueError, match="not one of"):
        backend(DEVICE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests above compile and run for real")
def test_kernels_compile_for_hopper():
    """Every specialization above also builds for an H100/H200 (sm_90), through Triton's compiler and ptxas: the
    interpreter alone accepts code the compiler rejects. In a fresh process, as triton must be imported without
    the interpreter (tests/hopper_compile.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "tests.hopper_compile"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = [line for line in run.stdout.splitlines() if ": sm_90," in line]
    assert len(compiled) == 2 * len(RUNS) - sum(1 for r in RUNS if r[2] == 0), run.stdout
