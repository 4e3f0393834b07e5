"""`starcast triton-repo EXPORT_DIR REPO_DIR`: a Triton Inference Server model repository that serves the export.

    REPO_DIR/NAME/config.pbtxt    the Python backend, decoupled; inputs and outputs; instance groups
    REPO_DIR/NAME/1/model.py      starcast/triton/model.py, with where starcast is installed written in
    REPO_DIR/NAME/1/export/       the export, copied (checked against its manifest) or, with --link, linked

REPO_DIR/NAME is built in a hidden sibling of REPO_DIR (`.REPO.NAME.tmp-*`, which Triton never polls) and
renamed into place in one step; a new REPO_DIR is built whole and appears in one step. Other models in REPO_DIR
are left alone, and --overwrite replaces REPO_DIR/NAME only while it holds nothing but what starcast wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import sysconfig
from pathlib import Path

from starcast.contract.errors import UserError
from starcast.contract.manifest import read_manifest, verify_files
from starcast.contract.paths import read_text_prefix
from starcast.pipeline.folders import atomic_folder, check_output, recover
from starcast.runtime.text import Tokenizer

MODEL_SOURCE = Path(__file__).with_name("model.py")
EXPORT = "export"

INPUTS = [  # name, type, dims
    ("prompt", "TYPE_STRING", "[ 1 ]"),
    ("prompt_ids", "TYPE_INT64", "[ -1 ]"),
    ("suffix", "TYPE_STRING", "[ 1 ]"),
    ("max_tokens", "TYPE_INT32", "[ 1 ]"),
    ("temperature", "TYPE_FP32", "[ 1 ]"),
    ("top_p", "TYPE_FP32", "[ 1 ]"),
    ("top_k", "TYPE_INT32", "[ 1 ]"),
    ("repetition_penalty", "TYPE_FP32", "[ 1 ]"),
    ("seed", "TYPE_INT64", "[ 1 ]"),
    ("stop", "TYPE_STRING", "[ -1 ]"),
]
OUTPUTS = [("text", "TYPE_STRING", "[ 1 ]"), ("token_ids", "TYPE_INT64", "[ -1 ]"), ("finished", "TYPE_BOOL", "[ 1 ]"),
           ("finish_reason", "TYPE_STRING", "[ 1 ]")]  # fmt: skip


def config_text(name: str, instances: int, max_batch: int, max_queue: int, provider: str) -> str:
    def tensors(items, optional: bool) -> str:
        flag = " optional: true" if optional else ""
        return ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d}{flag} }}' for n, t, d in items)

    kind = "KIND_GPU" if provider == "cuda" else "KIND_CPU"
    parameters = {"export": EXPORT, "max_batch": max_batch, "max_queue": max_queue}
    return "\n".join([
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 0  # the model batches concurrent requests itself: a starcast engine per instance",
        "model_transaction_policy { decoupled: true }  # tokens stream back as they are generated",
        f"input [\n{tensors(INPUTS, True)}\n]",
        f"output [\n{tensors(OUTPUTS, False)}\n]",
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]  # KIND_GPU: {instances} per visible GPU",
        *(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items()),
        "",
    ])  # fmt: skip


def is_model_folder(folder: Path) -> bool:
    """A model folder `starcast triton-repo` wrote (which --overwrite may replace)."""
    model = folder / "1" / "model.py"
    return model.is_file() and "starcast triton-repo" in read_text_prefix(model, 2000)


def replaceable_model_folder(folder: Path) -> bool:
    """Whether --overwrite may replace `folder`: ours, holding nothing but what starcast wrote (and the Python
    backend's __pycache__); refuses with one line naming what the user added."""
    if not is_model_folder(folder):
        return False
    written = {".": {"config.pbtxt", "1"}, "1": {"model.py", EXPORT, "__pycache__"}}
    for inside, names in written.items():
        for entry in sorted((folder / inside).iterdir()):
            if entry.name not in names:
                raise UserError(
                    f"{entry}: starcast did not write this; --overwrite replaces only what starcast wrote in "
                    f"{folder} (move it elsewhere first)"
                )
    export = folder / "1" / EXPORT
    if export.is_dir() and not export.is_symlink():
        listed = {"starcast.json", *read_manifest(export).files}
        for entry in sorted(export.rglob("*")):
            name = entry.relative_to(export).as_posix()
            if entry.is_file() and name not in listed:
                raise UserError(
                    f"{entry}: starcast did not write this; --overwrite replaces only what starcast wrote in "
                    f"{folder} (move it elsewhere first)"
                )
    return True


def staging_for(repo_dir: Path) -> Path | None:
    """Where to build: beside REPO_DIR (a hidden sibling Triton never polls) when that is on the same file
    system and writable, else inside REPO_DIR (a mount point of its own)."""
    try:
        same = repo_dir.parent.stat().st_dev == repo_dir.stat().st_dev
    except OSError:
        return None
    return repo_dir.parent if same and os.access(repo_dir.parent, os.W_OK) else None


def fill_model_folder(
    folder: Path, source: Path, manifest, name: str, instances: int, max_batch: int, max_queue: int, provider: str,
    link: bool,
) -> None:  # fmt: skip
    folder.mkdir(exist_ok=True)
    (folder / "config.pbtxt").write_text(config_text(name, instances, max_batch, max_queue, provider))
    version = folder / "1"
    version.mkdir()
    (version / "model.py").write_text(model_text())
    if link:
        os.symlink(source, version / EXPORT)
        return
    (version / EXPORT).mkdir()
    for file in manifest.files:
        destination = version / EXPORT / file
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.path(source, file), destination)
    shutil.copyfile(source / "starcast.json", version / EXPORT / "starcast.json")


def site_packages() -> list[str]:
    """Where this Python finds starcast and its dependencies, for a Triton stub that does not look there."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return list(dict.fromkeys(p for p in paths if Path(p).is_dir()))


def model_text() -> str:
    source = MODEL_SOURCE.read_text()
    return source.replace("SITE_PACKAGES: list = []", f"SITE_PACKAGES: list = {site_packages()!r}", 1)


def write_repository(
    export_dir: Path, repo_dir: Path, name: str = "starcoder", instances: int = 1, max_batch: int = 8,
    max_queue: int = 64, provider: str = "cpu", link: bool = False, overwrite: bool = False,
) -> Path:  # fmt: skip
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", name):
        raise UserError(f"{name!r} is not a usable model name (letters, digits, '_', '.', '-')")
    for what, value in (("instances", instances), ("max batch", max_batch)):
        if value < 1:
            raise UserError(f"{what} must be >= 1")
    source = export_dir.expanduser().absolute()
    manifest = read_manifest(source)
    verify_files(source, manifest)
    if Tokenizer.from_export(source) is None:  # the Triton model refuses to load without one: refuse it here
        raise UserError(f"{export_dir}: the export has no tokenizer.json, which the Triton model needs")
    repo_dir = repo_dir.expanduser().absolute()
    fill = lambda folder: fill_model_folder(  # noqa: E731
        folder, source, manifest, name, instances, max_batch, max_queue, provider, link
    )
    if not repo_dir.is_dir() and not repo_dir.is_symlink():
        # A new repository is built whole beside itself and appears in one rename: nothing half-made, ever.
        target = check_output(repo_dir, False, (source,), is_model_folder)
        with atomic_folder(target, False, lambda _: False) as tmp:
            fill(tmp / name)
        return repo_dir / name
    staging = staging_for(repo_dir)
    recover(repo_dir / name)  # what runs before 0.3 left inside the repository
    target = check_output(repo_dir / name, overwrite, (source,), replaceable_model_folder, staging)
    with atomic_folder(target, overwrite, replaceable_model_folder, staging) as tmp:
        fill(tmp)
    return target
