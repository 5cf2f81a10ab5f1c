"""Remote execution on NDIF: configuration, preflight checks, retries and byte accounting.

The traces are the same as for a local run (``extraction.trace_batches``); only the
backend differs. The client builds a meta-device model (config and tokenizer, no
weights) and ships each request, one or more batches in one nnsight session, to the
NDIF host. Only the saved slices, or with ``--reduce server`` the per-layer sums, come
back.

Configuration comes from options, then the environment, then a ``.env`` file in the
working directory: ``NDIF_API_KEY`` and ``NDIF_HOST``. The API key is sent in a request
header and is never logged, printed or written to a file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from . import models

logger = logging.getLogger(__name__)

PUBLIC_HOST = "https://api.ndif.us"
"""nnsight 0.8.1's default host, the public NDIF service, which needs an API key."""

VERSION_CHECKED_PACKAGES = ("nnsight", "transformers", "torch")
"""Packages whose versions must agree between client and server: nnsight's request
format and the model code that runs the trace both depend on them."""

MAX_ATTEMPTS = 5
BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
POLL_SECONDS = 1.0
"""Interval between status polls of a submitted job."""
STATUS_TIMEOUT = httpx.Timeout(10.0, read=30.0)


class RemoteRunError(RuntimeError):
    """A remote run that cannot go on: bad configuration, a failed preflight or a permanent error."""


@dataclass
class RemoteSettings:
    """Host URL and API key for NDIF requests; ``repr`` hides the key."""

    host: str
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, host: str | None = None, api_key: str | None = None) -> "RemoteSettings":
        """Combine options, the environment and ``./.env``; options win, then the environment."""
        from dotenv import dotenv_values

        dotenv = dotenv_values(".env") if os.path.isfile(".env") else {}
        host = host or os.environ.get("NDIF_HOST") or dotenv.get("NDIF_HOST") or PUBLIC_HOST
        api_key = api_key or os.environ.get("NDIF_API_KEY") or dotenv.get("NDIF_API_KEY") or None
        host = host.rstrip("/")
        if not host.startswith(("http://", "https://")):
            raise RemoteRunError(
                f"Invalid NDIF host {host!r}: it must start with http:// or https://, "
                "for example http://127.0.0.1:8001."
            )
        return cls(host=host, api_key=api_key)

    def headers(self) -> dict[str, str]:
        return {"ndif-api-key": self.api_key} if self.api_key else {}


PREFLIGHT_ATTEMPTS = 4


def _get_json(settings: RemoteSettings, path: str) -> dict:
    """GET ``path`` on the host, retrying connection errors and HTTP 5xx a few times.

    Raises ``RemoteRunError`` when the host cannot be reached or rejects the request.
    """
    url = f"{settings.host}{path}"
    for attempt in range(1, PREFLIGHT_ATTEMPTS + 1):
        try:
            response = httpx.get(url, headers=settings.headers(), timeout=STATUS_TIMEOUT)
        except httpx.HTTPError as error:
            if attempt == PREFLIGHT_ATTEMPTS:
                raise RemoteRunError(
                    f"Could not reach the NDIF host {settings.host} ({type(error).__name__}: {error}). "
                    "Check NDIF_HOST or --host, and that the server is running."
                ) from None
            retry_reason = f"{type(error).__name__}: {error}"
        else:
            if response.status_code < 500 or attempt == PREFLIGHT_ATTEMPTS:
                break
            retry_reason = f"HTTP {response.status_code}"
        delay = BACKOFF_SECONDS * 2 ** (attempt - 1)
        logger.warning("GET %s failed (attempt %d of %d): %s; retrying in %.0f s",
                       url, attempt, PREFLIGHT_ATTEMPTS, retry_reason, delay)
        time.sleep(delay)
    if response.status_code in (401, 403):
        raise RemoteRunError(
            f"The NDIF host {settings.host} rejected the API key (HTTP {response.status_code}). "
            "Set a valid key in NDIF_API_KEY."
        )
    if response.status_code >= 400:
        raise RemoteRunError(
            f"The NDIF host {settings.host} returned HTTP {response.status_code} for {path}: "
            f"{response.text[:200]}"
        )
    return response.json()


def _base_version(version: str) -> str:
    """Drop a local build label: ``2.13.0+cpu`` and ``2.13.0`` run the same code."""
    return version.split("+", 1)[0]


def check_versions(remote_env: dict) -> list[str]:
    """Return one line per package whose client and server versions differ."""
    from importlib import metadata

    remote_packages = remote_env.get("packages", {})
    problems = []
    for package in VERSION_CHECKED_PACKAGES:
        server = remote_packages.get(package)
        if server is None:
            continue
        client = metadata.version(package)
        if _base_version(client) != _base_version(server):
            problems.append(f"{package}: client {client}, server {server} (pip install {package}=={_base_version(server)})")
    return problems


def _deployment_key(name: str, entry: dict) -> str:
    # ndif 0.1.2 names each deployment "<id>:ModelActor:<model key>" and may omit a
    # model_key field; the public service may send the field.
    if entry.get("model_key"):
        return entry["model_key"]
    marker = "nnsight."
    return name[name.find(marker):] if marker in name else name


def _repo_id(model_key: str) -> str:
    try:
        return json.loads(model_key.split(":", 1)[1])["repo_id"]
    except (IndexError, ValueError, KeyError, TypeError):
        return model_key


def find_deployment(status: dict, model_key: str) -> dict | None:
    """Return the ``/status`` entry whose model key is ``model_key``, preferring a running one."""
    matches = [
        entry for name, entry in status.get("deployments", {}).items()
        if _deployment_key(name, entry) == model_key
    ]
    matches.sort(key=lambda entry: entry.get("application_state") != "RUNNING")
    return matches[0] if matches else None


def served_models(status: dict) -> list[str]:
    """Return the repo ids of every deployment in a ``/status`` response."""
    return sorted({
        entry.get("repo_id") or _repo_id(_deployment_key(name, entry))
        for name, entry in status.get("deployments", {}).items()
    })


def preflight(settings: RemoteSettings, model_key: str, repo_id: str) -> None:
    """Check key, host, model and versions before any job is submitted."""
    if settings.host == PUBLIC_HOST and not settings.api_key:
        raise RemoteRunError(
            f"The NDIF service at {PUBLIC_HOST} needs an API key. Create one at https://login.ndif.us "
            "and set NDIF_API_KEY in the environment or in a .env file."
        )

    status = _get_json(settings, "/status")
    deployment = find_deployment(status, model_key)
    if deployment is None:
        served = served_models(status)
        raise RemoteRunError(
            f"Model {repo_id!r} is not served by {settings.host}. Models served there: "
            f"{', '.join(served) or 'none'}. Choose one of them with --model."
        )
    state = deployment.get("application_state")
    if state not in (None, "RUNNING"):
        logger.warning("Model %s is deployed on %s but its state is %s; requests may queue.", repo_id, settings.host, state)

    remote_env = _get_json(settings, "/env")
    problems = check_versions(remote_env)
    if problems:
        raise RemoteRunError(
            f"Client and NDIF server package versions differ, which the server rejects or which "
            f"changes results: {'; '.join(problems)}."
        )
    client_python = ".".join(map(str, __import__("sys").version_info[:2]))
    server_python = remote_env.get("python_version", "").split(" ")[0]
    if server_python and not server_python.startswith(client_python):
        # nnsight ships the trace as source, not bytecode, so Python versions may differ.
        logger.info("Client Python %s, server Python %s: allowed, traces travel as source.", client_python, server_python)


def _make_backend_class():
    """Build the nnsight ``RemoteBackend`` subclass lazily, so importing this module stays cheap."""
    from nnsight.intervention.backends.remote import RemoteBackend

    class CountingBackend(RemoteBackend):
        """nnsight's blocking remote backend plus byte counting and status callbacks."""

        def __init__(self, *args, on_status: Callable[[str], None] | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            # The run shows its own progress bar and logs sizes at debug level, so nnsight's
            # status spinner and its "[remote]" prints would only garble the output.
            self.display.enabled = False
            self.verbose = False
            self.on_status = on_status
            self.bytes_downloaded = 0
            self.result_bytes = 0

        def note(self, response):
            if self.on_status is not None and response.status.name != "LOG":
                # COMPLETED is followed by the result download, which is what the user waits on.
                completed = response.status.name == "COMPLETED"
                self.on_status("downloading" if completed else response.status.name.lower())
            if response.id:
                self.job_id = response.id
            return super().note(response)

        def finalize(self, content: bytes):
            # Requests and results travel zstd-compressed (nnsight's default, and the NDIF
            # API rejects large uncompressed request bodies). The wire size is what the
            # network carries; the decompressed size is the saved tensors plus framing.
            self.bytes_downloaded += len(content)
            result_bytes = len(content)
            if self.compress:
                import zstandard

                result_bytes = len(zstandard.ZstdDecompressor().decompress(content))
            self.result_bytes += result_bytes
            logger.debug("Job %s: downloaded %d bytes (%d decompressed)", self.job_id, len(content), result_bytes)
            return super().finalize(content)

    return CountingBackend


_TRANSIENT_TEXT = (
    "502", "503", "504", "500 internal", "timed out", "timeout", "connection refused",
    "connection reset", "connection aborted", "remote end closed", "temporarily unavailable",
    "server disconnected", "all connection attempts failed", "connecterror", "readerror",
)


def is_transient(error: BaseException) -> bool:
    """Return whether ``error`` may go away on retry (network, timeouts, 5xx, a dropped job)."""
    import websocket
    from nnsight.intervention.backends.remote import RemoteError

    if isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError,
                          websocket.WebSocketException)):
        return True
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500
    if type(error).__name__ == "ValidationError":
        # pydantic could not parse a status message: a server that is shutting down or
        # restarting answers with an empty or non-JSON body.
        return True
    if isinstance(error, RemoteError):
        text = str(error).lower()
        if "traceback" in text:
            return False  # an exception inside the trace: the same request fails again
        # nnsight wraps HTTP failures of the submission as "Failed to send request: ...".
        return any(marker in text for marker in _TRANSIENT_TEXT) or "dropped" in text or "evicted" in text
    if isinstance(error, OSError):
        return True
    return False


def describe_permanent(error: BaseException, settings: RemoteSettings) -> str:
    """Turn a non-retryable remote failure into a message with the remote traceback's last lines."""
    text = str(error)
    if settings.api_key:
        text = text.replace(settings.api_key, "<NDIF_API_KEY>")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 12:
        lines = ["..."] + lines[-12:]
    return f"The NDIF job failed on {settings.host} and will not succeed on retry:\n" + "\n".join(lines)


class RemoteExecutor:
    """Runs batches on NDIF: one request per call, retried with bounded exponential backoff."""

    description = "ndif"

    def __init__(self, model, stack: models.LayerStack, layers: list[int], read_index: int,
                 reduction: str, settings: RemoteSettings, max_attempts: int = MAX_ATTEMPTS):
        self.model, self.stack, self.layers = model, stack, layers
        self.read_index, self.reduction = read_index, reduction
        self.settings = settings
        self.max_attempts = max_attempts
        self.model_key = model.to_model_key()
        self.requests = 0
        self.bytes_downloaded = 0
        self.result_bytes = 0
        self.backend_class = _make_backend_class()

    def run(self, batches, on_status: Callable[[str], None] | None = None):
        """Send one request with ``batches`` and wait for its results."""
        from .extraction import to_results, trace_batches

        envoys = [self.stack.envoy(self.model, layer) for layer in self.layers]
        for attempt in range(1, self.max_attempts + 1):
            backend = self._backend(on_status=on_status)
            try:
                if on_status:
                    on_status("submitting")
                outputs = trace_batches(self.model, envoys, batches, self.read_index, self.reduction,
                                        backend=backend)
            except Exception as error:  # noqa: BLE001 - classified by _retry_or_raise
                self._retry_or_raise(error, attempt, batches, backend)
                if on_status:
                    on_status(f"retrying ({attempt}/{self.max_attempts - 1})")
                continue

            self._count(backend)
            logger.debug("Job %s: %d batches, %d bytes downloaded", backend.job_id, len(batches), backend.bytes_downloaded)
            return to_results(batches, outputs, self.reduction)
        raise AssertionError("unreachable")

    def submit(self, batches) -> str:
        """Submit one request without waiting and return its NDIF job id."""
        from .extraction import trace_batches

        envoys = [self.stack.envoy(self.model, layer) for layer in self.layers]
        for attempt in range(1, self.max_attempts + 1):
            backend = self._backend(blocking=False)
            try:
                trace_batches(self.model, envoys, batches, self.read_index, self.reduction, backend=backend)
            except Exception as error:  # noqa: BLE001 - classified by _retry_or_raise
                self._retry_or_raise(error, attempt, batches, backend)
                continue
            logger.info("Submitted job %s for items from %d", backend.job_id, batches[0].item_indices[0])
            return backend.job_id
        raise AssertionError("unreachable")

    def collect(self, job_id: str, batches, on_status: Callable[[str], None] | None = None):
        """Poll a submitted job until it finishes and return its results."""
        from .extraction import to_results

        attempt = 1
        while True:
            backend = self._backend(blocking=False, job_id=job_id, on_status=on_status)
            try:
                saved = backend()
            except Exception as error:  # noqa: BLE001 - classified by _retry_or_raise
                self._retry_or_raise(error, attempt, batches, backend)
                attempt += 1
                continue
            if saved is None:
                if on_status and backend.status is not None:
                    on_status(backend.status.name.lower())
                time.sleep(POLL_SECONDS)
                continue
            outputs = saved.get("outputs") if isinstance(saved, dict) else None
            expected = 1 if self.reduction == "sum" else len(batches)
            if outputs is None or len(outputs) != expected:
                # NOTE: seen with ndif 0.1.2 on CPU: a job queued behind another returned
                # the results of only some of its traces. The caller sends the request again.
                raise RemoteRunError(
                    f"Job {job_id} returned {len(outputs) if outputs is not None else 'no'} results "
                    f"for {expected} expected."
                )
            self._count(backend)
            return to_results(batches, outputs, self.reduction)

    def _count(self, backend) -> None:
        self.requests += 1
        self.bytes_downloaded += backend.bytes_downloaded
        self.result_bytes += backend.result_bytes

    def _backend(self, blocking: bool = True, job_id: str | None = None, on_status=None):
        return self.backend_class(
            self.model_key, host=self.settings.host, api_key=self.settings.api_key or None,
            env=self.model._remoteable_get_env(), blocking=blocking, job_id=job_id, on_status=on_status,
        )

    def _retry_or_raise(self, error: Exception, attempt: int, batches, backend) -> None:
        """Sleep before the next attempt, or raise ``RemoteRunError`` for a permanent or final failure."""
        first_item = batches[0].item_indices[0]
        if not is_transient(error):
            raise RemoteRunError(describe_permanent(error, self.settings)) from None
        if attempt >= self.max_attempts:
            raise RemoteRunError(
                f"The NDIF request for items from {first_item} failed {attempt} times; last error: "
                f"{type(error).__name__}: {describe_permanent(error, self.settings).splitlines()[-1]}. "
                "Partial results are saved: rerun the same command to resume."
            ) from None
        delay = min(MAX_BACKOFF_SECONDS, BACKOFF_SECONDS * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        logger.warning(
            "NDIF request for items from %d failed (attempt %d of %d, job %s): %s: %s; retrying in %.1f s",
            first_item, attempt, self.max_attempts, backend.job_id, type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else "", delay,
        )
        time.sleep(delay)


def remote_trace_options(model, settings: RemoteSettings) -> dict:
    """Return ``model.trace`` options that send each trace to NDIF, for code outside the run pipeline.

    One blocking backend is shared by every trace of the caller.
    """
    # NOTE: these traces are not retried; a transient failure ends the caller's loop.
    backend = _make_backend_class()(
        model.to_model_key(), host=settings.host, api_key=settings.api_key or None,
        env=model._remoteable_get_env(),
    )
    return {"backend": backend}


def connect(model: str, host: str | None = None, api_key: str | None = None, dtype: str = "float32"):
    """Build the meta model for ``model``, run the preflight checks and return ``(model, trace options)``."""
    settings = RemoteSettings.resolve(host, api_key)
    meta_model, source = load_remote_model(model, dtype=dtype)
    preflight(settings, meta_model.to_model_key(), source)
    return meta_model, remote_trace_options(meta_model, settings)


def load_remote_model(model: str, revision: str | None = None, dtype: str = "float32"):
    """Build the meta-device model and tokenizer that remote traces are written against."""
    import nnsight.modeling.huggingface as nnsight_hf

    source = models.resolve_model_source(model)
    if os.path.isdir(source):
        # A local directory has no Hub id; nnsight would ask the Hub to canonicalise it
        # and fail. The directory path is the id the server was deployed with.
        source = os.path.abspath(source)
        nnsight_hf._ID_CACHE.setdefault(source, source)
    return models.load_model(source, revision=revision, dtype=dtype, remote=True), source


def prepare_remote(config, model=None):
    """Return ``(executor, meta model, model id)`` for ``config`` after the preflight checks."""
    settings = RemoteSettings.resolve(config.host, config.api_key)
    if model is None:
        model, source = load_remote_model(config.model, config.revision, config.dtype)
    else:
        source = model.repo_id
    stack = models.find_layers(model)
    model_key = model.to_model_key()
    preflight(settings, model_key, source)
    logger.info("Running on NDIF at %s, model key %s", settings.host, model_key)
    executor = RemoteExecutor(model, stack, [], config.read_index, "slices", settings)
    return executor, model, models.model_id(config.model)
