"""The `starcast` command line: export, check, demo (and the later stages as they land)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from starcast.errors import UserError
from starcast.progress import Progress


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="starcast")
def cli() -> None:
    """Fast GPTBigCode (SantaCoder, StarCoder, tiny_starcoder) inference outside PyTorch."""


@cli.command("export")
@click.argument("model")
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--dtype", default="fp32", show_default=True, help="Weights and activations: fp32 or fp16.")
@click.option("--target", default="cpu", show_default=True, help="Fuse for this provider: cpu or cuda.")
@click.option("--no-fuse", is_flag=True, help="Write only the plain graph.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No stage lines on stderr.")
def export_command(
    model: str, output_dir: Path, dtype: str, target: str, no_fuse: bool, overwrite: bool, quiet: bool
) -> None:
    """Export MODEL (a checkpoint folder or Hub id) to OUTPUT_DIR as ONNX, verified against PyTorch."""
    from starcast.exporter.export import export

    fuse_target = None if no_fuse else target
    manifest = export(model, output_dir, dtype, overwrite, fuse_target, progress=Progress(not quiet))
    fused = f" + fused graph for {target}" if fuse_target else ""
    click.echo(f"exported {manifest['parameters'] / 1e6:.1f}M parameters ({dtype}){fused} to {output_dir}")


@cli.command("optimize")
@click.argument("plain_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--target", default="cpu", show_default=True, help="Fuse for this provider: cpu or cuda.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
def optimize_command(plain_dir: Path, output_dir: Path, target: str, overwrite: bool) -> None:
    """Fuse an existing plain export into OUTPUT_DIR (PLAIN_DIR is left untouched)."""
    from starcast.graphs.optimize import optimize_export

    manifest = optimize_export(plain_dir, output_dir, target, overwrite, progress=Progress())
    fused = manifest["fused"]
    click.echo(
        f"fused for {target}: {fused['nodes']['before']} -> {fused['nodes']['after']} nodes "
        f"({fused['nodes_per_layer']['before']} -> {fused['nodes_per_layer']['after']} per layer), "
        f"fused ops {fused['fused_ops']}, written to {output_dir}"
    )


@cli.command("check")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--source", help="The checkpoint to compare against (default: the one recorded in starcast.json).")
def check_command(export_dir: Path, source: str | None) -> None:
    """Re-verify EXPORT_DIR: file hashes, then ONNX Runtime logits against the PyTorch reference."""
    from starcast.exporter.export import ParityError, recheck

    report = recheck(export_dir, source, progress=Progress())
    if not report.passed:
        raise ParityError(report.summary())
    click.echo(f"{export_dir}: {report.summary()}")


@cli.command("demo")
@click.option("--output", type=click.Path(path_type=Path), help="Keep the export here (default: a temporary folder).")
def demo_command(output: Path | None) -> None:
    """Make a small random-weight checkpoint, export it, verify it and print a summary."""
    from starcast.demo import run_demo

    with tempfile.TemporaryDirectory(prefix="starcast-demo-") as scratch:
        summary = run_demo(Path(scratch), output)
    click.echo(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    from starcast.exporter.export import ParityError

    try:
        cli.main(args=argv, prog_name="starcast", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
    except click.exceptions.Abort:
        click.echo("starcast: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"starcast: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except UserError as exc:
        click.echo(f"starcast: error: {exc}", err=True)
        sys.exit(2)
    except ParityError as exc:
        click.echo(f"starcast: parity check failed: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("starcast: interrupted", err=True)
        sys.exit(130)
