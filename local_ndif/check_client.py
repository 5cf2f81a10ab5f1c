"""Check the local NDIF stack from the client side with a remote nnsight trace.

Run with the client venv, inside the stack's namespace, after loading stack.env:

    set -a; source .ndif-stack/stack.env; set +a
    ip netns exec ndifvec .venv/bin/python local_ndif/check_client.py

For every ``NDIF_MODEL_KEY_*`` variable it checks that nnsight builds exactly that
model key for the model directory, runs a trace that saves
``<decoder layers>[0].output[:, -2, :]`` on the server at ``NDIF_HOST``, runs the
same trace locally, and prints the max absolute difference. It exits 1 if a key
differs, a trace fails, or a difference exceeds ``--tolerance``.

``--remote-only`` skips the local run, and ``--wait SECONDS`` retries a failing
remote trace until that many seconds have passed: up.sh uses both to wait until
each deployed model can serve requests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROMPTS = ["The Eiffel Tower is in the city of", "Hello world"]
TASK = "text-generation"
# Module paths of the decoder blocks, per architecture family (Llama-style, GPT-2).
LAYER_PATHS = ("model.layers", "transformer.h")


def deployed_models() -> dict[str, str]:
    """Return {model directory: model key} from the NDIF_MODEL_KEY_* variables."""
    models = {}
    for name, key in sorted(os.environ.items()):
        if not name.startswith("NDIF_MODEL_KEY_"):
            continue
        _, _, identity = key.partition(":")
        models[json.loads(identity)["repo_id"]] = key
    return models


def first_layer(model):
    """Return the envoy of decoder block 0, trying each of LAYER_PATHS."""
    for path in LAYER_PATHS:
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return node[0]
    raise SystemExit(f"none of the layer paths {LAYER_PATHS} exists in {type(model._module).__name__}")


def trace_first_layer(model, remote: bool):
    with model.trace(PROMPTS, remote=remote):
        hidden = first_layer(model).output[:, -2, :].save()
    return hidden


def remote_trace_with_retry(model, wait_s: float):
    """Run the remote trace, retrying every 2 s until ``wait_s`` seconds have passed."""
    from nnsight.intervention.backends.remote import RemoteError

    deadline = time.monotonic() + wait_s
    while True:
        started = time.monotonic()
        try:
            hidden = trace_first_layer(model, remote=True)
            return hidden, time.monotonic() - started
        except (RemoteError, ConnectionError, OSError) as error:
            if time.monotonic() >= deadline:
                raise
            print(f"  remote trace failed ({type(error).__name__}: {str(error)[:200]}); retrying", flush=True)
            time.sleep(2)


def check_model(model_dir: str, expected_key: str, args) -> bool:
    import nnsight.modeling.huggingface as nnsight_hf
    from nnsight.modeling.transformers import TransformersModel

    # to_model_key() resolves the repo id with a Hub lookup, which fails offline.
    # A local directory is its own id, so the cache is seeded with it.
    nnsight_hf._ID_CACHE[model_dir] = model_dir
    # The task must be given, because transformers cannot infer one from a directory path.
    model = TransformersModel(model_dir, task=TASK)
    key = model.to_model_key()
    print(f"{os.path.basename(model_dir)}\n  key: {key}")
    if key != expected_key:
        print(f"  FAILED: the deployed key differs:\n  deployed: {expected_key}")
        return False

    remote, seconds = remote_trace_with_retry(model, args.wait)
    print(f"  remote trace: shape {tuple(remote.shape)}, {remote.dtype}, {seconds:.3f}s")
    if args.remote_only:
        return True

    local_model = TransformersModel(model_dir, task=TASK, dispatch=True)
    local = trace_first_layer(local_model, remote=False)
    difference = (remote - local).abs().max().item()
    within = difference <= args.tolerance
    print(f"  max |remote - local| = {difference:.3e} ({'ok' if within else 'FAILED'}, tolerance {args.tolerance:g})")
    return within


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--remote-only", action="store_true", help="skip the local trace and the comparison")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to keep retrying a failing remote trace")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |remote - local| (default 1e-4)")
    args = parser.parse_args()

    host = os.environ.get("NDIF_HOST")
    models = deployed_models()
    if not host or not models:
        print("NDIF_HOST or NDIF_MODEL_KEY_* is not set. Load stack.env first (see --help).", file=sys.stderr)
        return 2

    import nnsight

    # nnsight also reads NDIF_HOST itself. Setting it here makes the target explicit.
    nnsight.CONFIG.API.HOST = host
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    print(f"NDIF host {host}, nnsight {nnsight.__version__}")

    results = [check_model(model_dir, key, args) for model_dir, key in models.items()]
    print(f"{sum(results)} of {len(results)} models passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
