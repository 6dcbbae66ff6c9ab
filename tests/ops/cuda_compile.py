"""Compiling Triton kernels for a GPU without one (the slow ``compile_for_cuda`` tests): Triton's
compiler runs down to a cubin on any machine, and catches what the interpreter does not check
(dot shapes, loop-carried types, shared-memory size: every tensor a product reads is staged in
shared memory until its last product). A process that imported Triton in interpreter mode cannot
compile, so each check runs in a fresh one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONSTEXPRS = ("TINY", "BLOCK_C", "BLOCK_D", "BLOCK_H", "DELTA", "SELF_TARGET", "EPS", "CURVATURE_EPS")


def assert_compiles(kernels, options: dict, first_int: str, arch: int, shared_limit: int) -> None:
    """Compile each of ``kernels`` for sm_``arch`` with the launch ``options`` (float32 pointers
    before the argument ``first_int``, i32 from it on, the constexprs in ``CONSTEXPRS``); assert
    each fits ``shared_limit`` bytes of shared memory, and print what it uses."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = dict(options)
    constants = {name: options.pop(name) for name in CONSTEXPRS}
    for kernel in kernels:
        names = kernel.arg_names
        first = names.index(first_int)
        signature = {n: "*fp32" if i < first else "constexpr" if n in constants else "i32" for i, n in enumerate(names)}
        source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        assert compiled.metadata.shared <= shared_limit, (kernel.__name__, compiled.metadata.shared, shared_limit)
        print(kernel.__name__, "shared bytes", compiled.metadata.shared, "warps", compiled.metadata.num_warps)


def run_compile_check(script: str, *argv: str) -> None:
    """Run ``script`` (which calls ``assert_compiles``) with ``argv`` in a fresh, uninterpreted process."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; install the dev extra to test the Triton kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    result = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
