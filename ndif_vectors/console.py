"""The terminal side shared by every command: one stderr console, logging set-up, clean failures."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)

# Third-party loggers whose INFO lines drown the run's own (transformers prints whole
# configs), so they stay at WARNING even with --verbose.
_NOISY_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock", "transformers", "nnsight", "websocket", "matplotlib")


def configure_logging(verbose: bool) -> None:
    """Send log records through rich to stderr, at DEBUG with ``verbose`` and INFO otherwise."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def fail(error: Exception | str) -> None:
    """Print ``error`` as one paragraph and exit with status 1, without a traceback."""
    console.print(f"[bold red]Error:[/] {error}", highlight=False)
    raise typer.Exit(code=1)
