"""The `starcast` command line. This module imports nothing heavy, so that an interrupt during start-up is
handled like any other: `main` installs the handlers first, then loads the commands."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that temporary folders are removed as on Ctrl-C."""


class ReaderGone(BaseException):
    """stdout's reader closed the pipe (`starcast generate ... | head -1`): stop quietly (click would exit 1)."""


def stop_listening() -> None:
    """After the first SIGTERM or SIGINT: ignore both while the cleanup runs (a second one, milliseconds later,
    would otherwise interrupt it, or raise inside an atexit callback and print a traceback)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError):  # not the main thread: nothing to change
            signal.signal(signum, signal.SIG_IGN)


def on_sigterm(signum, frame) -> None:
    stop_listening()
    raise Terminated()


def on_sigint(signum, frame) -> None:
    stop_listening()
    raise KeyboardInterrupt()


def say(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


def silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that Python's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit code 2, a failed proof exit code 1, never a
    traceback."""
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)
    try:
        run(argv)
    except KeyboardInterrupt:
        say("starcast: interrupted")
        sys.exit(130)
    except Terminated:
        say("starcast: terminated")
        sys.exit(143)
    except (BrokenPipeError, ReaderGone):  # `starcast generate ... | head -1`: the reader left; nothing to report
        silence_stdout()
        sys.exit(141)


def run(argv: list[str] | None) -> None:
    import click

    from starcast.cli.app import cli
    from starcast.contract.errors import ParityError, UserError

    try:
        cli.main(args=argv, prog_name="starcast", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
    except click.exceptions.Abort:
        say("starcast: aborted")
        sys.exit(130)
    except click.ClickException as exc:
        say(f"starcast: error: {exc.format_message()}")
        sys.exit(2)
    except UserError as exc:
        say(f"starcast: error: {' '.join(str(exc).split())}")
        sys.exit(2)
    except ParityError as exc:
        say(f"starcast: proof failed: {' '.join(str(exc).split())}")
        sys.exit(1)
    except MemoryError:
        say("starcast: error: out of memory (try a smaller batch or maximum length)")
        sys.exit(2)
    except BrokenPipeError:
        raise
    except OSError as exc:  # a file-system error no stage turned into a message of its own: name file and cause
        where = f"{exc.filename}: " if exc.filename else ""
        say(f"starcast: error: {where}{(exc.strerror or str(exc)).lower()}")
        sys.exit(2)
    except Exception as exc:  # a defect of starcast's: one line that says so, never a traceback
        from starcast.runtime.limits import ort_failure

        failure = ort_failure(exc)  # ONNX Runtime's own errors with a cause the user can act on (memory)
        if failure is not None:
            say(f"starcast: error: {' '.join(str(failure).split())}")
            sys.exit(2)
        first = (str(exc).splitlines() or [""])[0][:300]
        say(f"starcast: internal error ({type(exc).__name__}: {first}); please report it")
        sys.exit(1)
