"""Benchmark ndif-vectors against a bare forward pass, the CAA method and steering-vectors.

One command runs every contender on the same items, back to back, alternating their order
over several rounds, and writes medians (min-max) to docs/benchmarks.md. The CPU may be
shared with other work, so the figures that count are ratios measured side by side.

    ip netns exec ndifvec .venv/bin/python benchmarks/run.py --rounds 3 --items 128

The remote rows need the NDIF stack's network namespace. Outside it, or when the stack is
down, the report records them as not measured and gives the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contenders  # noqa: E402

from ndif_vectors import RunConfig, datasets, generate_vectors, models, prompts  # noqa: E402
from ndif_vectors.extraction import longest_first, make_batch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = ROOT.parent / "shared" / "data" / "caa" / "sycophancy" / "generate_dataset.json"
DEFAULT_MODEL_DIR = ROOT / ".ndif-stack" / "models" / "smollm2-135m-instruct"
STACK_ENV = ROOT / ".ndif-stack" / "stack.env"
NETNS = "ndifvec"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every contender once per layer set")
    parser.add_argument("--items", type=int, default=128, help="first N dataset items (2N prompts)")
    parser.add_argument("--caa-items", type=int, default=None,
                        help="items for the batch-size-1 CAA contender (default: --items); its rate is per item, so it scales")
    parser.add_argument("--batch-size", type=int, default=16, help="items per forward pass where batching applies")
    parser.add_argument("--layer-sets", default="all;0-9", help="semicolon-separated layer selections")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--rss-items", default="100,1000", help="item counts for the peak-RSS runs; empty to skip")
    parser.add_argument("--rss-layers", default="all", help="layer selection for the peak-RSS runs")
    parser.add_argument("--rate-items", type=int, default=16,
                        help="items (longest first) for the tokens/s-by-batch-size table; 0 to skip")
    parser.add_argument("--skip", default="", help="comma-separated contender names to leave out")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- environment

def machine_description() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu_model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    return {"cpu": cpu_model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(mem_kib / 2**20, 1), "load_average_at_start": os.getloadavg()}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("ndif-vectors", "nnsight", "torch", "transformers", "steering-vectors"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def remote_unavailable_reason() -> str | None:
    """Return why the remote rows cannot run, or None when the stack is up and this process can reach it."""
    if not STACK_ENV.is_file():
        return f"{STACK_ENV} is missing, so the local NDIF stack is not installed"
    pids = subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True, text=True)
    if pids.returncode != 0 or not pids.stdout.strip():
        return f"no process runs in the network namespace {NETNS}, so the stack is down"
    try:
        inside = os.stat("/proc/self/ns/net").st_ino == os.stat(Path("/run/netns") / NETNS).st_ino
    except OSError as error:
        return f"could not compare network namespaces ({error})"
    if not inside:
        return f"this process is not inside the namespace {NETNS}; run it with `ip netns exec {NETNS}`"
    return None


def load_stack_env() -> None:
    """Export the stack's settings (NDIF_HOST and friends) unless already set."""
    for line in STACK_ENV.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        os.environ.setdefault(name, shlex.split(value)[0] if value else "")


# ---------------------------------------------------------------- set-up

def build_setup(args, with_remote: bool) -> contenders.Setup:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    hf_model.requires_grad_(False)
    nnsight_model = models.load_model(str(args.model_dir), dtype="float32")

    items = datasets.load_dataset(args.dataset)[: args.items]
    pairs = prompts.encode_items(items, tokenizer, prompts.PromptFormat.CHAT, read_index=contenders.READ_INDEX)
    texts = [
        (prompts.render_prompt(item.question, item.positive, prompts.PromptFormat.CHAT, tokenizer),
         prompts.render_prompt(item.question, item.negative, prompts.PromptFormat.CHAT, tokenizer))
        for item in items
    ]
    # steering-vectors tokenizes the strings itself: its ids must be the ones every other
    # contender uses, with no extra BOS token.
    for pair, (positive, negative) in zip(pairs, texts):
        if tokenizer(positive)["input_ids"] != pair.positive or tokenizer(negative)["input_ids"] != pair.negative:
            raise SystemExit(f"Item {pair.index}: the prompt strings tokenize differently from encode_items, "
                             "so steering-vectors would read other tokens. Check the tokenizer's BOS settings.")

    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    setup = contenders.Setup(args.model_dir, args.dataset, len(items), args.batch_size, hf_model, tokenizer,
                             nnsight_model, pairs, texts, pad_token_id)
    if with_remote:
        from ndif_vectors import remote

        remote_dir = str(Path(os.environ["NDIF_TEST_MODELS_DIR"]) / "smollm2-135m-instruct")
        setup.remote_model, setup.remote_model_dir = remote.load_remote_model(remote_dir)
    return setup


def contender_table(remote_reason: str | None) -> list[tuple[str, object]]:
    table = [
        ("limit", contenders.run_limit),
        ("caa-method", contenders.run_caa_method),
        ("steering-vectors", contenders.run_steering_vectors),
        ("ndif-vectors local", contenders.run_ndif_vectors_local),
    ]
    if remote_reason is None:
        table += [
            ("remote bpr=1", contenders.make_remote_contender(1, "client")),
            ("remote bpr=8", contenders.make_remote_contender(8, "client")),
            ("remote bpr=8 reduce=server", contenders.make_remote_contender(8, "server")),
        ]
    return table


# ---------------------------------------------------------------- measuring

def min_cosine(vectors: torch.Tensor, reference: torch.Tensor) -> float:
    """Return the smallest per-layer cosine similarity of two ``[n_layers, d_model]`` stacks."""
    cosine = torch.nn.functional.cosine_similarity(vectors.double(), reference.double(), dim=1)
    return float(cosine.min())


def run_rounds(args, setup, table, caa_setup) -> dict:
    d_model = setup.hf_model.config.hidden_size
    layer_sets = {spec: models.parse_layers(spec, setup.hf_model.config.num_hidden_layers)
                  for spec in args.layer_sets.split(";")}
    records = {spec: {name: [] for name, _ in table} for spec in layer_sets}
    for round_index in range(args.rounds):
        # Rotate the order each round so that no contender always runs first or last
        # while the shared CPU's load drifts.
        shift = round_index % len(table)
        order = table[shift:] + table[:shift]
        for spec, layers in layer_sets.items():
            round_outcomes = {}
            for name, function in order:
                run_setup = caa_setup if name == "caa-method" else setup
                started = time.perf_counter()
                outcome = function(run_setup, layers)
                seconds = time.perf_counter() - started
                round_outcomes[name] = outcome
                print(f"round {round_index + 1} layers {spec:>4} {name:<28} {seconds:8.2f} s "
                      f"{outcome.items / seconds:7.3f} items/s", flush=True)
                records[spec][name].append({"seconds": seconds, "items": outcome.items,
                                            "requests": outcome.requests,
                                            "bytes_downloaded": outcome.bytes_downloaded,
                                            "result_bytes": outcome.result_bytes})
            reference = round_outcomes["ndif-vectors local"].vectors
            for name, outcome in round_outcomes.items():
                if outcome.vectors is None:
                    continue
                compare_to = reference
                if name == "caa-method" and caa_setup.items != setup.items:
                    compare_to = None  # computed on fewer items; checked below against its own local run
                if compare_to is not None:
                    records[spec][name][-1]["min_cosine"] = min_cosine(outcome.vectors, compare_to)
            if caa_setup.items != setup.items and "caa-method" in round_outcomes:
                local_small = contenders.run_ndif_vectors_local(caa_setup, layers)
                records[spec]["caa-method"][-1]["min_cosine"] = min_cosine(
                    round_outcomes["caa-method"].vectors, local_small.vectors)
    return {"layer_sets": {spec: layers for spec, layers in layer_sets.items()}, "d_model": d_model,
            "records": records}


def _status_mib(field: str) -> float:
    """Read a memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # the file gives kB
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_batch_rates(args, setup) -> list[dict]:
    """Measure tokens/s of the bare transformers forward pass by batch size, on the same prompts.

    Rows: the decoder blocks alone (no final norm, no LM head) at several batch sizes,
    and the whole model at batch size 1 as the CAA method runs it. Each figure is the
    best of two passes after one warm-up pass, counting only real (unpadded) tokens.
    """
    if args.rate_items <= 0:
        return []
    pairs = longest_first(setup.pairs)[args.batch_size: args.batch_size + args.rate_items]
    rows = [pair.positive for pair in pairs] + [pair.negative for pair in pairs]
    tokens = sum(len(row) for row in rows)
    hf_model = setup.hf_model

    def blocks_at(items_per_batch: int):
        def run() -> None:
            for start in range(0, len(pairs), items_per_batch):
                batch = make_batch(pairs[start: start + items_per_batch], setup.pad_token_id)
                hf_model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids, use_cache=False)
        return run

    def whole_model_one_prompt_at_a_time() -> None:
        for row in rows:
            hf_model(torch.tensor([row]))

    cases = [(f"decoder blocks, {size} item{'s' if size > 1 else ''} ({2 * size} prompts) per batch", blocks_at(size))
             for size in sorted({1, 4, 8, args.batch_size})]
    cases.append(("whole model with LM head, 1 prompt per pass (the CAA method)", whole_model_one_prompt_at_a_time))
    results = []
    with torch.no_grad():
        for name, run in cases:
            run()
            best = float("inf")
            for _ in range(2):
                started = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - started)
            results.append({"case": name, "tokens": tokens, "seconds": best, "tokens_per_second": tokens / best})
            print(f"{name}: {tokens / best:.0f} tokens/s", flush=True)
    return results


def rss_child(args) -> None:
    """Run ndif-vectors local once in this fresh process and print its peak RSS as JSON.

    The peak is ``VmHWM``, this process's own high-water mark. ``ru_maxrss`` would not do:
    Linux keeps the parent's RSS at fork as the child's peak across exec, and a child of the
    benchmark process reported 3659 MiB after loading a model that takes 438 MiB alone.
    """
    model = models.load_model(str(args.model_dir), dtype="float32")
    after_load = _status_mib("VmHWM")
    rss_after_request = []

    def record(done: int, total: int, status: str) -> None:
        rss_after_request.append(_status_mib("VmRSS"))

    with tempfile.TemporaryDirectory(prefix="ndif-vectors-rss-") as out_dir:
        started = time.perf_counter()
        generate_vectors(RunConfig(model=str(args.model_dir), dataset=args.dataset, limit=args.rss_child,
                                   layers=args.rss_layers, batch_size=args.batch_size, out_dir=Path(out_dir),
                                   prompt_format="chat"), model=model, progress=record)
        seconds = time.perf_counter() - started
    print(json.dumps({"items": args.rss_child, "peak_rss_mib": _status_mib("VmHWM"), "after_load_mib": after_load,
                      "max_rss_between_requests_mib": max(rss_after_request),
                      "last_rss_between_requests_mib": rss_after_request[-1], "seconds": seconds}))


def measure_rss(args) -> list[dict]:
    results = []
    for count in [int(value) for value in args.rss_items.split(",") if value.strip()]:
        command = [sys.executable, __file__, "--rss-child", str(count), "--rss-layers", args.rss_layers,
                   "--batch-size", str(args.batch_size), "--dataset", str(args.dataset),
                   "--model-dir", str(args.model_dir)]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(f"peak RSS at {count} items: {results[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rss_child is not None:
        rss_child(args)
        return

    started = time.perf_counter()
    remote_reason = remote_unavailable_reason()
    if remote_reason is None:
        load_stack_env()
    setup = build_setup(args, with_remote=remote_reason is None)
    caa_setup = setup
    if args.caa_items is not None and args.caa_items < args.items:
        # A smaller set for the slow batch-size-1 contender. Its vectors are checked against
        # an extra ndif-vectors local run on the same items.
        caa_setup = contenders.Setup(setup.model_dir, setup.dataset, args.caa_items, args.batch_size,
                                     setup.hf_model, setup.tokenizer, setup.nnsight_model,
                                     setup.pairs[: args.caa_items], setup.texts[: args.caa_items],
                                     setup.pad_token_id)
    skipped = {name.strip() for name in args.skip.split(",") if name.strip()}
    table = [entry for entry in contender_table(remote_reason) if entry[0] not in skipped]
    measured = run_rounds(args, setup, table, caa_setup)
    batch_rates = measure_batch_rates(args, setup)
    rss = measure_rss(args)

    arguments = argv if argv is not None else sys.argv[1:]
    # With no arguments this is the run that `make bench` makes (through benchmarks/run.sh).
    command = "make bench" if not arguments else "ip netns exec ndifvec .venv/bin/python benchmarks/run.py " + " ".join(
        shlex.quote(arg) for arg in arguments)
    results = {
        "command": command, "machine": machine_description(), "versions": versions(),
        "args": {key: str(value) for key, value in vars(args).items()},
        "remote_unavailable": remote_reason, "rss": rss, "batch_rates": batch_rates, **measured,
        "total_seconds": time.perf_counter() - started,
    }
    # The default report keeps results.json; a run written elsewhere gets its own file.
    suffix = "" if args.out.stem == "benchmarks" else f"-{args.out.stem}"
    results_path = Path(__file__).resolve().parent / f"results{suffix}.json"
    results_path.write_text(json.dumps(results, indent=1))

    from report import write_report

    write_report(results, args.out, Path(__file__).resolve().parent / "findings.md")
    print(f"Wrote {args.out} and {results_path}")


if __name__ == "__main__":
    main()
