"""The ``patchproto`` command line: each sub-command lives beside the code it drives."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

app = typer.Typer(
    name="patchproto",
    help="Few-shot classification of industrial defects (PatchProto networks).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance(n)``."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error and return the exit to raise."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")):
    """Few-shot classification of industrial defects (PatchProto networks)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def _register() -> None:
    # Each module defines one command function named after it; import order is help order.
    from patchproto import detect

    app.command("detect")(detect.detect_command)
    from patchproto import product_cli

    app.command("fit")(product_cli.fit_command)
    app.command("classify")(product_cli.classify_command)
    app.command("add-example")(product_cli.add_example_command)
    app.command("remove-example")(product_cli.remove_example_command)
    app.command("demo")(product_cli.demo_command)
    from patchproto import evaluate_cli, sweep

    app.command("evaluate")(evaluate_cli.evaluate_command)
    app.command("sweep")(sweep.sweep_command)
    from patchproto import service

    app.command("serve")(service.serve_command)


_register()
