"""Reading finished runs, CAA's cross-behaviour normalisation, and cosine-similarity comparisons.

A run directory is what ``ndif-vectors run`` writes for one behaviour: ``DIR/B`` with
``vectors_M.safetensors`` and ``manifest_M.json``. Functions here accept that directory,
or its parent ``DIR`` holding several behaviours, so that ``normalize vectors/`` works.

Normalisation follows the CAA repository: for each layer, every behaviour's vector is
rescaled to the mean norm of that layer's vectors across the given behaviours. The
directions do not change, and vectors of different behaviours become comparable in
strength at one multiplier.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import storage

logger = logging.getLogger(__name__)

COMPARE_MODES = ("layers", "behaviours", "runs")


class RunError(ValueError):
    """A run directory that cannot be read, or runs that cannot be combined."""


@dataclass
class RunVectors:
    """The vectors and manifest of one behaviour's run."""

    directory: Path
    behaviour: str
    model_name: str
    manifest: dict
    vectors: dict[int, torch.Tensor] = field(repr=False)  # layer -> [d_model], float32

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


def _manifests(directory: Path) -> list[Path]:
    return sorted(directory.glob("manifest_*.json"))


def run_directories(path: Path) -> list[Path]:
    """Return the behaviour directories at ``path``: itself if it contains a manifest, else its subfolders that do."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"Vector directory not found: {path}. Pass the --out directory of `ndif-vectors run` "
                       "or one of its behaviour folders.")
    if _manifests(path):
        return [path]
    children = sorted(child for child in path.iterdir() if child.is_dir() and _manifests(child))
    if not children:
        raise RunError(
            f"{path} contains no manifest_*.json, and neither do its subfolders. Pass a behaviour "
            "folder written by `ndif-vectors run` (it contains vectors_<model>.safetensors and "
            "manifest_<model>.json) or its parent."
        )
    return children


def load_run(directory: Path, model_name: str | None = None) -> RunVectors:
    """Read the vectors and manifest of one behaviour directory.

    A directory may hold runs of several models; ``model_name`` (the ``M`` of
    ``manifest_M.json``) picks one and is required when there is more than one.
    """
    directory = Path(directory)
    manifests = _manifests(directory)
    names = [path.name[len("manifest_"):-len(".json")] for path in manifests]
    if model_name is None:
        if len(names) != 1:
            raise RunError(
                f"{directory} contains runs of {len(names)} models ({', '.join(names) or 'none'}); "
                "pass --model-name to choose one."
            )
        model_name = names[0]
    elif model_name not in names:
        raise RunError(
            f"{directory} has no run of model {model_name!r}; it contains {', '.join(names) or 'none'}."
        )

    paths = storage.OutputPaths(directory.parent, directory.name, model_name)
    try:
        manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunError(f"{paths.manifest} is not valid JSON: {error.msg} at line {error.lineno}.") from None

    if paths.safetensors.is_file():
        vectors = storage.load_vectors(paths.safetensors)
    else:
        layer_files = sorted(directory.glob(f"vec_layer_*_{model_name}.pt"))
        vectors = {}
        for path in layer_files:
            layer_text = path.name[len("vec_layer_"):-len(f"_{model_name}.pt")]
            if layer_text.isdigit():
                vectors[int(layer_text)] = torch.load(path, weights_only=True)
    if not vectors:
        raise RunError(
            f"{directory} has a manifest for {model_name!r} but no vectors: neither "
            f"{paths.safetensors.name} nor vec_layer_<L>_{model_name}.pt files."
        )
    vectors = {layer: vector.float() for layer, vector in sorted(vectors.items())}
    widths = {int(vector.shape[-1]) for vector in vectors.values()}
    if len(widths) != 1 or any(vector.dim() != 1 for vector in vectors.values()):
        raise RunError(f"The vectors in {directory} are not all 1-D of one length (found widths {sorted(widths)}).")
    behaviour = str(manifest.get("behaviour") or directory.name)
    return RunVectors(directory, behaviour, model_name, manifest, vectors)


def load_runs(paths: list[Path], model_name: str | None = None) -> list[RunVectors]:
    """Read every behaviour run under ``paths`` (behaviour folders or their parents), in order."""
    runs = []
    for path in paths:
        for directory in run_directories(path):
            runs.append(load_run(directory, model_name))
    return runs


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Return the cosine similarity of two vectors, computed in float64."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


# Normalisation


@dataclass
class NormalizedRuns:
    """Rescaled copies of several behaviours' runs and the per-layer target norms."""

    runs: list[RunVectors]
    layers: list[int]
    target_norms: dict[int, float]
    dropped_layers: dict[str, list[int]]
    """Layers of each behaviour that other behaviours lack, left out of the output."""


def normalize_runs(runs: list[RunVectors]) -> NormalizedRuns:
    """Rescale each layer's vectors to the mean norm of that layer across ``runs``.

    Only layers that every run has are kept. Raises ``RunError`` for fewer than two
    behaviours, a behaviour given twice, runs of different models, or no shared layer.
    """
    if len(runs) < 2:
        raise RunError(
            f"Normalisation needs at least two behaviours, got {len(runs)}: with one behaviour every "
            "vector already has the mean norm. Pass several behaviour folders or their parent."
        )
    behaviours = [run.behaviour for run in runs]
    repeated = sorted({name for name in behaviours if behaviours.count(name) > 1})
    if repeated:
        raise RunError(
            f"Behaviour {repeated[0]!r} is given more than once ({', '.join(str(run.directory) for run in runs if run.behaviour == repeated[0])}); "
            "pass each behaviour once."
        )
    for run in runs[1:]:
        if run.d_model != runs[0].d_model or run.model_name != runs[0].model_name:
            raise RunError(
                f"{run.directory} contains vectors of model {run.model_name!r} (d_model {run.d_model}), but "
                f"{runs[0].directory} contains {runs[0].model_name!r} (d_model {runs[0].d_model}); "
                "normalise runs of one model together."
            )

    layers = sorted(set.intersection(*(set(run.vectors) for run in runs)))
    if not layers:
        raise RunError(
            "The behaviours share no layer: " + "; ".join(f"{run.behaviour}: {run.layers}" for run in runs)
            + ". Build the vectors for a common set of layers."
        )
    dropped = {run.behaviour: [layer for layer in run.layers if layer not in layers] for run in runs}
    dropped = {behaviour: extra for behaviour, extra in dropped.items() if extra}
    if dropped:
        logger.warning("Layers missing from some behaviours are left out: %s", dropped)

    target_norms: dict[int, float] = {}
    for layer in layers:
        norms = torch.stack([run.vectors[layer].double().norm() for run in runs])  # [n_runs]
        if (norms == 0).any():
            zero = [run.behaviour for run, norm in zip(runs, norms) if norm == 0]
            raise RunError(f"The vector of layer {layer} is all zeros for {', '.join(zero)}, so it has no direction to rescale.")
        target_norms[layer] = float(norms.mean())

    normalized = []
    for run in runs:
        vectors = {
            layer: (run.vectors[layer].double() * (target_norms[layer] / run.vectors[layer].double().norm())).float()
            for layer in layers
        }
        normalized.append(RunVectors(run.directory, run.behaviour, run.model_name, run.manifest, vectors))
    return NormalizedRuns(normalized, layers, target_norms, dropped)


def write_normalized(result: NormalizedRuns, out_dir: Path) -> list[Path]:
    """Write every normalised run to ``out_dir/<behaviour>/`` in the layout of ``ndif-vectors run``."""
    written = []
    behaviours = [run.behaviour for run in result.runs]
    for run in result.runs:
        paths = storage.OutputPaths(Path(out_dir), run.behaviour, run.model_name)
        if paths.directory.resolve() == run.directory.resolve():
            raise RunError(
                f"The output folder {paths.directory} is the input folder; pass another --out so the "
                "original vectors are kept."
            )
        stacked = torch.stack([run.vectors[layer] for layer in result.layers])  # [n_layers, d_model]
        written += storage.write_vectors(paths, result.layers, stacked)
        manifest = dict(run.manifest)
        manifest.update({
            "layers": result.layers,
            "vector_norms": {str(layer): float(run.vectors[layer].norm()) for layer in result.layers},
            "normalization": {
                "method": "mean norm per layer across behaviours (CAA)",
                "behaviours": behaviours,
                "source": str(run.directory),
                "original_norms": run.manifest.get("vector_norms"),
                "target_norms": {str(layer): norm for layer, norm in result.target_norms.items()},
            },
            "files": {
                "vectors": [paths.vector(layer).name for layer in result.layers],
                "safetensors": paths.safetensors.name,
            },
        })
        written.append(storage.save_json(paths.manifest, manifest))
    return written


# Comparison


@dataclass
class Comparison:
    """Cosine similarities in one of three layouts.

    ``layers``: ``matrix[i, j]`` is the similarity of layers ``row_labels[i]`` and
    ``column_labels[j]`` of one run. ``behaviours``: rows are behaviour pairs, columns
    are layers. ``runs``: rows are layers of the first run, columns layers of the second.
    """

    mode: str
    title: str
    row_labels: list[str]
    column_labels: list[str]
    matrix: torch.Tensor  # [n_rows, n_columns], float64
    row_axis: str
    column_axis: str
    runs: list[str]
    per_layer: dict[int, float] = field(default_factory=dict)
    """For ``runs``: the same-layer cosine of the two runs at each shared layer."""

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "title": self.title,
            "runs": self.runs,
            "row_axis": self.row_axis,
            "column_axis": self.column_axis,
            "row_labels": self.row_labels,
            "column_labels": self.column_labels,
            "matrix": self.matrix.tolist(),
            "per_layer": {str(layer): value for layer, value in self.per_layer.items()},
        }


def run_label(run: RunVectors) -> str:
    """Return ``behaviour (parent folder)``, which tells apart runs of one behaviour."""
    return f"{run.behaviour} ({run.directory.parent.name or run.directory.parent})"


def choose_compare_mode(runs: list[RunVectors]) -> str:
    """Pick ``layers`` for one run, ``runs`` for two runs of one behaviour, else ``behaviours``."""
    if len(runs) == 1:
        return "layers"
    behaviours = [run.behaviour for run in runs]
    if len(runs) == 2 and behaviours[0] == behaviours[1]:
        return "runs"
    if len(set(behaviours)) == len(behaviours):
        return "behaviours"
    raise RunError(
        f"Cannot tell how to compare {len(runs)} runs whose behaviours repeat ({', '.join(behaviours)}). "
        "Pass one run, two runs of one behaviour, or one run per behaviour."
    )


def compare_runs(runs: list[RunVectors], mode: str | None = None) -> Comparison:
    """Compute the cosine similarities of ``runs`` in ``mode`` (chosen from the runs when ``None``)."""
    if not runs:
        raise RunError("No runs to compare; pass at least one vector directory.")
    mode = mode or choose_compare_mode(runs)
    if mode not in COMPARE_MODES:
        raise RunError(f"Invalid comparison mode {mode!r}; choose one of {', '.join(COMPARE_MODES)}.")
    widths = {run.d_model for run in runs}
    if len(widths) != 1:
        raise RunError(
            "The runs have vectors of different widths ("
            + ", ".join(f"{run_label(run)}: {run.d_model}" for run in runs)
            + "), so they come from different models and cannot be compared."
        )
    if mode == "layers":
        if len(runs) != 1:
            raise RunError(f"Mode 'layers' compares the layers of one run, but {len(runs)} runs were given.")
        return _compare_layers(runs[0])
    if mode == "runs":
        if len(runs) != 2:
            raise RunError(f"Mode 'runs' compares two runs, but {len(runs)} were given.")
        return _compare_two_runs(runs[0], runs[1])
    if len(runs) < 2:
        raise RunError("Mode 'behaviours' needs at least two behaviours.")
    return _compare_behaviours(runs)


def _compare_layers(run: RunVectors) -> Comparison:
    layers = run.layers
    stacked = torch.stack([run.vectors[layer].double() for layer in layers])  # [n_layers, d_model]
    unit = torch.nn.functional.normalize(stacked, dim=-1)
    matrix = unit @ unit.T  # [n_layers, n_layers]
    labels = [str(layer) for layer in layers]
    return Comparison("layers", f"Cosine similarity between layers: {run_label(run)}", labels, labels,
                      matrix, "layer", "layer", [str(run.directory)])


def _compare_two_runs(first: RunVectors, second: RunVectors) -> Comparison:
    stacked_first = torch.stack([first.vectors[layer].double() for layer in first.layers])
    stacked_second = torch.stack([second.vectors[layer].double() for layer in second.layers])
    matrix = (torch.nn.functional.normalize(stacked_first, dim=-1)
              @ torch.nn.functional.normalize(stacked_second, dim=-1).T)  # [n_first, n_second]
    shared = [layer for layer in first.layers if layer in second.vectors]
    if not shared:
        raise RunError(
            f"The two runs share no layer ({run_label(first)}: {first.layers}; "
            f"{run_label(second)}: {second.layers})."
        )
    per_layer = {layer: cosine(first.vectors[layer], second.vectors[layer]) for layer in shared}
    first_label, second_label = str(first.directory), str(second.directory)
    if first_label == second_label:
        second_label += " (again)"
    return Comparison(
        "runs", f"Cosine similarity: {first.behaviour}, two runs",
        [str(layer) for layer in first.layers], [str(layer) for layer in second.layers], matrix,
        f"layer of {first_label}", f"layer of {second_label}", [str(first.directory), str(second.directory)],
        per_layer,
    )


def _compare_behaviours(runs: list[RunVectors]) -> Comparison:
    layers = sorted(set.intersection(*(set(run.vectors) for run in runs)))
    if not layers:
        raise RunError("The behaviours share no layer: "
                       + "; ".join(f"{run.behaviour}: {run.layers}" for run in runs) + ".")
    pairs = [(i, j) for i in range(len(runs)) for j in range(i + 1, len(runs))]
    matrix = torch.tensor(
        [[cosine(runs[i].vectors[layer], runs[j].vectors[layer]) for layer in layers] for i, j in pairs],
        dtype=torch.float64,
    )  # [n_pairs, n_layers]
    labels = [f"{runs[i].behaviour} vs {runs[j].behaviour}" for i, j in pairs]
    return Comparison("behaviours", "Cosine similarity between behaviours at each layer", labels,
                      [str(layer) for layer in layers], matrix, "behaviour pair", "layer",
                      [str(run.directory) for run in runs])


def plot_heatmap(comparison: Comparison, path: Path) -> Path:
    """Draw ``comparison.matrix`` as a heatmap on a fixed -1..1 colour scale and write a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_columns = comparison.matrix.shape
    width = min(max(6.0, 0.45 * n_columns + 3.5), 22.0)
    height = min(max(3.5, 0.4 * n_rows + 2.0), 22.0)
    figure, axes = plt.subplots(figsize=(width, height))
    image = axes.imshow(comparison.matrix.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label("cosine similarity")
    axes.set_xticks(range(n_columns), comparison.column_labels, fontsize=8, rotation=90 if n_columns > 12 else 0)
    axes.set_yticks(range(n_rows), comparison.row_labels, fontsize=8)
    axes.set_xlabel(comparison.column_axis)
    axes.set_ylabel(comparison.row_axis)
    axes.set_title(comparison.title)
    if n_rows * n_columns <= 200:
        for row in range(n_rows):
            for column in range(n_columns):
                value = float(comparison.matrix[row, column])
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if abs(value) > 0.6 else "black")
    figure.tight_layout()
    try:
        return storage.atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    finally:
        plt.close(figure)
