"""The command group and the options several commands share."""

from __future__ import annotations

import sys

import click

from starcast.contract.dtypes import DTYPES
from starcast.contract.interfaces import TARGETS

PROVIDERS = ("cpu", "cuda")
GRAPHS = ("auto", "plain", "fused")
QUANTIZATIONS = ("int8", "int4", "int8-dynamic")
BLOCK_SIZES = ("32", "64", "128")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="starcast")
def cli() -> None:
    """Fast GPTBigCode (SantaCoder, StarCoder, tiny_starcoder) inference outside PyTorch."""


def options(*decorators):
    """Apply click options in the order they are listed."""

    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


dtype_option = click.option(
    "--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True, help="Weights and activations."
)
target_option = click.option(
    "--target", type=click.Choice(TARGETS), default="cpu", show_default=True, help="Fuse for this provider."
)
quantize_option = click.option(
    "--quantize",
    "quantization",
    type=click.Choice(QUANTIZATIONS),
    help="Weight-only quantization of the linear layers.",
)
block_size_option = click.option(
    "--block-size", type=click.Choice(BLOCK_SIZES), default="32", show_default=True, help="Quantization block size."
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUTPUT_DIR if it is a starcast export.")
engine_options = options(
    click.option("--max-batch", type=click.IntRange(1), default=1, show_default=True, help="TensorRT: largest batch."),
    click.option(
        "--max-prompt", type=click.IntRange(1), default=512, show_default=True, help="TensorRT: longest prompt."
    ),
    click.option(
        "--max-length", type=click.IntRange(2), default=1024, show_default=True, help="TensorRT: prompt + output."
    ),
)
session_options = options(
    click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True),
    click.option("--device", "device_id", type=click.IntRange(0, 63), default=0, show_default=True, help="GPU index."),
    click.option(
        "--graph",
        type=click.Choice(GRAPHS),
        default="auto",
        show_default=True,
        help="auto: the fused graph when it was made for the provider.",
    ),
    click.option("--threads", type=click.IntRange(0), default=0, help="CPU threads (0: all cores; capped at them)."),
    click.option("--tf32", is_flag=True, help="Allow TF32 matmuls on CUDA (faster fp32, not bit-exact)."),
    click.option("--verbose", is_flag=True, help="Show ONNX Runtime's warnings (CPU fallbacks, Memcpy nodes)."),
)


def stage_line(message: str) -> None:
    click.echo(message, err=True)


def emit(text: str, nl: bool = True) -> None:
    """Output on stdout; a closed pipe ends the command quietly with exit code 141."""
    from starcast.cli import ReaderGone

    try:
        click.echo(text, nl=nl)
    except BrokenPipeError:
        raise ReaderGone() from None


def bold(text: str, stream=None) -> str:
    """ANSI bold only when the text goes to a terminal."""
    stream = stream or sys.stdout
    return f"\033[1m{text}\033[0m" if stream.isatty() else text


def register() -> None:
    from starcast.cli import pipeline_commands, runtime_commands  # noqa: F401 - they add their commands to `cli`


register()
