"""The ``eval``, ``normalize``, ``export`` and ``compare`` commands; ``register(app)`` adds them to the CLI.

Helpers are local rather than imported from ``cli`` so that ``cli`` can import this
module at its top without an import cycle.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .console import configure_logging, console, fail


def _load_single_run(vectors: Path, model_name: str | None):
    """Load the one behaviour run at ``vectors``; raise ``ValueError`` if the folder contains several."""
    from .analysis import load_runs

    runs = load_runs([vectors], model_name)
    if len(runs) != 1:
        raise ValueError(
            f"{vectors} contains {len(runs)} behaviours ({', '.join(run.behaviour for run in runs)}); "
            "pass one behaviour folder to --vectors."
        )
    return runs[0]


def parse_multipliers(text: str) -> list[float]:
    """Parse ``"-2,-1,0,1,2"`` into floats; raise ``ValueError`` naming the bad entry."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"Invalid multiplier {part!r} in {text!r}: use numbers separated by commas, e.g. -2,-1,0,1,2.") from None
        if not math.isfinite(value):
            raise ValueError(f"Invalid multiplier {part!r}: it must be a finite number.")
        if value not in values:
            values.append(value)
    if not values:
        raise ValueError(f"Invalid multipliers {text!r}: no number given. Use e.g. -2,-1,0,1,2.")
    return values


def _default_model(manifest: dict) -> str | None:
    from . import models

    model = manifest.get("model")
    # The pipeline records the default model under its display name, which is not loadable.
    if model == "SmolLM2-135M-Instruct":
        return models.DEFAULT_MODEL
    return model


def eval_command(
    vectors: Path = typer.Option(..., "--vectors", help="Behaviour folder written by `ndif-vectors run` (OUT/<behaviour>), or OUT if it contains one behaviour."),
    dataset: Path = typer.Option(..., "--dataset", help="A/B test set (CAA JSON list or JSONL), e.g. test_dataset_ab.json."),
    layers: Optional[str] = typer.Option(None, help="Layers to steer, one at a time: a list '10,13', a range '10-14' or 'all'. Default: every layer that has a vector."),
    multipliers: str = typer.Option("-2,-1,0,1,2", help="Comma-separated multipliers of the vector (unitless; 0 is unsteered)."),
    model: Optional[str] = typer.Option(None, help="Hub id or local directory of the model. Default: the model in the vectors' manifest."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Which run to read when the folder contains runs of several models (the M in manifest_M.json)."),
    prompt_format: Optional[str] = typer.Option(None, "--prompt-format", help="chat, llama2 or base. Default: the format the vectors were built with."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System prompt. Default: the one the vectors were built with."),
    positions: str = typer.Option("answer", help="Where the vector is added: 'answer' (from the answer's '(' on, as in CAA) or 'all' (every prompt token)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder for the JSON, CSV and PNG files. Default: <vectors>/eval."),
    plot_multiplier: Optional[float] = typer.Option(None, "--plot-multiplier", help="Multiplier of the layer sweep plot (its negative is drawn too when evaluated). Default: the largest multiplier."),
    batch_size: int = typer.Option(8, "--batch-size", help="Test items per forward pass."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N test items."),
    device: str = typer.Option("cpu", help="Torch device, e.g. cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16, float16 or float64."),
    remote: bool = typer.Option(False, "--remote", help="Run the steered forward passes on NDIF; only the answer letters' probabilities come back."),
    host: Optional[str] = typer.Option(None, envvar="NDIF_HOST", help="NDIF host URL. Default: NDIF_HOST, else the public NDIF service."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details."),
) -> None:
    """Steer with multiplier x vector at each layer and score the A/B test set."""
    from . import datasets, models, prompts
    from .steering import evaluate_steering, plot_layer_sweep, plot_multiplier_sweep, write_sweep_tables

    configure_logging(verbose)
    try:
        run = _load_single_run(vectors, model_name)
        manifest = run.manifest
        multiplier_values = parse_multipliers(multipliers)
        if plot_multiplier is not None and plot_multiplier not in multiplier_values:
            raise ValueError(f"--plot-multiplier {plot_multiplier:g} is not among the multipliers {multiplier_values}.")
        if limit is not None and limit < 1:
            raise ValueError(f"Invalid limit {limit}: it must be at least 1.")
        items = datasets.load_dataset(dataset)[:limit]

        model_id = model or _default_model(manifest)
        if not model_id:
            raise ValueError(f"The manifest in {run.directory} names no model; pass --model.")
        console.print(f"Loading {model_id} …", highlight=False)
        trace_options: dict = {}
        if remote:
            from .remote import connect

            nnsight_model, trace_options = connect(model_id, host=host, dtype=dtype)
        else:
            nnsight_model = models.load_model(model_id, device=device, dtype=dtype)
        n_model_layers = models.find_layers(nnsight_model).count
        layer_list = run.layers if layers is None else models.parse_layers(layers, n_model_layers)
        prompt_format_value = prompts.resolve_format(prompt_format or manifest.get("prompt_format"),
                                                     nnsight_model.tokenizer)
        system = system_prompt if system_prompt is not None else manifest.get("system_prompt")
    except (ValueError, OSError, RuntimeError) as error:
        fail(error)

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("items x settings", total=None)
        try:
            result = evaluate_steering(
                nnsight_model, run.vectors, items, layer_list, multiplier_values,
                prompt_format=prompt_format_value, system_prompt=system, positions=positions,
                batch_size=batch_size, progress=lambda done, total: bar.update(task, completed=done, total=total),
                trace_options=trace_options,
            )
        except KeyboardInterrupt:
            bar.stop()
            console.print("[yellow]Interrupted.[/] Nothing was written.")
            raise typer.Exit(code=130)
        except (ValueError, RuntimeError) as error:
            bar.stop()
            fail(error)

    out_dir = out or run.directory / "eval"
    stem = f"eval_{run.behaviour}_{models.model_name(model_id)}"
    settings = {
        "vectors": str(run.directory),
        "behaviour": run.behaviour,
        "vector_model": manifest.get("model"),
        "vector_manifest": manifest,
        "model": model_id,
        "dataset": str(dataset),
        "dataset_sha256": datasets.file_sha256(dataset),
        "limit": limit,
        "device": device,
        "dtype": dtype,
    }
    try:
        files = write_sweep_tables(result, out_dir / f"{stem}.json", out_dir / f"{stem}_summary.csv",
                                   out_dir / f"{stem}_items.csv", settings)
        title = f"{run.behaviour}: {models.model_name(model_id)}, {len(items)} test items, positions '{positions}'"
        files.append(plot_multiplier_sweep(result, out_dir / f"{stem}_multipliers.png",
                                           f"Behaviour score vs multiplier\n{title}"))
        sweep_multiplier = plot_multiplier if plot_multiplier is not None else max(multiplier_values)
        files.append(plot_layer_sweep(result, out_dir / f"{stem}_layers.png",
                                      f"Behaviour score vs layer at multiplier {sweep_multiplier:+g}\n{title}",
                                      sweep_multiplier))
    except OSError as error:
        fail(error)

    table = Table(title=f"{run.behaviour}: mean behaviour score p(matching) / (p(matching) + p(not matching))")
    table.add_column("layer", justify="right")
    for multiplier in result.multipliers:
        table.add_column(f"{multiplier:+g}", justify="right")
    for row, layer in enumerate(result.layers):
        table.add_row(str(layer), *(f"{float(value):.3f}" for value in result.mean_scores[row]))
    console.print(table)
    for path in files:
        console.print(f"Wrote {path}", highlight=False)


def normalize_command(
    directories: List[Path] = typer.Argument(..., help="Behaviour folders, or run folders that contain them (at least two behaviours in all)."),
    out: Path = typer.Option(..., "--out", help="Output folder; normalised copies go to OUT/<behaviour>/ in the layout of `ndif-vectors run`."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Which run to read when a folder contains runs of several models (the M in manifest_M.json)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details."),
) -> None:
    """Rescale each layer's vectors to the mean norm of that layer across behaviours (CAA)."""
    from .analysis import load_runs, normalize_runs, write_normalized

    configure_logging(verbose)
    try:
        result = normalize_runs(load_runs(directories, model_name))
        files = write_normalized(result, out)
    except (ValueError, OSError) as error:
        fail(error)

    table = Table(title="Vector norm per layer before normalisation; the last column is the common norm after")
    table.add_column("layer", justify="right")
    for run in result.runs:
        table.add_column(run.behaviour, justify="right")
    table.add_column("after", justify="right")
    for layer in result.layers:
        before = [run.manifest.get("vector_norms", {}).get(str(layer)) for run in result.runs]
        table.add_row(str(layer), *(f"{value:.3f}" if value is not None else "?" for value in before),
                      f"{result.target_norms[layer]:.3f}")
    console.print(table)
    console.print(f"Wrote {len(files)} files under {out}", highlight=False)


def export_command(
    vectors: Path = typer.Option(..., "--vectors", help="Behaviour folder written by `ndif-vectors run` or `normalize`."),
    format: str = typer.Option(..., "--format", help="gguf (llama.cpp control vector), safetensors (keys layer.<L>) or pt (a {layer: tensor} dict)."),
    out: Path = typer.Option(..., "--out", help="Output file."),
    layers: Optional[str] = typer.Option(None, help="Layers to export, e.g. '10-14'. Default: every layer with a vector (GGUF skips layer 0, which llama.cpp cannot use)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Which run to read when the folder contains runs of several models."),
    model_hint: Optional[str] = typer.Option(None, "--model-hint", help="GGUF controlvector.model_hint. Default: the model_type in the model's config.json, else the model name."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details."),
) -> None:
    """Write a run's vectors as a llama.cpp GGUF control vector, safetensors or a .pt file."""
    from .export import export_run
    from .models import parse_layers

    configure_logging(verbose)
    try:
        run = _load_single_run(vectors, model_name)
        n_model_layers = int(run.manifest.get("n_model_layers") or max(run.layers) + 1)
        layer_list = None if layers is None else parse_layers(layers, n_model_layers)
        result = export_run(run, out, format, layer_list, model_hint)
    except (ValueError, OSError) as error:
        fail(error)
    skipped = f"; skipped layer {', '.join(map(str, result.skipped_layers))}" if result.skipped_layers else ""
    console.print(f"Wrote {result.path} ({result.format}, layers {result.layers}{skipped})", highlight=False)


def compare_command(
    directories: List[Path] = typer.Argument(..., help="One run (compares its layers), two runs of one behaviour (e.g. local vs NDIF), or several behaviours."),
    mode: Optional[str] = typer.Option(None, help="layers, behaviours or runs. Default: chosen from the folders as described above."),
    out: Path = typer.Option(Path("similarity.png"), "--out", help="Heatmap PNG; the matrix is also written next to it as JSON."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Which run to read when a folder contains runs of several models."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details."),
) -> None:
    """Cosine similarity between the vectors of layers, behaviours or two runs."""
    from . import storage
    from .analysis import compare_runs, load_runs, plot_heatmap

    configure_logging(verbose)
    try:
        comparison = compare_runs(load_runs(directories, model_name), mode)
        png = plot_heatmap(comparison, out)
        data = storage.save_json(out.with_suffix(".json"), comparison.to_json())
    except (ValueError, OSError) as error:
        fail(error)

    table = Table(title=comparison.title)
    if comparison.mode == "runs":
        table.add_column("layer", justify="right")
        table.add_column("cosine", justify="right")
        for layer, value in comparison.per_layer.items():
            table.add_row(str(layer), f"{value:.6f}")
    else:
        table.add_column(comparison.row_axis)
        for label in comparison.column_labels:
            table.add_column(label, justify="right")
        for row, label in enumerate(comparison.row_labels):
            table.add_row(label, *(f"{float(value):.3f}" for value in comparison.matrix[row]))
    console.print(table)
    console.print(f"Wrote {png} and {data}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``eval``, ``normalize``, ``export`` and ``compare`` commands to ``app``."""
    app.command("eval")(eval_command)
    app.command("normalize")(normalize_command)
    app.command("export")(export_command)
    app.command("compare")(compare_command)
