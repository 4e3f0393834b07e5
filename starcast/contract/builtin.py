"""Built-in models shipped inside the package: `builtin:tiny-python`, and the held-out code it is measured on."""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

from starcast.contract.errors import UserError
from starcast.contract.paths import confine

MODELS = Path(__file__).resolve().parent.parent / "models"
PREFIX = "builtin:"
SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "turtledemo", "__pycache__"}


def builtin_model_path(name: str) -> Path:
    folder = confine(MODELS, name, PREFIX + name) if name else MODELS
    if not (folder / "config.json").is_file():
        known = sorted(p.name for p in MODELS.iterdir() if (p / "config.json").is_file()) if MODELS.is_dir() else []
        raise UserError(f"builtin:{name}: no such built-in model (built in: {', '.join(known) or 'none'})")
    return folder


def is_held_out(relative: str) -> bool:
    """About 5% of the standard library's modules, chosen by a stable hash of their path, never trained on."""
    return zlib.crc32(relative.encode()) % 20 == 0


def split_stdlib() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of the standard library: the demo model's one data split."""
    train, held_out = [], []
    for relative, path in stdlib_modules():
        text = path.read_text(encoding="utf-8", errors="replace")
        (held_out if is_held_out(relative) else train).append(text)
    return train, held_out


def stdlib_modules() -> list[tuple[str, Path]]:
    """(path relative to the stdlib, file) for the standard library's own Python sources, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if SKIP_PARTS & set(relative.split("/")) or relative.startswith("test"):
            continue
        modules.append((relative, path))
    return modules


def held_out_text(limit_chars: int = 200_000) -> str:
    """Held-out standard-library code (the demo model's validation modules), concatenated."""
    parts, size = [], 0
    for relative, path in stdlib_modules():
        if is_held_out(relative):
            text = path.read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            size += len(text)
            if size >= limit_chars:
                break
    return "".join(parts)[:limit_chars]


def held_out_text_for(source: str) -> str | None:
    """The held-out code, when an export's source (as its manifest records it) is a built-in model; else None."""
    return held_out_text() if source.startswith(PREFIX) else None
