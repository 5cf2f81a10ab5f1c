"""Turn benchmarks/results.json into docs/benchmarks.md: tables of medians (min-max) and the targets."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COSINE_MIN = 0.9999
LOCAL = "ndif-vectors local"
FLOAT32_BYTES = 4


def _rate(record: dict) -> float:
    return record["items"] / record["seconds"]


def _per_round_ratio(records: dict, name: str, baseline: str) -> list[float]:
    """Ratio of ``name``'s items/s to ``baseline``'s, one value per round (same round, side by side)."""
    return [_rate(a) / _rate(b) for a, b in zip(records[name], records[baseline])]


def _median_range(values: list[float], digits: int = 3) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.{digits}g} ({min(values):.{digits}g}-{max(values):.{digits}g})"


def _speed_rows(results: dict) -> list[str]:
    rows = ["| layers | contender | items/s, median (min-max) | ratio to the limit | min cosine vs local |",
            "| --- | --- | --- | --- | --- |"]
    for spec, records in results["records"].items():
        for name, runs in records.items():
            if not runs:
                continue
            rates = [_rate(run) for run in runs]
            ratio = _median_range(_per_round_ratio(records, name, "limit")) if "limit" in records else "n/a"
            cosines = [run["min_cosine"] for run in runs if "min_cosine" in run]
            cosine = f"{min(cosines):.6f}" if cosines else "n/a (no vector)"
            rows.append(f"| {spec} | {name} | {_median_range(rates)} | {ratio} | {cosine} |")
    return rows


def _result_bytes(run: dict) -> int:
    # Results travel zstd-compressed; the decompressed size is what the slice-size target is
    # about. Runs recorded before result_bytes existed only have the wire size.
    return run.get("result_bytes") or run["bytes_downloaded"]


def _remote_rows(results: dict) -> list[str]:
    d_model = results["d_model"]
    rows = ["| layers | contender | requests | wire bytes/item | result bytes/item | theoretical bytes/item | "
            "result bytes/request | theoretical bytes/request (reduce server) | result/theoretical |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for spec, records in results["records"].items():
        n_layers = len(results["layer_sets"][spec])
        for name, runs in records.items():
            if not name.startswith("remote") or not runs:
                continue
            run = runs[-1]  # bytes do not vary between rounds
            wire_per_item = run["bytes_downloaded"] / run["items"]
            result = _result_bytes(run)
            per_item = result / run["items"]
            per_request = result / run["requests"]
            if "reduce=server" in name:
                theory = n_layers * d_model * FLOAT32_BYTES
                rows.append(f"| {spec} | {name} | {run['requests']} | {wire_per_item:.0f} | {per_item:.0f} | - | "
                            f"{per_request:.0f} | {theory} | {per_request / theory:.3f} |")
            else:
                theory = 2 * n_layers * d_model * FLOAT32_BYTES
                rows.append(f"| {spec} | {name} | {run['requests']} | {wire_per_item:.0f} | {per_item:.0f} | "
                            f"{theory} | {per_request:.0f} | - | {per_item / theory:.3f} |")
    return rows


def _targets(results: dict) -> list[str]:
    lines = ["| target | measured (median of per-round ratios) | met |", "| --- | --- | --- |"]

    def add(label: str, values: list[float] | None, threshold: float, higher_is_better: bool = True) -> None:
        if not values:
            lines.append(f"| {label} | not measured | - |")
            return
        median = statistics.median(values)
        met = median >= threshold if higher_is_better else median <= threshold
        lines.append(f"| {label} | {_median_range(values)} | {'yes' if met else 'NO'} |")

    for spec, records in results["records"].items():
        if LOCAL not in records:
            continue
        if records.get("limit"):
            add(f"local >= 0.9x limit, layers {spec}", _per_round_ratio(records, LOCAL, "limit"), 0.9)
        if records.get("caa-method"):
            threshold = 1.5 if spec == "all" else 3.0
            add(f"local >= {threshold}x CAA method, layers {spec}",
                _per_round_ratio(records, LOCAL, "caa-method"), threshold)
        if records.get("steering-vectors"):
            add(f"local >= 1.0x steering-vectors, layers {spec}",
                _per_round_ratio(records, LOCAL, "steering-vectors"), 1.0)
        if records.get("remote bpr=8"):
            add(f"remote bpr=8 >= 0.8x local, layers {spec}", _per_round_ratio(records, "remote bpr=8", LOCAL), 0.8)

    cosines = [run["min_cosine"] for records in results["records"].values() for runs in records.values()
               for run in runs if "min_cosine" in run]
    if cosines:
        lines.append(f"| every vector's cosine vs local >= {COSINE_MIN} | min {min(cosines):.6f} | "
                     f"{'yes' if min(cosines) >= COSINE_MIN else 'NO'} |")

    rss = results.get("rss") or []
    if len(rss) >= 2:
        small, large = rss[0], rss[-1]
        growth = large["peak_rss_mib"] / small["peak_rss_mib"]
        lines.append(f"| peak RSS at {large['items']} items within 10% of {small['items']} | "
                     f"{growth:.3f}x | {'yes' if growth <= 1.10 else 'NO'} |")

    d_model = results["d_model"]
    for spec, records in results["records"].items():
        n_layers = len(results["layer_sets"][spec])
        for name, runs in records.items():
            if not name.startswith("remote") or not runs:
                continue
            run = runs[-1]
            if "reduce=server" in name:
                ratio = _result_bytes(run) / run["requests"] / (n_layers * d_model * FLOAT32_BYTES)
            else:
                ratio = _result_bytes(run) / run["items"] / (2 * n_layers * d_model * FLOAT32_BYTES)
            met = abs(ratio - 1) <= 0.05
            lines.append(f"| {name} bytes within 5% of theory, layers {spec} | {ratio:.3f}x | "
                         f"{'yes' if met else 'NO'} |")
    return lines


def write_report(results: dict, out: Path, findings: Path) -> None:
    machine, args = results["machine"], results["args"]
    dataset = Path(args["dataset"])
    lines = [
        "# Benchmarks",
        "",
        "Throughput of ndif-vectors against a bare forward pass (the limit), the CAA script's method, and",
        "the `steering-vectors` library, on the same items, measured by `benchmarks/run.py`. Every contender",
        "reads the chat-format prompts at index -2 in float32 on the CPU; model loading is excluded from",
        "every timing. ndif-vectors sorts the items longest first before cutting batches, and the limit runs",
        "those same batches; steering-vectors gets the pairs in dataset order, as its API takes them, and",
        "the CAA method runs one prompt at a time. The contenders run back to back and in a rotated order in",
        "each round. The idle NDIF server of the remote rows shares the CPU, so absolute items/s move between",
        "rounds; the ratios, measured side by side within a round, are the figures to compare.",
        "",
        "## Command",
        "",
        "```bash",
        *([] if results["command"] == "make bench" else ["set -a; source .ndif-stack/stack.env; set +a"]),
        results["command"],
        "```",
        *(["",
           "`make bench` installs steering-vectors, starts the local NDIF stack unless it is up, runs",
           "`benchmarks/run.py` inside the stack's network namespace and stops the stack it started."]
          if results["command"] == "make bench" else []),
        "",
        f"Items: the first {args['items']} of CAA's `{dataset.parent.name}/{dataset.name}`; "
        f"batch size {args['batch_size']} items "
        f"({2 * int(args['batch_size'])} prompts); {args['rounds']} rounds; CAA method on "
        f"{args['caa_items'] if args['caa_items'] != 'None' else args['items']} items (its rate is per item, "
        "so it compares directly). Total wall time "
        f"{results['total_seconds'] / 60:.1f} min.",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
        f"{machine['ram_gib']} GiB RAM; load average at start {', '.join(f'{v:.1f}' for v in machine['load_average_at_start'])}",
        "- " + ", ".join(f"{name} {version}" for name, version in results["versions"].items()),
        "",
        "## Speed and agreement",
        "",
        "The ratio column is the median of per-round ratios to the limit. Cosine is the smallest per-layer",
        "cosine similarity to the ndif-vectors local vectors of the same round, over all rounds.",
        "",
        *_speed_rows(results),
        "",
        "## Remote traffic",
        "",
    ]
    if results.get("remote_unavailable"):
        lines += [f"Not measured: {results['remote_unavailable']}.", ""]
    else:
        lines += [
            "Theoretical sizes: `2 x layers x d_model x 4` bytes per item for the returned float32 slices,",
            f"and `layers x d_model x 4` per request with `reduce=server` (d_model {results['d_model']}).",
            "",
            *_remote_rows(results),
            "",
        ]
    rates = results.get("batch_rates") or []
    if rates:
        lines += ["## Forward-pass rate by batch size", "",
                  f"The bare transformers forward pass on the same {rates[0]['tokens']} real tokens: items "
                  f"{int(args['batch_size']) + 1} to {int(args['batch_size']) + int(args['rate_items'])} in longest-first order.",
                  "Only unpadded tokens count, and each figure is the best of two passes after a warm-up.", "",
                  "| case | tokens/s | relative to the CAA method |", "| --- | --- | --- |"]
        caa_rate = rates[-1]["tokens_per_second"]
        for entry in rates:
            lines.append(f"| {entry['case']} | {entry['tokens_per_second']:.0f} | "
                         f"{entry['tokens_per_second'] / caa_rate:.2f}x |")
        lines.append("")
    rss = results.get("rss") or []
    lines += ["## Peak RSS of ndif-vectors local", ""]
    if rss:
        lines += ["Each row is one fresh process that loads the model and runs once. Peak RSS is the",
                  "process's own high-water mark (`VmHWM`); the RSS between requests is sampled after each one.", "",
                  "| items | layers | peak RSS (MiB) | peak after model load (MiB) | largest RSS between requests (MiB) "
                  "| RSS after the last request (MiB) | run seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for entry in rss:
            lines.append(f"| {entry['items']} | {entry.get('layers', args['rss_layers'])} | "
                         f"{entry['peak_rss_mib']:.0f} | {entry['after_load_mib']:.0f} | "
                         f"{entry['max_rss_between_requests_mib']:.0f} | {entry['last_rss_between_requests_mib']:.0f} | "
                         f"{entry['seconds']:.1f} |")
        lines.append("")
    else:
        lines += ["Not measured in this run.", ""]
    lines += ["## Targets", "", *_targets(results), ""]
    if findings.is_file():
        lines += [findings.read_text().rstrip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    # Rewrite the report from a saved results file: python benchmarks/report.py [results.json]
    here = Path(__file__).resolve().parent
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "results.json"
    write_report(json.loads(source.read_text()), here.parent / "docs" / "benchmarks.md", here / "findings.md")
