"""benchmarks/gpu_check.sh runs as is: every part of it, end to end, in its tiny mode (on CPU without a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.paths import ROOT

pytest.importorskip("triton")


@pytest.mark.triton
def test_gpu_check_tiny_end_to_end(tmp_path):
    env = {**os.environ, "KVHUB_SKIP_INSTALL": "1", "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--tiny"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["tiny"] and result["triton_tests"]["exit_status"] == 0
    assert "passed" in result["triton_tests"]["summary"] and "failed" not in result["triton_tests"]["summary"]
    cases = {(c, b) for c in (80, 150) for b in (1, 2)}
    assert {(r["context"], r["batch"]) for r in result["model_step"]} == cases
    assert {(r["context"], r["batch"]) for r in result["attention_only"]} == cases
    for row in result["model_step"]:
        assert row["dynamic_sdpa"]["step_ms"] > 0 and row["kvhub"]["step_ms"] > 0
        # 4-bit keys and 3-bit values with one fp16 scale per segment, sink tokens exact: well under half the bytes
        assert row["kvhub"]["cache_bytes"] < 0.5 * row["dynamic_sdpa"]["cache_bytes"]
    for row in result["attention_only"]:
        assert row["sdpa_ms"] > 0 and all(c["kernel_ms"] > 0 for c in row["configs"])
        # the fused kernel against SDPA over the decoded K/V, both in bf16
        assert row["kernel_vs_decoded_sdpa_max_rel_err"] < 0.05
