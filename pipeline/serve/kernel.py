"""How the hot path's kernels are compiled: by numba, cached, without the GIL, and without
reference counting.

numba counts the references to every array a compiled function binds: each array argument
on entry and at its last use, each row view, each field taken from a NamedTuple of arrays.
Each count is a call into its runtime (`NRT_incref`, `NRT_decref`, an atomic add), and its
pruning pass removes only the pairs that straight-line code makes obvious. In the features
kernel they took more of the time than the kernel's own work: `perf` gave NRT_incref and
NRT_decref 18% of the samples against 16% in the kernel, and compiling without them took
`Featurizer.process` from about 4.8 to 3.0 µs an event.

A `kernel` counts no references. That is safe because every array it touches belongs to
its caller, which holds it for the whole call, and a kernel never returns an array. It
cannot allocate either: numba refuses that at compile time ("NRT required but not
enabled"), so such a kernel takes its scratch arrays as arguments. `_nrt` is numba's own
option (`numba.core.options.TargetOptions`), the one its test suite compiles with; it is
named here only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
from numba import njit

F = TypeVar("F", bound=Callable[..., Any])

# The arrays kernels take, by dtype: a signature says what each argument holds, and mypy
# checks it where the arrays are made. Their shapes go in the field's comment.
Bools = npt.NDArray[np.bool_]
Bytes = npt.NDArray[np.uint8]
Int8s = npt.NDArray[np.int8]
Int32s = npt.NDArray[np.int32]
Int64s = npt.NDArray[np.int64]
UInt32s = npt.NDArray[np.uint32]
UInt64s = npt.NDArray[np.uint64]
Float32s = npt.NDArray[np.float32]
Float64s = npt.NDArray[np.float64]
# numba's type stubs do not list `_nrt`, so the options go as a mapping.
_OPTIONS: dict[str, Any] = {"cache": True, "nogil": True, "_nrt": False}


def kernel(function: F) -> F:
    """Compile `function` as a hot-path kernel (cached, nogil, no reference counting)."""
    return cast(F, njit(**_OPTIONS)(function))


def inline_kernel(function: F) -> F:
    """`kernel`, inlined into its callers by numba (small helpers called per event)."""
    return cast(F, njit(inline="always", **_OPTIONS)(function))
