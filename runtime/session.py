"""ONNX Runtime sessions on the provider the user asked for, or a clear error: never a silent CPU fallback.

The graph file is checked first (it is ONNX; its external data stays in its folder). CUDA sessions get the
options a generation loop wants: a device id, an arena that grows by what is asked (a KV cache allocated once
does not need power-of-two slack), SkipLayerNormalization with fp32 statistics (the README's promise for
fp16), TF32 off unless asked (fp32 parity), and CUDA graphs for the static-cache decode step.

Whether CUDA works is judged by what a real session reports (`session.get_providers()`), never by where the
libraries are guessed to be: onnxruntime-gpu falls back to the CPU silently. `prepare_cuda` first loads CUDA and
cuDNN from every `nvidia/` package directory on sys.path (torch's CUDA wheels put them there, which need not be
beside onnxruntime: onnxruntime installed with `--target` into a separate site dir), through
`onnxruntime.preload_dlls(directory=...)`. Importing torch before creating a CUDA session also works (it loads
its own CUDA libraries); the runtime does not import torch itself.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
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
    optimized_model: Path | None = None  # write the optimized graph (Memcpy nodes included) here, weights beside it
    # The graph as written, its weights read from the mapped weights file: no graph optimizations (on CPU they
    # make fp32 copies of fp16 weights), no prepacked copies, no arena keeping each run's temporaries. Anonymous
    # memory stays near the activations' size; runs are slower. The proofs of large models use it.
    low_memory: bool = False

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
    if options.optimized_model is not None:
        session_options.optimized_model_filepath = str(options.optimized_model)
        # a >2 GB model cannot be one protobuf: its weights go to a file beside it
        data = f"{Path(options.optimized_model).name}.data"
        prefix = "session.optimized_model_external_initializers_"
        session_options.add_session_config_entry(prefix + "file_name", data)
        session_options.add_session_config_entry(prefix + "min_size_in_bytes", "1024")
    providers: list = [PROVIDERS["cpu"]]
    missing: tuple[str, ...] = ()
    if options.provider == "cuda":
        missing = prepare_cuda()
        if not options.verbose:
            ort.set_default_logger_severity(4)  # the fallback below is reported as one line, not ORT's log
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(
                "provider 'cuda': this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
            )
        providers = [("CUDAExecutionProvider", cuda_provider_options(options)), PROVIDERS["cpu"]]
    try:
        if options.low_memory:
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session_options.add_session_config_entry("session.disable_prepacking", "1")
            session_options.enable_cpu_mem_arena = False
            session_options.enable_mem_pattern = False
            # Each weight's fp32 cast runs just before its reader: in plain topological order every cast runs
            # first, and all the copies are alive at once.
            session_options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
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


def cuda_library_dirs(cuda_major: str | None = None) -> list[tuple[str, bool]]:
    """(directory, holds CUDA (True) or cuDNN (False)) for every `nvidia/` package directory on sys.path that has
    the consolidated CUDA libraries (`nvidia/cu13/lib`) or cuDNN (`nvidia/cudnn/lib`)."""
    major = cuda_major or (getattr(ort, "cuda_version", "") or "13").split(".")[0]
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    found = []
    for root in roots:
        for sub, is_cuda in ((f"cu{major}", True), ("cudnn", False)):
            lib = os.path.join(root, sub, "lib")
            if os.path.isdir(lib):
                found.append((lib, is_cuda))
    return found


@functools.cache
def prepare_cuda() -> tuple[str, ...]:
    """Load CUDA/cuDNN where they are (see the module docstring), once per process; returns what failed to load.
    An empty result does not mean CUDA works: `cuda_problem` asks a real session."""
    return load_cuda_libraries(cuda_library_dirs())


def load_cuda_libraries(dirs: list[tuple[str, bool]]) -> tuple[str, ...]:
    """onnxruntime.preload_dlls for each directory of `cuda_library_dirs`; returns what failed to load."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return ()
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        for directory, is_cuda in dirs:
            with contextlib.suppress(Exception):
                preload(cuda=is_cuda, cudnn=not is_cuda, msvc=False, directory=directory)
        if not dirs:  # nothing under nvidia/ on sys.path: onnxruntime's own search, then the default paths
            with contextlib.suppress(Exception):
                preload()
    return tuple(sorted(set(re.findall(r"Failed to load (\S+?):", log.getvalue()))))


def probe_graph() -> bytes:
    """A one-node graph (Add), to ask ONNX Runtime whether a provider really runs."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def cuda_problem(device_id: int = 0) -> str | None:
    """None when a real session on CUDAExecutionProvider (GPU `device_id`) is created and runs; otherwise why not,
    in a few words."""
    missing = prepare_cuda()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
    ort.set_default_logger_severity(4)  # the answer below is the report, not ORT's log
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 4
    providers = [("CUDAExecutionProvider", {"device_id": str(device_id)}), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(probe_graph(), session_options, providers=providers)
    except Exception as exc:
        return f"ONNX Runtime cannot create a CUDA session ({(str(exc).splitlines() or ['?'])[0][:200]})"
    if "CUDAExecutionProvider" not in session.get_providers():
        return f"missing {', '.join(missing)}" if missing else f"no usable GPU {device_id} or CUDA/cuDNN libraries"
    return None


def device_id_of(session: ort.InferenceSession) -> int:
    """The GPU a session runs on (0 for a CPU session): what its buffers and bindings must name."""
    return device_id_from(session.get_provider_options())


def device_id_from(provider_options: dict[str, dict[str, str]]) -> int:
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if provider in provider_options:
            return int(provider_options[provider].get("device_id", 0))
    return 0
