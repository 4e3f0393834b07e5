"""The model dtypes starcast exports, by the names the command line and the manifest use."""

from __future__ import annotations

import numpy as np

from starcast.contract.errors import UserError

DTYPES = ("fp32", "fp16")
NUMPY = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}
ONNX_ELEMENT_TYPES = {"fp32": 1, "fp16": 10}  # onnx.TensorProto.FLOAT, FLOAT16


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise UserError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})")
    return name


def numpy_dtype(name: str) -> np.dtype:
    return NUMPY[check_dtype(name)]


def dtype_of_element_type(element_type: int) -> str | None:
    """The dtype name of an ONNX element type, or None when starcast does not export that type."""
    return next((name for name, code in ONNX_ELEMENT_TYPES.items() if code == element_type), None)
