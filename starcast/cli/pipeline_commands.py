"""Commands that make and prove exports: export, optimize, quantize, build-engine, check, demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from starcast.cli.app import (
    QUANTIZATIONS,
    block_size_option,
    cli,
    dtype_option,
    engine_options,
    overwrite_option,
    quantize_option,
    target_option,
)
from starcast.contract.errors import MissingExtra, UserError


def require_export_extra(what: str) -> None:
    """One line naming the extra, before any work, when the exporter's packages are missing."""
    import importlib.util

    for module in ("torch", "onnxscript", "onnx_ir", "safetensors"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(what, "export", module)


def refuse_fp32_cuda(dtype: str) -> None:
    if dtype == "fp32":
        raise UserError(
            "--target cuda needs --dtype fp16: ONNX Runtime's CUDA GroupQueryAttention has fp16 and bf16 kernels "
            "only, and an fp32 graph would run its attention on the CPU"
        )


def progress(quiet: bool = False):
    from starcast.cli.ticker import TerminalProgress

    return TerminalProgress(not quiet)


@cli.command("export", short_help="Export a checkpoint to ONNX, fused and proven against PyTorch.")
@click.argument("model")
@click.argument("output_dir", type=click.Path(path_type=Path))
@dtype_option
@target_option
@click.option("--no-fuse", is_flag=True, help="Write only the plain graph.")
@quantize_option
@block_size_option
@click.option("--format", "fmt", type=click.Choice(("onnx", "trt")), default="onnx", show_default=True,
              help="trt adds a TensorRT engine.")  # fmt: skip
@engine_options
@overwrite_option
@click.option("--quiet", is_flag=True, help="No stage lines on stderr.")
def export_command(
    model: str, output_dir: Path, dtype: str, target: str, no_fuse: bool, quantization: str | None,
    block_size: str, fmt: str, max_batch: int, max_prompt: int, max_length: int, overwrite: bool, quiet: bool,
) -> None:  # fmt: skip
    """Export MODEL (a checkpoint folder, Hub id or builtin:tiny-python) to OUTPUT_DIR as ONNX, proven against
    PyTorch.

    \b
    Example: starcast export builtin:tiny-python out/
    """
    if (Path(model).expanduser() / "starcast.json").is_file():
        raise UserError(
            f"{model} is a starcast export already; fuse it with `starcast optimize` or quantize it with "
            "`starcast quantize`"
        )
    require_export_extra("starcast export")
    engine = None
    if fmt == "trt":
        from starcast.runtime.tensorrt.builder import Limits, require_tensorrt

        require_tensorrt()  # before any export work
        engine = Limits(max_batch, max_prompt, max_length)
    if target == "cuda" and not no_fuse:
        refuse_fp32_cuda(dtype)
    from starcast.pipeline.export import export

    quantize = (quantization, int(block_size)) if quantization else None
    manifest = export(
        model, output_dir, dtype, overwrite, None if no_fuse else target, engine, quantize, progress(quiet)
    )
    fused = f" + fused graph for {target}" if not no_fuse else ""
    click.echo(f"exported {manifest.parameters / 1e6:.1f}M parameters ({dtype}){fused} to {output_dir}")


@cli.command("optimize", short_help="Fuse a plain export into a new folder.")
@click.argument("plain_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@target_option
@overwrite_option
def optimize_command(plain_dir: Path, output_dir: Path, target: str, overwrite: bool) -> None:
    """Fuse an existing plain export into OUTPUT_DIR (PLAIN_DIR is left untouched).

    \b
    Example: starcast optimize plain/ fused/ --target cpu
    """
    require_export_extra("starcast optimize")
    from starcast.contract.manifest import read_manifest
    from starcast.pipeline.derive import optimize_export

    if target == "cuda":
        refuse_fp32_cuda(read_manifest(plain_dir.expanduser().absolute()).dtype)
    manifest = optimize_export(plain_dir, output_dir, target, overwrite, progress())
    report = manifest.fused.report
    click.echo(
        f"fused for {target}: {report['nodes']['before']} -> {report['nodes']['after']} nodes "
        f"({report['nodes_per_layer']['before']} -> {report['nodes_per_layer']['after']} per layer), "
        f"fused ops {report['fused_ops']}, written to {output_dir}"
    )


@cli.command("quantize", short_help="Quantize an export's weights: int4, int8 or int8-dynamic.")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option(
    "--quantize",
    "quantization",
    type=click.Choice(QUANTIZATIONS),
    default="int4",
    show_default=True,
    help="int8/int4: MatMulNBits (block-wise); int8-dynamic: DynamicQuantizeMatMul (per channel, CPU).",
)
@block_size_option
@click.option("--eval-text", type=click.Path(path_type=Path), help="Text to measure perplexity on (first MiB).")
@overwrite_option
def quantize_command(
    export_dir: Path, output_dir: Path, quantization: str, block_size: str, eval_text: Path | None, overwrite: bool
) -> None:
    """Weight-only int8/int4 quantization of EXPORT_DIR's graphs into OUTPUT_DIR, with measured accuracy.

    \b
    Example: starcast quantize out/ out-int4/ --quantize int4
    """
    require_export_extra("starcast quantize")
    from starcast.pipeline.derive import quantize_export

    manifest = quantize_export(export_dir, output_dir, quantization, int(block_size), eval_text, overwrite, progress())
    click.echo(json.dumps(manifest.quantization["accuracy"], indent=2))


@cli.command("build-engine", short_help="Build a TensorRT engine inside an export.")
@click.argument("export_dir", type=click.Path(path_type=Path))
@engine_options
@click.option("--overwrite", is_flag=True, help="Rebuild an existing engine (reusing its timing cache).")
def build_engine_command(export_dir: Path, max_batch: int, max_prompt: int, max_length: int, overwrite: bool) -> None:
    """Build a TensorRT engine (prompt and decode profiles) from EXPORT_DIR's plain graph into EXPORT_DIR/trt.

    \b
    Example: starcast build-engine out/ --max-batch 4
    """
    from starcast.pipeline.engine import build_engine_in_place
    from starcast.runtime.tensorrt.builder import Limits

    manifest = build_engine_in_place(export_dir, Limits(max_batch, max_prompt, max_length), overwrite, progress())
    click.echo(f"built {manifest.tensorrt['engine']} with TensorRT {manifest.tensorrt['tensorrt']}")


@cli.command("check", short_help="Re-prove an export: hashes, fused vs plain, vs PyTorch.")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--source", help="The checkpoint to re-prove against (built-in sources are found by name).")
@click.option("--files-only", is_flag=True, help="Only the sha256 of every file and that each graph loads.")
@click.option("--trt-ready", is_flag=True, help="Only check that TensorRT's ONNX parser can build the plain graph.")
def check_command(export_dir: Path, source: str | None, files_only: bool, trt_ready: bool) -> None:
    """Re-prove EXPORT_DIR: file hashes, the fused graph against the plain graph, the plain graph against the
    PyTorch reference.

    \b
    Example: starcast check out/
    """
    if trt_ready:
        from starcast.contract.manifest import read_manifest
        from starcast.runtime.tensorrt.ready import check_trt_ready

        folder = export_dir.expanduser().absolute()
        manifest = read_manifest(folder)
        report = check_trt_ready(manifest.path(folder, manifest.plain.model))
        click.echo("\n".join(report.lines()))
        if not report.ready:
            sys.exit(1)
        return
    from starcast.pipeline.check import check_export

    report = check_export(export_dir, source, files_only, progress())
    click.echo("\n".join(f"{export_dir}: {line}" for line in [*report.lines, tokenizer_line(export_dir)]))


def tokenizer_line(export_dir: Path) -> str:
    """What `check` says of the tokenizer (check_export has loaded it and matched it to the vocabulary already)."""
    from starcast.runtime.text import Tokenizer

    tokenizer = Tokenizer.from_export(export_dir.expanduser().absolute())
    if tokenizer is None:
        return "tokenizer: none (tokenizer.json absent): generate takes --ids only; serve and triton-repo refuse it"
    try:
        fim = f"fill-in-the-middle tokens {'/'.join(tokenizer.fim_tokens())}"
    except UserError:
        fim = "no fill-in-the-middle tokens"
    return f"tokenizer ok: tokenizer.json loads, ids up to {tokenizer.largest_id()}, {fim}"


@cli.command("demo", short_help="The whole pipeline on the built-in model.")
@click.option("--output", type=click.Path(path_type=Path), help="Keep the export here (default: a temporary folder).")
@click.option("--overwrite", is_flag=True, help="Replace the --output folder if it is a starcast export.")
def demo_command(output: Path | None, overwrite: bool) -> None:
    """Export the built-in trained model, fuse and prove it, then stream a completion and fill in the middle.

    \b
    Example: starcast demo
    """
    require_export_extra("starcast demo")
    from starcast.demo import run_demo

    summary = run_demo(output, overwrite, progress=progress())
    click.echo(json.dumps(summary, indent=2))


@cli.command("selftest", short_help="Prove starcast on this machine's GPU (or on the CPU).")
@click.option("--provider", type=click.Choice(("cuda", "cpu")), default="cuda", show_default=True)
@click.option("--device", "device_id", type=click.IntRange(0, 63), default=0, show_default=True, help="GPU index.")
@click.option("--small", is_flag=True, help="Small models instead of SantaCoder's shape (with --provider cpu: a test).")
@click.option("--output", type=click.Path(path_type=Path), help="Keep the exports here (default: a temporary folder).")
@click.option("--report", type=click.Path(path_type=Path), default=Path("selftest-report.json"), show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace the report file if it exists.")
def selftest_command(
    provider: str, device_id: int, small: bool, output: Path | None, report: Path, overwrite: bool
) -> None:
    """Prove starcast on this machine's GPU: exports, node placement, CUDA graphs, greedy tokens against a
    reference, decode timings beside transformers, the bandwidth roofline. Exit 1 if a check fails.

    \b
    Example: starcast selftest --provider cuda --report selftest.json
    """
    import tempfile

    require_export_extra("starcast selftest")
    from starcast.selftest import prepare_output, require_provider, selftest, table

    if report.exists() and not report.is_file():
        raise UserError(f"selftest --report {report}: not a file")
    if report.exists() and not overwrite:
        raise UserError(f"selftest --report {report}: the file exists (pass --overwrite to replace it)")
    if not report.absolute().parent.is_dir():
        raise UserError(f"selftest --report {report}: the folder {report.absolute().parent} does not exist")
    require_provider(provider, device_id)
    with tempfile.TemporaryDirectory(prefix="starcast-selftest-") as scratch:
        work = output.expanduser().absolute() if output else Path(scratch)
        prepare_output(work)
        result = selftest(provider, work, small, device_id, progress())
    report.write_text(json.dumps(result, indent=2, default=str) + "\n")
    click.echo(table(result))
    click.echo(f"report written to {report}")
    if not result["passed"]:
        sys.exit(1)


@cli.command("triton-repo", short_help="Write a Triton model repository that serves an export.")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.argument("repo_dir", type=click.Path(path_type=Path))
@click.option("--name", default="starcoder", show_default=True, help="The model's name in the repository.")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True, help="Model instances (per GPU).")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True, help="Rows per instance.")
@click.option(
    "--max-queue", type=click.IntRange(0), default=64, show_default=True, help="Waiting beyond free rows (0: none)."
)
@click.option("--provider", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True)
@click.option("--link", is_flag=True, help="Link the export into the repository instead of copying it.")
@click.option("--overwrite", is_flag=True, help="Replace REPO_DIR/NAME if it holds only what starcast wrote.")
def triton_repo_command(
    export_dir: Path, repo_dir: Path, name: str, instances: int, max_batch: int, max_queue: int, provider: str,
    link: bool, overwrite: bool,
) -> None:  # fmt: skip
    """Write a Triton Inference Server model repository (Python backend, decoupled) that serves EXPORT_DIR.

    \b
    Example: starcast triton-repo out/ model_repository --name starcoder
    """
    from starcast.triton.repository import write_repository

    target = write_repository(export_dir, repo_dir, name, instances, max_batch, max_queue, provider, link, overwrite)
    click.echo(f"wrote {target} (serve it with: tritonserver --model-repository={repo_dir})")
