"""Output folders: built beside the target, moved into place in one step, never over anything that is not ours.

- A run writes into `.OUT.tmp-PID-XXXX` (with a marker file) beside OUT, or in a `staging` folder on the same
  file system, and holds an flock on it while it lives; a failed or interrupted run removes it, and the next run
  removes those whose lock is free (a killed run's), recognised by their name and marker. A pid proves nothing
  across PID namespaces (two containers sharing a volume); a lock does.
- Without --overwrite the folder is renamed into place only if OUT still does not exist (renameat2's
  RENAME_NOREPLACE): of two runs racing for one OUT, the loser fails with one line and deletes nothing.
- With --overwrite the new folder and OUT are exchanged in one step (RENAME_EXCHANGE) under a lock on the
  parent folder, so OUT always holds a whole export. Where the kernel or file system lacks renameat2, OUT is
  moved to `.OUT.old-PID` first; a run killed between the two renames is repaired by the next one.
- OUT may not be an input, contain one or lie inside one; an existing OUT is only replaced if it is a starcast
  export or empty.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from starcast.contract.errors import UserError
from starcast.contract.manifest import MANIFEST
from starcast.contract.paths import os_reason

MARKER = ".starcast-partial"
AT_FDCWD, RENAME_NOREPLACE, RENAME_EXCHANGE = -100, 1, 2


def temporary_name(output: Path, kind: str) -> str:
    return f".{output.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def staging_name(output: Path, staging: Path | None) -> Path:
    """Where the temporary folders of `output` go: beside it, or `staging/.PARENT.NAME.*` (same file system)."""
    if staging is None:
        return output
    return staging / f"{output.parent.name}.{output.name}"


def hold(folder: Path) -> int | None:
    """An fd holding an exclusive flock on `folder` (what tells later runs that its run is alive), or None where
    another process holds it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def leftovers(stem: Path) -> Iterator[tuple[str, Path]]:
    """(kind, path) of the temporary folders earlier runs left as `stem.parent/.STEM.(tmp|old)-PID-HEX`."""
    pattern = re.compile(rf"\.{re.escape(stem.name)}\.(tmp|old)-(\d+)-[0-9a-f]+")
    try:
        entries = list(stem.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            yield match.group(1), entry


def recover(output: Path, staging: Path | None = None) -> None:
    """Finish what dead runs left: put back an export moved aside by an interrupted --overwrite (under the parent
    lock that every swap holds), and remove temporary folders whose run's lock is free."""
    with locked(output.parent):
        for kind, path in leftovers(staging_name(output, staging)):
            try:
                fd = hold(path)
            except OSError:
                continue
            if fd is None:
                continue  # a live run's, whatever its pid looks like from here
            try:
                ours = (path / MARKER).is_file() or is_export(path)
                if kind == "old" and not output.exists():
                    os.rename(path, output)  # the swap was interrupted after moving the old export aside
                elif ours:
                    shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` among starcast processes (flock on the folder itself: no lock file)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield  # an unreadable parent fails later, with its own message
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def same_or_nested(a: Path, b: Path) -> bool:
    a, b = real_path(a), real_path(b)
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def real_path(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # a loop of symbolic links (RuntimeError before Python 3.13)
        raise UserError(f"{path}: a loop of symbolic links, which leads to no folder") from None


def is_export(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def check_output(
    output: Path, overwrite: bool, inputs: tuple[Path, ...] = (), is_ours: Callable[[Path], bool] = is_export,
    staging: Path | None = None,
) -> Path:
    """The absolute output path, once it is safe to write there; refuses with one line otherwise."""
    output = output.expanduser().absolute()
    if not output.name or output.name in (".", ".."):
        raise UserError(f"{output}: not a usable output folder name")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such folder")
    for source in inputs:
        if same_or_nested(output, source):
            raise UserError(
                f"{output}: the output would replace or contain the input {source}; choose another output folder"
            )
    recover(output, staging)
    if output.is_symlink() or output.exists():
        if not overwrite:
            raise UserError(f"{output}: already exists (pass --overwrite to replace it)")
        check_replaceable(output, is_ours)
    return output


def check_replaceable(output: Path, is_ours: Callable[[Path], bool] = is_export) -> None:
    if output.is_symlink() or not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; starcast does not replace it")
    try:
        empty = not any(output.iterdir())
    except OSError as exc:
        raise UserError(f"{output}: cannot read ({os_reason(exc)})") from None
    if not empty and not is_ours(output):
        raise UserError(f"{output}: exists and starcast did not make it; starcast replaces only its own folders")


# Tests set this to "two-renames" to take the path of systems without renameat2, or to "kill-between" to be
# killed between its two renames.
TEST_SWAP = "STARCAST_TEST_SWAP"


def rename2(source: Path, target: Path, flags: int) -> bool:
    """renameat2(2); False where the kernel, libc or file system does not offer it."""
    if os.environ.get(TEST_SWAP):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def place(
    tmp: Path, output: Path, overwrite: bool, is_ours: Callable[[Path], bool] = is_export, staging: Path | None = None
) -> None:
    """Move the finished folder to `output` in one step (see the module docstring)."""
    with locked(output.parent):
        exists = output.is_symlink() or output.exists()
        if exists and not overwrite:
            raise UserError(f"{output}: was created by something else while starcast ran; it was left as it is")
        if not exists:
            try:
                if not rename2(tmp, output, RENAME_NOREPLACE):
                    os.mkdir(output)  # exclusive; the rename below then replaces our own empty folder
                    os.rename(tmp, output)
            except FileExistsError:
                raise UserError(
                    f"{output}: was created by something else while starcast ran; it was left as it is"
                ) from None
            return
        check_replaceable(output, is_ours)
        if rename2(tmp, output, RENAME_EXCHANGE):
            (tmp / MARKER).touch()  # tmp now holds the old export: removed by the caller, or by the next run
            return
        stem = staging_name(output, staging)
        old = stem.with_name(temporary_name(stem, "old"))
        os.rename(output, old)
        if os.environ.get(TEST_SWAP) == "kill-between":
            os.kill(os.getpid(), 9)
        try:
            os.rename(tmp, output)
        except OSError:
            os.rename(old, output)  # put the previous export back before reporting the failure
            raise
        shutil.rmtree(old, ignore_errors=True)


def normalize_modes(folder: Path) -> None:
    """Files 0644 and folders 0755 (less the umask): tools write some files 0600, and other users must be able
    to load the export."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def new_temporary(stem: Path) -> tuple[Path, int]:
    """A new temporary folder `.STEM.tmp-PID-HEX` with its marker, and the fd of the lock this run holds on it."""
    tmp = stem.with_name(temporary_name(stem, "tmp"))
    tmp.mkdir(mode=0o700)
    fd = hold(tmp)
    assert fd is not None  # nobody else knows the folder yet
    (tmp / MARKER).touch()
    return tmp, fd


@contextmanager
def atomic_folder(
    output: Path, overwrite: bool = False, is_ours: Callable[[Path], bool] = is_export, staging: Path | None = None
) -> Iterator[Path]:
    """Yield a new temporary folder beside `output` (or in `staging`); on success it becomes `output`, on failure
    it vanishes. File-system errors become one line naming the user's file (never the temporary one) and the
    cause."""
    tmp, fd = staging_name(output, staging), None
    try:
        try:
            tmp, fd = new_temporary(tmp)
            yield tmp
            (tmp / MARKER).unlink()
            normalize_modes(tmp)
            place(tmp, output, overwrite, is_ours, staging)
        except OSError as exc:
            where = str(exc.filename or output).replace(str(tmp), str(output))
            raise UserError(f"{where}: {os_reason(exc)}") from None
        except UserError as exc:
            exc.args = (str(exc).replace(str(tmp), str(output)),)
            raise
    finally:
        if fd is not None:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            os.close(fd)


@contextmanager
def scratch_folder(beside: Path) -> Iterator[Path]:
    """A temporary folder of starcast's own beside `beside` (same file system), removed at the end."""
    tmp, fd = new_temporary(beside)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)
