"""`starcast serve EXPORT_DIR|builtin:NAME`: the engine behind uvicorn, on one host and port.

The export is checked before the port opens (a bad folder is one line, exit 2); the model then loads while
/health answers 503, and SIGTERM (or Ctrl-C) stops admitting, lets running rows finish within the grace period,
cancels the rest and exits 0. `builtin:NAME` is exported once into a cache folder and reused.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from starcast import __version__
from starcast.contract.builtin import PREFIX
from starcast.contract.errors import MissingExtra, UserError
from starcast.contract.manifest import read_manifest
from starcast.runtime.export_folder import open_export
from starcast.runtime.generator import check_export_files
from starcast.runtime.text import Tokenizer


def cache_folder() -> Path:
    base = os.environ.get("STARCAST_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / ("" if os.environ.get("STARCAST_CACHE") else "starcast")


def builtin_export(source: str, progress=None) -> Path:
    """The cached export of a built-in model (made on first use, by this version of starcast)."""
    name = source.removeprefix(PREFIX)
    folder = cache_folder() / f"{name.replace('/', '_')}-{__version__}"
    if (folder / "starcast.json").is_file():
        try:
            if read_manifest(folder).source == source:
                return folder
        except UserError:
            pass  # a damaged cache entry: made again below
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise MissingExtra(f"serving {source} (exported once, on first use)", "export", "torch")
    from starcast.pipeline.export import export

    folder.parent.mkdir(parents=True, exist_ok=True)
    export(source, folder, overwrite=folder.exists(), fuse_target="cpu", progress=progress)
    return folder


def bind_port(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (port 0: the system picks one, which is reported)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise UserError(f"cannot listen on {host}:{port} ({(exc.strerror or str(exc)).lower()})") from None
    return listener


def serve(
    target: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
    provider: str = "cpu", device_id: int = 0, max_length: int | None = None, threads: int = 0, grace: float = 10.0,
    model_name: str | None = None, progress=None,
) -> None:  # fmt: skip
    import uvicorn

    from starcast.runtime.engine import Engine
    from starcast.serve.app import create_app

    folder = builtin_export(target, progress) if target.startswith(PREFIX) else Path(target).expanduser().absolute()
    manifest = open_export(folder)
    check_export_files(folder, manifest)
    if Tokenizer.from_export(folder) is None:
        raise UserError(f"{folder}: the export has no tokenizer.json, which the completions API needs")
    listener = bind_port(host, port)
    port = listener.getsockname()[1]
    name = model_name or (target.removeprefix(PREFIX) if target.startswith(PREFIX) else folder.name)
    server: uvicorn.Server | None = None

    def load() -> Engine:
        try:
            engine = Engine.from_export(folder, max_batch, max_queue, provider, max_length, "auto", threads, device_id)
        except Exception:
            if server is not None:
                server.should_exit = True
            raise
        print(f"starcast: serving {name} on http://{host}:{port} (max batch {max_batch})", file=sys.stderr, flush=True)
        return engine

    app = create_app(load, name, grace)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=int(grace) + 10
    )
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.starcast.begin_stop()  # the engine's grace starts now, not once uvicorn gave up waiting
            super().handle_exit(sig, frame)

    server = Server(config)
    # uvicorn handles SIGTERM (a graceful shutdown), then raises it again for the previous handler: a finished
    # shutdown is a normal exit, not the CLI's "terminated".
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    with listener:
        server.run(sockets=[listener])
    error = app.state.starcast.error
    if error:
        raise UserError(error)
