"""The fused CPU kernel (`csrc/fused_softadam_cpu.cpp`): built on first use, cached on disk.

The kernel is compiled with the system C++ compiler by `torch.utils.cpp_extension.load`
the first time a fused step runs (25 s on the 2-core build machine, docs/RESULTS.md),
into torch's extension cache (`$TORCH_EXTENSIONS_DIR`, default
`~/.cache/torch_extensions`); later processes load the cached library in about a
second. `make setup` builds it ahead of time. Building on first use rather than at
`pip install` keeps installation free of a build-time torch (pip's build isolation
would fetch one).

The build is keyed by what goes into it: the source's content, the compiler flags, the
torch and Python versions (`kernel_build_name`). The source is built from a copy
kept in the build's own folder, so every copy of the package on a machine (two
checkouts, an installed copy beside an editable one) shares one build, while a changed
kernel gets a build of its own and never loads a stale library.

Where no compiler is available the build fails once, `fused_cpu_kernel` warns and
returns None, and SoftAdam keeps to its per-tensor and foreach executions.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("csrc") / "fused_softadam_cpu.cpp"

_kernel: Optional[ModuleType] = None
_failure: Optional[str] = None


def _compiler_flags() -> list[str]:
    # -ffp-contract=off: every operation rounds as written, the same on every build
    # (whether the compiler may fuse multiply-adds depends on the target). -fno-math-errno lets
    # the compiler vectorise sqrt. The vector width follows what torch detected on this
    # CPU; the cache is keyed by these flags, so machines sharing a cache do not mix builds.
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mf16c"]
    elif capability == "AVX2":
        flags += ["-mavx2", "-mf16c"]
    return flags


def kernel_build_name() -> str:
    """The extension's name in torch's cache: the CPU's vector width and a digest of the
    source, the flags, and the torch and Python versions the library is built for."""
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(repr((_compiler_flags(), torch.__version__, sys.version_info[:2], sys.abiflags)).encode())
    return f"softadam_fused_cpu_{torch.backends.cpu.get_cpu_capability().lower()}_{key.hexdigest()[:16]}"


def _build_directory(name: str) -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name


def _source_in(directory: Path) -> Path:
    """The source, copied into the build's folder: the build then names the same file
    whichever copy of the package asks for it (a build records its sources' paths, and a
    new path would make ninja rebuild)."""
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / SOURCE.name
    text = SOURCE.read_bytes()
    if not copy.exists() or copy.read_bytes() != text:
        partial = directory / f".{SOURCE.name}.{os.getpid()}"
        partial.write_bytes(text)
        os.replace(partial, copy)  # atomic: a concurrent build never reads half a file
    return copy


def fused_cpu_kernel(verbose: bool = False) -> Optional[ModuleType]:
    """The compiled kernel module, building it on first use; None (with one warning)
    where it cannot be built. Set SOFTADAM_NO_FUSED=1 to never build or use it."""
    global _kernel, _failure
    if _kernel is not None or _failure is not None:
        return _kernel
    if os.environ.get("SOFTADAM_NO_FUSED"):
        _failure = "is disabled (SOFTADAM_NO_FUSED is set)"
        return None
    try:
        from torch.utils.cpp_extension import load

        name = kernel_build_name()
        directory = _build_directory(name)
        _kernel = load(
            name=name,
            sources=[str(_source_in(directory))],
            extra_cflags=_compiler_flags(),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=verbose,
        )
    except Exception as error:  # no compiler, no headers, a failed build: keep training on the reference paths
        _failure = "could not be built ({})".format(f"{type(error).__name__}: {error}".splitlines()[0])
        warnings.warn(
            f"SoftAdam's fused CPU kernel {_failure}; using the per-tensor execution",
            RuntimeWarning,
            stacklevel=2,
        )
    return _kernel


def fused_cpu_unavailable_reason() -> Optional[str]:
    """Why the kernel is unavailable ("could not be built (...)", "is disabled (...)")
    after `fused_cpu_kernel` returned None; None otherwise."""
    return _failure
