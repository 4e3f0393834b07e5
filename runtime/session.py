"""ONNX Runtime sessions on the provider the user asked for, or a clear error: never a silent CPU fallback.

The graph file is checked first (it is ONNX; its external data stays in its folder). CUDA sessions get the
options a generation loop wants: a device id, an arena that grows by what is asked (a KV cache allocated once
does not need power-of-two slack), SkipLayerNormalization with fp32 statistics (the README's promise for
fp16), TF32 off unless asked (fp32 parity), and CUDA graphs for the static-cache decode step.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from starcast.contract.errors import UserError
from starcast.contract.graph_files import check_graph_file

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class SessionOptions:
    provider: str = "cpu"
    threads: int = 0  # 0: every core this process may run on
    device_id: int = 0
    cuda_graph: bool = False
    tf32: bool = False
    spinning: bool = True  # False when several sessions take turns in one process (a benchmark)
    verbose: bool = False  # show ONNX Runtime's warnings (CPU fallbacks, Memcpy nodes)
    record_placement: bool = False  # keep which provider runs each node (session.get_provider_graph_assignment_info)

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise UserError(f"unknown provider {self.provider!r} (supported: {', '.join(PROVIDERS)})")
        if type(self.threads) is not int or self.threads < 0:
            raise UserError(f"threads must be a whole number >= 0, got {self.threads!r}")
        if type(self.device_id) is not int or not 0 <= self.device_id < 64:
            raise UserError(f"device must be a GPU index in 0..63, got {self.device_id!r}")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_of(provider: str) -> str:
    return "cuda" if provider in ("cuda", "tensorrt") else "cpu"


def cuda_provider_options(options: SessionOptions) -> dict[str, str]:
    return {
        "device_id": str(options.device_id),
        "arena_extend_strategy": "kSameAsRequested",
        "enable_skip_layer_norm_strict_mode": "1",
        "use_tf32": "1" if options.tf32 else "0",
        "enable_cuda_graph": "1" if options.cuda_graph else "0",
    }


def create_session(path: Path, options: SessionOptions | None = None, **overrides) -> ort.InferenceSession:
    """A session for the graph at `path` (already confined to its export folder by the caller)."""
    options = options or SessionOptions(**overrides)
    check_graph_file(path)
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 2 if options.verbose else 3
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # More threads than cores only makes them fight (and a huge count exhausts memory creating them).
    session_options.intra_op_num_threads = min(options.threads or available_cores(), available_cores())
    if not options.spinning:
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if options.record_placement:
        session_options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    providers: list = [PROVIDERS["cpu"]]
    missing: list[str] = []
    if options.provider == "cuda":
        missing = preload_cuda_libraries()
        if not options.verbose:
            ort.set_default_logger_severity(4)  # the fallback below is reported as one line, not ORT's log
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(
                "provider 'cuda': this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
            )
        providers = [("CUDAExecutionProvider", cuda_provider_options(options)), PROVIDERS["cpu"]]
    try:
        session = ort.InferenceSession(str(path), session_options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: ONNX Runtime cannot load the model ({first[:300]})") from None
    if options.provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
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
