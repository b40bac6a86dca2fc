"""benchmarks/gpu_check.sh runs as is: every part of it, end to end, in its tiny mode (on CPU without a GPU, the
Triton kernels in the interpreter), and its checks are ones that fail on a wrong decode."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.flash_like import NAME as FLASH_LIKE
from tests.paths import ROOT

pytest.importorskip("triton")

PARTS = {"smollm2_preset", "llama3_8b_layer", "sliding_flash_masks", "storage_codec"}


def gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check")


def assert_checks_pass(part: dict) -> None:
    assert part["checks"], "a part with no checks proves nothing"
    for name, c in part["checks"].items():
        assert ("at_most" in c) != ("at_least" in c), f"{name}: one stated threshold"
        assert c["passed"], f"{name}: {c}"


@pytest.mark.triton
def test_gpu_check_tiny_end_to_end(tmp_path):
    env = {**os.environ, "KVHUB_SKIP_INSTALL": "1", "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--tiny"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["tiny"] and result["passed"] and result["complete"] and result["dtype"] == "bfloat16"
    assert result["triton_tests"]["exit_status"] == 0
    assert "passed" in result["triton_tests"]["summary"] and "failed" not in result["triton_tests"]["summary"]
    assert set(result["parts"]) == PARTS
    for part in result["parts"].values():
        assert part["status"] == "passed", part.get("traceback") or part
        assert_checks_pass(part)

    preset = result["parts"]["smollm2_preset"]
    assert {"forced_top1_agreement", "max_logit_rel_diff", "ppl_rel_delta"} <= set(preset["checks"])
    # every decode step of both layers on the Triton backend (the interpreter here), nothing passed over
    assert preset["decode"]["backends"] == {"calls": {"triton": 2 * preset["decode"]["steps"]}, "fallbacks": {}}
    assert preset["perplexity"]["backends"]["calls"]["triton"] > 0
    assert {(r["context"], r["batch"]) for r in preset["steps"]} == {(40, 1), (40, 2)}
    assert all(r["step_ms"]["kvhub"] > 0 and r["kvhub_over_dynamic_sdpa"] > 0 for r in preset["steps"])

    layer = result["parts"]["llama3_8b_layer"]
    cases = {(c, b) for c in (80, 150) for b in (1, 2)}
    assert {(r["context"], r["batch"]) for r in layer["model_step"]} == cases
    assert {(r["context"], r["batch"]) for r in layer["attention_only"]} == cases
    assert layer["codec"]["values"]["quantizer"] == "lloyd-max" and layer["codec"]["keys"]["scale_format"] == "log8"
    for row in layer["model_step"]:
        assert row["step_ms"]["DynamicCache"] > 0 and row["backends"]["calls"]["triton"] > 0
        # 4-bit keys and 3-bit values with one byte of scale per segment, sink tokens exact: under half the bytes
        assert row["cache_bytes"]["kvhub"] < 0.5 * row["cache_bytes"]["DynamicCache"]
    for row in layer["attention_only"]:
        assert row["sdpa_ms"] > 0 and all(c["kernel_ms"] > 0 for c in row["configs"])
        assert f"kernel_vs_decoded_sdpa_max_rel_err {row['context']}x{row['batch']}" in layer["checks"]

    sliding = result["parts"]["sliding_flash_masks"]
    assert sliding["kernel"] == FLASH_LIKE and "flash-attn" in sliding["kernel_reason"]
    assert sliding["lossless"]["first_step_position"] > sliding["sliding_window"]  # every step past the window
    assert sliding["lossless"]["backends"]["calls"]["triton"] > 0
    assert sliding["step"]["kvhub_over_dynamic_sdpa"] > 0

    storage = result["parts"]["storage_codec"]
    assert set(storage["budgets"]) == {"10x", "16x"}
    for row in storage["budgets"].values():  # every byte of a chunk counted: far under the fp16 chunk's
        assert row["bytes"] < storage["fp16"]["bytes"] and row["store_ms"] > 0 and row["load_ms"] > 0


def test_sliding_check_catches_a_layer_that_ignores_its_window(tmp_path, monkeypatch):
    """Issue #21's first bug put back (a sliding layer under the flash mask, which is None, attends past its window):
    the lossless check fails. On the PyTorch backend, so the check is tested without the interpreter's cost."""
    from kvhub.layer import CompressedLayer

    check = gpu_check()
    monkeypatch.setenv("KVHUB_KERNELS", "torch")
    monkeypatch.setattr(CompressedLayer, "_window_mask", lambda self, mask, query_length, total: mask)
    env = check.Env(torch.device("cpu"), True, check.TINY_RUN, time.time() + 300, tmp_path)
    env.result = {"started": time.time()}
    part = {"checks": {}}
    check.sliding_flash_masks(env, part)
    lossless = part["checks"]["lossless max_logit_rel_diff vs DynamicCache"]
    assert not lossless["passed"], lossless
    assert not part["checks"]["lossless decode: calls on triton"]["passed"]  # and the backend check saw torch


def test_status_counts_failures_and_skips():
    check = gpu_check()
    part = {"checks": {}}
    check.check(part, "nan", math.nan, at_most=1.0)
    check.check(part, "low", 0.5, at_least=0.8)
    check.check(part, "fine", 0.1, at_most=0.2)
    assert [c["passed"] for c in part["checks"].values()] == [False, False, True]

    def result(*statuses, tests=0):
        return {"parts": dict(zip(check.PARTS, ({"status": s} for s in statuses))), "triton_tests": {"exit_status": tests}}

    every = ["passed"] * len(check.PARTS)
    assert check.summarize(result(*every)) == 0
    assert check.summarize(result("passed", "failed", *every[2:])) == 1
    assert check.summarize(result(*every, tests=1)) == 1
    assert check.summarize(result("passed", "partial", *every[2:])) == 2
    assert check.summarize(result(*every[1:])) == 2  # the budget stopped the run before the last part
    assert check.summarize(result(*every, tests=124)) == 2
