"""Names read from a folder resolve inside that folder, or nowhere.

Everything in an export or checkpoint folder is untrusted: a manifest's file list, a shard index, an ONNX
graph's external-data locations, even a fixed name like `config.json` (it may be a symbolic link). Every such
name goes through `confine`, which refuses absolute paths, `..` and links that lead out of the folder, so the
folder's contents can never make starcast read, write, move or delete anything outside it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from starcast.contract.errors import UserError

JSON_LIMIT = 64 << 20  # tokenizer.json of the largest code models is a few MiB


def confine(root: Path, name: Any, what: str) -> Path:
    """The real path of `name`, a relative name read from a file in `root`; refused unless it stays in `root`."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UserError(f"{what}: {name!r} is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or PureWindowsPath(name).is_absolute() or "\\" in name:
        raise UserError(f"{what}: {name!r} is an absolute path; names read from {root} must stay inside it")
    if ".." in pure.parts:
        raise UserError(f"{what}: {name!r} contains '..'; names read from {root} must stay inside it")
    try:
        real_root = root.resolve()
        target = (real_root / pure).resolve()  # symbolic links followed, to wherever they lead
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a loop, 3.13 OSError(ELOOP)
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise UserError(f"{what}: {name!r} cannot be followed ({os_reason(exc)})") from None
        raise UserError(f"{root / pure}: a loop of symbolic links, which leads to no file") from None
    if target != real_root and not target.is_relative_to(real_root):
        raise UserError(f"{what}: {name!r} leads outside {root} through a symbolic link")
    return target


def os_reason(exc: OSError) -> str:
    """What went wrong, in words: 'permission denied', 'no such file or directory', 'no space left on device'."""
    return (exc.strerror or type(exc).__name__).lower()


def read_bytes(path: Path, limit: int, what: str | None = None) -> bytes:
    """At most `limit` bytes of a regular file; a larger file is an error, never a large allocation, and a FIFO
    or device is refused rather than waited on."""
    what = what or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except IsADirectoryError:
        raise UserError(f"{what}: is a folder, not a file") from None
    except OSError as exc:
        raise UserError(f"{what}: cannot read ({os_reason(exc)})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{what}: is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise UserError(f"{what}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UserError(f"{what}: cannot read ({os_reason(exc)})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UserError(f"{what}: larger than {limit >> 20} MiB, which no valid file of this kind is")
    return data


def read_json(path: Path, limit: int = JSON_LIMIT) -> Any:
    """A JSON file (its path already confined by the caller); every failure is one line naming the file and the
    cause."""
    data = read_bytes(path, limit)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise UserError(f"{path}: not valid JSON ({str(exc)[:120]})") from None


def no_constants(name: str):
    raise UserError(f"JSON holds {name}, which is no number")


def read_text_prefix(path: Path, limit: int) -> str:
    """The first `limit` bytes of a text file (or device) as text: bounded, whatever the file is."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit)
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({os_reason(exc)})") from None
    return data.decode("utf-8", errors="replace")
