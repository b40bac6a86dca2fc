"""Compile the Triton decode kernels for an H100/H200 (sm_90) on a machine without a GPU.

Triton's interpreter runs the kernels' Python and accepts constructs that do not lower to GPU code (a constexpr
tuple copied into a local, for one), so interpreter tests alone do not prove the kernels build. This runs every
specialization the kernel tests launch through Triton's own launch path, with the launch skipped (``warmup``) and a
stand-in driver that names the target instead of asking a GPU: Triton's front end, its NVIDIA passes and the bundled
``ptxas`` all run. Prints one line per compiled kernel (with ptxas' register and spill counts) and exits non-zero on
any compile error. Needs a process where triton was imported without ``TRITON_INTERPRET``:
``python -m tests.hopper_compile``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from kvhub.kernels import decode_attention
from tests.test_kernels import RUNS, inputs

HOPPER = GPUTarget("cuda", 90, 32)


class _TargetOnlyDriver:
    """What Triton's launch path asks the driver before compiling, answered without a device."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return HOPPER


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with tempfile.TemporaryDirectory(prefix="kvhub-triton-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compile for real, not from an earlier run's cache
        compile_all()


def compile_all() -> None:
    triton.runtime.driver.set_active(_TargetOnlyDriver())
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        assert "cubin" in kernel.asm, f"{self.__name__}: no cubin"
        stats = re.findall(r"(\d+) bytes spill stores|Used (\d+) registers", log.getvalue())
        spill = next(a for a, _ in stats if a)
        regs = next(b for _, b in stats if b)
        print(f"{self.__name__}: sm_{HOPPER.arch}, {regs} registers, {spill} bytes spilled")
        return kernel

    JITFunction.run = compile_only
    for case, dtype, length, padded, softcap, split in RUNS:
        print(f"{case} {dtype} length={length}")
        decode_attention(*inputs(case, dtype, length, padded, softcap, device="cpu"), split_tokens=split)


if __name__ == "__main__":
    main()
