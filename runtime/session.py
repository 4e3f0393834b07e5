"""ONNX Runtime sessions on the provider the user asked for, or a clear error: never a silent CPU fallback."""

from __future__ import annotations

import contextlib
from pathlib import Path

import onnxruntime as ort

from starcast.errors import UserError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def device_of(provider: str) -> str:
    return "cuda" if provider == "cuda" else "cpu"


def create_session(
    path: Path, provider: str = "cpu", threads: int = 0, cuda_graph: bool = False, profile: bool = False
) -> ort.InferenceSession:
    if provider not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r} (supported: {', '.join(PROVIDERS)})")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if profile:
        options.enable_profiling = True
    providers: list = [PROVIDERS[provider]]
    if provider == "cuda":
        preload_cuda_libraries()
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
        raise UserError(
            "provider 'cuda': ONNX Runtime could not load its CUDA provider (no GPU, or the CUDA 12/13 and cuDNN "
            "libraries are missing: install torch with CUDA or nvidia-cudnn/nvidia-cublas wheels) and fell back to CPU"
        )
    return session


def preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the pip packages (torch's nvidia-* wheels) where onnxruntime can find them."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.suppress(Exception):  # nothing to preload is fine; the provider check reports what is missing
        preload()
