"""The hot path's kernels are compiled without reference counting (pipeline/serve/kernel.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numba import njit
from numba.core.errors import NumbaError

from pipeline.serve import decode, encode
from pipeline.serve.features import fold
from pipeline.serve.kernel import kernel
from pipeline.serve.state import byteform, layout, pseudonym, recency

# The kernels each batch runs, per stage: their time is what the reference counts cost.
HOT = [
    decode._decode_rows,
    fold._fresh,
    fold._fold,
    fold._update,
    fold._remember,
    pseudonym.pseudonym,
    recency.touch,
    layout.promote,
    byteform.encode_users,
    byteform.check_values,
    byteform.restore_users,
    encode._fraud_scores,
    encode._recommendations,
]


@pytest.mark.parametrize("dispatcher", HOT, ids=lambda d: d.py_func.__qualname__)
def test_hot_kernels_count_no_references(dispatcher: Any) -> None:
    assert dispatcher.targetoptions.get("_nrt") is False
    assert dispatcher.targetoptions.get("nogil") is True


def _allocates(n: int) -> float:
    return float(np.zeros(n).sum())


def test_a_kernel_cannot_allocate() -> None:
    # Without the runtime there is nothing to free an array with, and numba says so when
    # it compiles: a kernel that allocates fails at once, not in production. The same
    # function compiles with numba's defaults, so the refusal is the kernel's options.
    assert njit(_allocates)(3) == 0.0
    with pytest.raises(NumbaError, match="Only accept returning of array passed into"):
        kernel(_allocates)(3)


def _row_sum(matrix: np.ndarray, row: int) -> float:
    view = matrix[row]
    total = 0.0
    for k in range(len(view)):
        total += view[k]
    return total


def test_a_kernel_reads_views_of_its_callers_arrays() -> None:
    matrix = np.arange(12.0).reshape(3, 4)
    assert kernel(_row_sum)(matrix, 2) == 8.0 + 9.0 + 10.0 + 11.0
