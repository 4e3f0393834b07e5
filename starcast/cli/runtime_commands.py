"""Commands that run exports (the runtime alone, no PyTorch): generate, bench."""

from __future__ import annotations

import json
from pathlib import Path

import click

from starcast.cli.app import cli, emit, session_options, stage_line
from starcast.contract.errors import UserError


def open_generator(export_dir: Path, provider: str, device_id: int, graph: str, threads: int, tf32: bool,
                   verbose: bool, max_length: int | None = None, quiet: bool = False):  # fmt: skip
    from starcast.runtime.generator import Generator

    generator = Generator.from_pretrained(
        export_dir, provider=provider, graph=graph, max_length=max_length, threads=threads, device_id=device_id,
        tf32=tf32, verbose=verbose,
    )  # fmt: skip
    if not quiet:
        stage_line(f"[graph] {generator.graph_note} on {provider}")
    return generator


def parse_ids(ids: str) -> list[int]:
    try:
        tokens = [int(t) for t in ids.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--ids: not a comma-separated list of integers: {ids!r}") from None
    if not tokens:
        raise UserError("--ids: no token ids given")
    return tokens


SAMPLING_ONLY = ("temperature", "top_k", "top_p", "seed")


def sampling_options(do_sample: bool, temperature: float | None, top_k: int | None, top_p: float | None,
                     seed: int | None, repetition_penalty: float) -> dict:  # fmt: skip
    """One meaning everywhere (the server's and Triton's too): temperature 0 is greedy decoding. A sampling option
    given without --do-sample is an error, never silently ignored."""
    if temperature == 0:
        if do_sample:
            raise UserError("--temperature 0 is greedy decoding; drop --do-sample, or give a temperature > 0")
        temperature = None
    values = (temperature, top_k, top_p, seed)
    given = [name for name, value in zip(SAMPLING_ONLY, values, strict=True) if value is not None]
    if given and not do_sample:
        names = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(f"{names} only apply when sampling: add --do-sample (decoding is greedy without it)")
    return dict(do_sample=do_sample, temperature=1.0 if temperature is None else temperature,
                top_k=top_k or 0, top_p=1.0 if top_p is None else top_p, seed=seed,
                repetition_penalty=repetition_penalty)  # fmt: skip


@cli.command("generate", short_help="Generate text or token ids from an export.")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--prompt", help="Text to continue (needs the export's tokenizer.json).")
@click.option("--ids", help="Comma-separated token ids to continue, instead of --prompt.")
@click.option("--fim-suffix", help="Fill in the middle: --prompt is the prefix, this the suffix.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=click.FloatRange(0), help="With --do-sample (default 1.0); 0: greedy.")
@click.option("--top-k", type=click.IntRange(0), help="With --do-sample (default 0: off).")
@click.option("--top-p", type=float, help="With --do-sample (default 1.0: off).")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0), help="With --do-sample: seed for reproducible sampling.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop before this string (repeatable).")
@click.option("--stream", is_flag=True, help="Print text as it is decoded.")
@click.option("--quiet", is_flag=True, help="No [graph] line on stderr.")
@session_options
def generate_command(
    export_dir: Path, prompt: str | None, ids: str | None, fim_suffix: str | None, max_new_tokens: int,
    stop_strings: tuple[str, ...], stream: bool, quiet: bool, provider: str, device_id: int, graph: str,
    threads: int, tf32: bool, verbose: bool, **sampling,
) -> None:  # fmt: skip
    """Generate from EXPORT_DIR: text with --prompt, token ids with --ids.

    Greedy unless --do-sample; --temperature 0 is greedy too.

    \b
    Example: starcast generate out/ --prompt 'def fib(n):' --max-new-tokens 32 --stream
    """
    sampling = sampling_options(**sampling)
    if (prompt is None) == (ids is None):
        raise UserError("give exactly one of --prompt and --ids")
    if fim_suffix is not None and prompt is None:
        raise UserError("--fim-suffix needs --prompt (the prefix)")
    tokens = parse_ids(ids) if ids is not None else None
    generator = open_generator(export_dir, provider, device_id, graph, threads, tf32, verbose, quiet=quiet)
    if tokens is None and generator.tokenizer is None:
        raise UserError(f"{export_dir}: the export has no tokenizer.json; pass token ids with --ids 1,2,3 instead")
    if tokens is not None:
        out = generator.generate([tokens], max_new_tokens=max_new_tokens, **sampling)
        emit(",".join(map(str, out[0])))
        return
    if fim_suffix is not None:
        prompt = generator.require_tokenizer().fim_prompt(prompt, fim_suffix)
    pieces = generator.stream(prompt, max_new_tokens, list(stop_strings), **sampling)
    if stream:
        for piece in pieces:
            emit(piece, nl=False)
        emit("")
    else:
        emit("".join(pieces))


@cli.command("bench", short_help="Time prefill, first token and decode of an export.")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2), default=128, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Timed runs after a warm-up.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@session_options
def bench_command(
    export_dir: Path, batch: int, prompt_tokens: int, new_tokens: int, runs: int, as_json: bool, provider: str,
    device_id: int, graph: str, threads: int, tf32: bool, verbose: bool,
) -> None:  # fmt: skip
    """Time prefill, first token and decode of EXPORT_DIR; report medians and peak memory.

    \b
    Example: starcast bench out/ --batch 4 --json
    """
    from starcast.runtime.bench import bench

    result = bench(
        export_dir, batch, prompt_tokens, new_tokens, provider, graph, runs, threads, device_id=device_id, tf32=tf32,
        verbose=verbose,
    )  # fmt: skip
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())


@cli.command("serve", short_help="Serve an export with an OpenAI-compatible completions API.")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True, help="Rows decoded together.")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="Requests that may wait beyond the free rows (0: none); beyond it: 503.")  # fmt: skip
@click.option("--max-length", type=click.IntRange(2),
              help="Prompt + output tokens per request (default: min(n_positions, 2048)).")  # fmt: skip
@click.option("--provider", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True)
@click.option("--device", "device_id", type=click.IntRange(0, 63), default=0, show_default=True, help="GPU index.")
@click.option("--threads", type=click.IntRange(0), default=0, help="CPU threads (0: all cores).")
@click.option("--grace", type=click.FloatRange(0, 3600), default=10.0, show_default=True,
              help="Seconds running requests get to finish after SIGTERM.")  # fmt: skip
@click.option("--model-name", help="The model id /v1/models reports (default: the folder's name).")
def serve_command(
    model: str, host: str, port: int, max_batch: int, max_queue: int, max_length: int | None, provider: str,
    device_id: int, threads: int, grace: float, model_name: str | None,
) -> None:  # fmt: skip
    """Serve MODEL (an export folder, or builtin:tiny-python) with an OpenAI-compatible completions API.

    \b
    Example: starcast serve builtin:tiny-python --port 8000
    """
    from starcast.cli.ticker import TerminalProgress
    from starcast.serve.main import serve

    serve(model, host, port, max_batch, max_queue, provider, device_id, max_length, threads, grace, model_name,
          TerminalProgress())  # fmt: skip
