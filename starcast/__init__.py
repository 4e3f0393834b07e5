"""starcast: fast GPTBigCode (SantaCoder, StarCoder, tiny_starcoder, ...) inference outside PyTorch.

The layers, bottom to top; each may import only those below it (tests/test_architecture.py holds this):
  starcast.contract   config, graph interfaces, the typed manifest, dtypes, errors, path confinement
  starcast.exporter   checkpoint -> plain ONNX graph (PyTorch)           } three independent stages:
  starcast.graphs     graph -> graph: fusion, quantization (onnxscript)   } none imports another
  starcast.runtime    graph -> tokens: sessions, cache, generation, TensorRT (ONNX Runtime, no PyTorch)
  starcast.pipeline   export / optimize / quantize / check orchestration, atomic folders, the proof harness
  faces               starcast.cli, starcast.serve, starcast.triton, starcast.demo, benchmarks/
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"
__all__ = ["Generator", "export", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import starcast` must not import torch or onnxruntime
    if name == "Generator":
        from starcast.runtime.generator import Generator

        return Generator
    if name == "export":
        from starcast.pipeline.export import export

        return export
    raise AttributeError(name)
