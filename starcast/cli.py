"""The `starcast` command line: export, check, demo (and the later stages as they land)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from starcast.errors import UserError
from starcast.progress import Progress


def engine_options(command):
    """The TensorRT engine's profile limits and precision, shared by `export --format trt` and `build-engine`."""
    for option in reversed(
        (
            click.option("--max-batch", default=1, show_default=True, help="TensorRT profiles: largest batch."),
            click.option("--max-prompt", default=512, show_default=True, help="TensorRT profiles: longest prompt."),
            click.option(
                "--max-length", default=1024, show_default=True, help="TensorRT profiles: longest prompt + output."
            ),
            click.option(
                "--precision", default="fp16", show_default=True, help="TensorRT builder precision: fp16, bf16, fp32."
            ),
        )
    ):
        command = option(command)
    return command


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
@click.option("--format", "fmt", default="onnx", show_default=True, help="onnx, or trt to add a TensorRT engine.")
@engine_options
@click.option("--quantize", help="Weight-only quantization of the linear layers: int8 or int4.")
@click.option("--block-size", default=32, show_default=True, help="Quantization block size: 32, 64 or 128.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No stage lines on stderr.")
def export_command(
    model: str,
    output_dir: Path,
    dtype: str,
    target: str,
    no_fuse: bool,
    fmt: str,
    max_batch: int,
    max_prompt: int,
    max_length: int,
    precision: str,
    quantize: str | None,
    block_size: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Export MODEL (a checkpoint folder or Hub id) to OUTPUT_DIR as ONNX, verified against PyTorch."""
    from starcast.exporter.export import export
    from starcast.exporter.tensorrt import Limits, require_tensorrt

    if fmt not in ("onnx", "trt"):
        raise UserError(f"unknown format {fmt!r} (supported: onnx, trt)")
    engine = None
    if fmt == "trt":
        require_tensorrt()  # before any export work
        engine = (Limits(max_batch, max_prompt, max_length), precision)
    fuse_target = None if no_fuse else target
    bits = None
    if quantize is not None:
        if quantize not in ("int8", "int4"):
            raise UserError(f"unsupported quantization {quantize!r} (supported: int8, int4)")
        bits = (int(quantize[3:]), block_size)
    manifest = export(
        model, output_dir, dtype, overwrite, fuse_target, engine=engine, quantize=bits, progress=Progress(not quiet)
    )
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


@cli.command("quantize")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--bits", default=4, show_default=True, help="4 or 8.")
@click.option("--block-size", default=32, show_default=True, help="32, 64 or 128.")
@click.option("--eval-text", type=click.Path(path_type=Path), help="Text to measure perplexity on.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
def quantize_command(
    export_dir: Path, output_dir: Path, bits: int, block_size: int, eval_text: Path | None, overwrite: bool
) -> None:
    """Weight-only int8/int4 quantization of EXPORT_DIR's graphs into OUTPUT_DIR, with measured accuracy."""
    from starcast.graphs.quantize import quantize_export

    manifest = quantize_export(export_dir, output_dir, bits, block_size, eval_text, overwrite, Progress())
    accuracy = manifest["quantization"]["accuracy"]
    click.echo(json.dumps(accuracy, indent=2))


@cli.command("build-engine")
@click.argument("export_dir", type=click.Path(path_type=Path))
@engine_options
@click.option("--overwrite", is_flag=True, help="Rebuild an existing engine.")
def build_engine_command(
    export_dir: Path, max_batch: int, max_prompt: int, max_length: int, precision: str, overwrite: bool
) -> None:
    """Build a TensorRT engine (prompt and decode profiles) from EXPORT_DIR's plain graph into EXPORT_DIR/trt."""
    from starcast.exporter.tensorrt import Limits, build_engine_in_place

    manifest = build_engine_in_place(export_dir, Limits(max_batch, max_prompt, max_length), precision, overwrite)
    click.echo(f"built {manifest['tensorrt']['engine']} with TensorRT {manifest['tensorrt']['tensorrt']}")


@cli.command("check")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--source", help="The checkpoint to compare against (default: the one recorded in starcast.json).")
@click.option("--trt-ready", is_flag=True, help="Only check that TensorRT's ONNX parser can build the plain graph.")
def check_command(export_dir: Path, source: str | None, trt_ready: bool) -> None:
    """Re-verify EXPORT_DIR: file hashes, then ONNX Runtime logits against the PyTorch reference."""
    from starcast.exporter.export import ParityError, recheck

    if trt_ready:
        from starcast.exporter.manifest import read_manifest
        from starcast.exporter.trt_check import check_trt_ready

        folder = export_dir.expanduser().absolute()
        report = check_trt_ready(folder / read_manifest(folder).get("model", "model.onnx"))
        click.echo("\n".join(report.lines()))
        if not report.ready:
            sys.exit(1)
        return

    report = recheck(export_dir, source, progress=Progress())
    if not report.passed:
        raise ParityError(report.summary())
    click.echo(f"{export_dir}: {report.summary()}")


@cli.command("generate")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--prompt", help="Text to continue (needs the export's tokenizer.json).")
@click.option("--ids", help="Comma-separated token ids to continue, instead of --prompt.")
@click.option("--fim-suffix", help="Fill in the middle: --prompt is the prefix, this the suffix.")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--repetition-penalty", default=1.0, show_default=True)
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop before this string (repeatable).")
@click.option("--stream", is_flag=True, help="Print text as it is decoded.")
@click.option("--provider", default="cpu", show_default=True, help="cpu or cuda.")
@click.option(
    "--graph", default="auto", show_default=True, help="auto (fused when it fits the provider), plain, fused."
)
def generate_command(
    export_dir: Path,
    prompt: str | None,
    ids: str | None,
    fim_suffix: str | None,
    max_new_tokens: int,
    stop_strings: tuple[str, ...],
    stream: bool,
    provider: str,
    graph: str,
    **sampling,
) -> None:
    """Generate from EXPORT_DIR: text with --prompt, token ids with --ids."""
    from starcast.runtime.generator import Generator

    if (prompt is None) == (ids is None):
        raise UserError("give exactly one of --prompt and --ids")
    generator = Generator.from_pretrained(export_dir, provider=provider, graph=graph)
    if ids is not None:
        try:
            tokens = [int(t) for t in ids.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--ids: not a comma-separated list of integers: {ids!r}") from None
        out = generator.generate([tokens], max_new_tokens=max_new_tokens, **sampling)
        click.echo(",".join(map(str, out[0])))
        return
    if fim_suffix is not None:
        prompt = generator.require_tokenizer().fim_prompt(prompt, fim_suffix)
    pieces = generator.stream(prompt, max_new_tokens, list(stop_strings), **sampling)
    if stream:
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()
    else:
        click.echo("".join(pieces))


@cli.command("bench")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--batch", default=1, show_default=True)
@click.option("--prompt-tokens", default=128, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--provider", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--graph", default="auto", show_default=True, help="auto, plain or fused.")
@click.option("--runs", default=3, show_default=True, help="Timed runs after one warm-up; medians are reported.")
@click.option("--threads", default=0, help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_command(
    export_dir: Path,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    provider: str,
    graph: str,
    runs: int,
    threads: int,
    as_json: bool,
) -> None:
    """Time prefill, first token and decode of EXPORT_DIR; report medians and peak memory."""
    from starcast.runtime.bench import bench

    result = bench(export_dir, batch, prompt_tokens, new_tokens, provider, graph, runs, threads)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())


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
