"""ONNX Runtime sessions on the provider the user asked for, or a clear error: never a silent CPU fallback."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import onnxruntime as ort

from starcast.errors import UserError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def device_of(provider: str) -> str:
    return "cuda" if provider in ("cuda", "tensorrt") else "cpu"


def create_session(
    path: Path, provider: str = "cpu", threads: int = 0, cuda_graph: bool = False, spinning: bool = True
) -> ort.InferenceSession:
    """`spinning=False` stops idle intra-op threads from spinning: needed when several sessions take turns in one
    process (a benchmark), where one session's spinning threads would steal the cores from the next."""
    if provider not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r} (supported: {', '.join(PROVIDERS)})")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = [PROVIDERS[provider]]
    missing: list[str] = []
    if provider == "cuda":
        missing = preload_cuda_libraries()
        ort.set_default_logger_severity(4)  # the fallback below is reported as one line, not ORT's log
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(
                "provider 'cuda': this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
            )
        providers = [
            ("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"}),
            "CPUExecutionProvider",
        ]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...)
        raise UserError(f"{path}: ONNX Runtime cannot load the model ({str(exc).splitlines()[0][:300]})") from None
    if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime-gpu falls back to CPU silently when libcudart/libcublas/libcudnn cannot be loaded.
        what = f"missing {', '.join(missing)}" if missing else "no usable GPU or CUDA/cuDNN libraries"
        raise UserError(
            f"provider 'cuda': ONNX Runtime could not load its CUDA provider ({what}; onnxruntime-gpu "
            f"{ort.__version__} needs CUDA and cuDNN 9, e.g. from torch's CUDA build) and would fall back to CPU"
        )
    return session


def preload_cuda_libraries() -> list[str]:
    """Load CUDA/cuDNN from pip packages (torch's nvidia-* wheels) where onnxruntime finds them; returns what
    could not be loaded."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return []
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), contextlib.suppress(Exception):
        preload()
    return sorted(set(re.findall(r"Failed to load (\S+?):", log.getvalue())))
