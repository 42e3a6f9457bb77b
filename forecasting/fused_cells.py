"""The elementwise part of a recurrent step, and a layer's whole time loop, as native calls
(fused_cells.c), built on first use.

forecasting.sequence_kernel runs a recurrent layer as one matrix product per step (near the CPU's
peak) plus the cell's elementwise update. As torch ops that update is 10-20 small calls per step,
each a pass over the gates plus its dispatch: ~40% of a training step at batch 512, hidden 64.
fused_cells.c does it in one vectorised loop per step and, in float32/float64, runs the whole time
loop itself, each step's products through the BLAS ?gemm_ that torch's products call (`blas_gemm`).
It is compiled here, on the machine that runs it (-march=native: the widest vector unit it has),
once per source/compiler/CPU, into a cache directory, and loaded with ctypes; ctypes drops the
GIL for the call.

Where it cannot be built (no C compiler, a failed compile or link, a library that will not load)
or FORECASTING_FUSED_CELLS=0, `library()` returns None, one warning says why, and sequence_kernel
keeps its torch-op path: the same results, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_cells.c")
# -ffast-math lets gcc vectorise the loops (reassociation, no errno; float's exp is inlined in
# the source); -fno-finite-math-only keeps NaN and infinities as torch has them (a diverging fit
# must show NaN losses, not a finite constant state). It is given to the compile step only:
# linked with it, gcc 12 adds crtfastmath.o, which would switch the whole process (torch
# included) to flush-to-zero on load.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fPIC", "-std=c11")
LINK_LIBS = ("-lm",)
ENV_SWITCH = "FORECASTING_FUSED_CELLS"
# (state dtype, products' dtype) -> the C functions' suffix
VARIANTS = {(torch.float32, torch.float32): "f32", (torch.float64, torch.float64): "f64",
            (torch.float32, torch.bfloat16): "mixed"}

_ARGS = {  # C signatures: l = long, p = pointer
    "lstm_forward": "llpppppplpl", "gru_forward": "llpppplpl", "rnn_forward": "llpplpl",
    "lstm_backward": "llpppppppl", "gru_backward": "llpplpppl", "rnn_backward": "llplpppl",
}
# The whole-layer loops and their product, for state and products of one dtype: (suffix, the
# BLAS's gemm symbol) per dtype, and signatures as _ARGS'.
SEQUENCE_VARIANTS = {torch.float32: ("f32", "sgemm_"), torch.float64: ("f64", "dgemm_")}
_SEQUENCE_ARGS = {"matmul": "plllpllplllpl", "sequence_forward": "plllllppppppp",
                  "sequence_backward": "plllllppppppplllpppppp"}


def cache_dir() -> Path:
    """$FORECASTING_CACHE_DIR, else $XDG_CACHE_HOME/forecasting, else ~/.cache/forecasting."""
    if os.environ.get("FORECASTING_CACHE_DIR"):
        return Path(os.environ["FORECASTING_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forecasting"


def _cpu_fingerprint() -> str:
    """What -march=native compiled for: a library built on another CPU may not run here."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def _build(compiler: list[str], target: Path) -> None:
    """Compile SOURCE into `target` atomically: concurrent builders (Dask workers) never load a
    half-written file; the last rename wins and every candidate is complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "fused_cells.o", Path(tmp) / target.name
        for command in ([*compiler, "-c", *COMPILE_FLAGS, str(SOURCE), "-o", str(obj)],
                        [*compiler, "-shared", str(obj), "-o", str(lib), *LINK_LIBS]):
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()[:500]}")
        os.replace(lib, target)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None where they cannot be (the reason is logged once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("fused cell kernels switched off (%s=0): torch ops instead", ENV_SWITCH)
        return None
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("gcc") or shutil.which("cc")]
    if compiler[0] is None:
        log.warning("fused cell kernels: no C compiler (gcc/cc, or $CC) found: torch ops instead")
        return None
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), *compiler, version, *COMPILE_FLAGS, *LINK_LIBS,
                                        _cpu_fingerprint()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"fused_cells-{key}.so"
        if not target.exists():
            _build(compiler, target)
            log.info("fused cell kernels built: %s", target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        log.warning("fused cell kernels could not be built or loaded (%s): torch ops instead", error)
        return None
    kinds = {"l": ctypes.c_long, "p": ctypes.c_void_p}
    typed = [(f"{name}_{suffix}", signature) for name, signature in _ARGS.items() for suffix in VARIANTS.values()]
    typed += [(f"{name}_{suffix}", signature) for name, signature in _SEQUENCE_ARGS.items()
              for suffix, _ in SEQUENCE_VARIANTS.values()]
    for name, signature in typed:
        function = getattr(lib, name)
        function.argtypes = [kinds[k] for k in signature]
        function.restype = None
    return lib


def kernels_for(dtype: torch.dtype, mm_dtype: torch.dtype | None = None) -> dict[str, ctypes._CFuncPtr] | None:
    """{"lstm_forward": fn, ...} for state in `dtype` and products in `mm_dtype` (default: the
    same), or None (no library, or a pair it lacks)."""
    lib = library()
    suffix = VARIANTS.get((dtype, mm_dtype or dtype))
    if lib is None or suffix is None:
        return None
    return {name: getattr(lib, f"{name}_{suffix}") for name in _ARGS}


@functools.cache
def blas_gemm(dtype: torch.dtype) -> int | None:
    """The address of the BLAS ?gemm_ that torch's own CPU products call (MKL, linked into
    libtorch_cpu on x86), checked against torch.mm; None where torch exports none (the layer
    loops then stay in Python, forecasting.sequence_kernel) or the check fails (logged once)."""
    lib = library()
    if lib is None or dtype not in SEQUENCE_VARIANTS:
        return None
    suffix, symbol = SEQUENCE_VARIANTS[dtype]
    for path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            gemm = ctypes.cast(getattr(ctypes.CDLL(str(path)), symbol), ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
        if _gemm_agrees_with_torch(getattr(lib, f"matmul_{suffix}"), gemm, dtype):
            return gemm
        log.warning("fused cell kernels: %s in %s disagrees with torch.mm: layer loops stay in Python", symbol, path)
        return None
    log.info("fused cell kernels: torch exports no %s: layer loops stay in Python", symbol)
    return None


def _gemm_agrees_with_torch(matmul: ctypes._CFuncPtr, gemm: int, dtype: torch.dtype) -> bool:
    """fused_cells.c's row-major product through `gemm` against torch.mm on the same numbers:
    each operand as given and transposed, rows wider than the matrix, and C += A B."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(7, 9, dtype=dtype, generator=generator)[:, :5]  # [7, 5], rows 9 apart
    b = torch.randn(5, 3, dtype=dtype, generator=generator)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for (a_given, a_t), (b_given, b_t), accumulate in itertools.product(
            ((a, 0), (a.t().contiguous(), 1)), ((b, 0), (b.t().contiguous(), 1)), (0, 1)):
        start = torch.randn(7, 4, dtype=dtype, generator=generator)  # [7, 3] in rows 4 apart
        c = start.clone()
        matmul(gemm, 7, 3, 5, a_given.data_ptr(), a_given.stride(0), a_t, b_given.data_ptr(), b_given.stride(0),
               b_t, accumulate, c.data_ptr(), c.stride(0))
        expected = a @ b + (start[:, :3] if accumulate else 0)
        if not (torch.allclose(c[:, :3], expected, **tolerance) and torch.equal(c[:, 3], start[:, 3])):
            return False
    return True


def sequence_kernels_for(
    dtype: torch.dtype, mm_dtype: torch.dtype | None = None,
) -> tuple[int, ctypes._CFuncPtr, ctypes._CFuncPtr] | None:
    """(gemm address, sequence_forward, sequence_backward) for state and products in `dtype`, or
    None: no library, no usable BLAS gemm, or products in another dtype (bf16-mixed)."""
    lib = library()
    if lib is None or (mm_dtype or dtype) != dtype or dtype not in SEQUENCE_VARIANTS:
        return None
    gemm = blas_gemm(dtype)
    if gemm is None:
        return None
    suffix = SEQUENCE_VARIANTS[dtype][0]
    return gemm, getattr(lib, f"sequence_forward_{suffix}"), getattr(lib, f"sequence_backward_{suffix}")
