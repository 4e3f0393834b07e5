"""starcast: fast GPTBigCode (SantaCoder, StarCoder, tiny_starcoder, ...) inference outside PyTorch."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Generator", "export", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import starcast` must not import torch or onnxruntime
    if name == "Generator":
        from starcast.runtime.generator import Generator

        return Generator
    if name == "export":
        from starcast.exporter.export import export

        return export
    raise AttributeError(name)
