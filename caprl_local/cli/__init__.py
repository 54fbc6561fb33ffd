"""The ``caprl-local`` command: a thin client of the library.

Results go to stdout, everything else to stderr. Errors are turned into
messages and exit codes in one place, :func:`main`.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from .. import console
from ..errors import Cancelled, CaprlError, HubUnreachableError, NoProjectorError, NoSpaceError, OfflineError
from . import manage, serve  # noqa: F401 - importing a command module adds its commands to the group
from .base import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, StdoutClosed, cli
from .caption import caption

__all__ = ["ERROR_TABLE", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "caption", "cli", "main"]


def _pull_hint(exc: OfflineError) -> str:
    quant = ["--quant", exc.quant] if exc.quant and not exc.quant_is_default else []
    args = [exc.model, *quant, *(["--imatrix"] if exc.imatrix else [])]
    return f"Error: {exc} (`caprl-local pull {' '.join(args)}`)"


# Exception type -> (exit code, message: a format string of the exception, "{exc}", or a function
# of it); first match wins. The library's messages say what happened; the CLI adds its own
# flags and commands. Usage errors print click's own usage message.
ERROR_TABLE: tuple[tuple[type[BaseException], int, str | Callable[[Any], str]], ...] = (
    (click.UsageError, EXIT_USAGE, ""),
    # The reader of the results went away (`| head`): what it read is what it wanted, so, like ripgrep
    # or fd, stop without a word and exit 0; outputs written so far (-o, sidecars) keep every record.
    (StdoutClosed, EXIT_OK, ""),
    (KeyboardInterrupt, EXIT_INTERRUPTED, "Interrupted."),
    (Cancelled, EXIT_INTERRUPTED, "Interrupted."),
    (click.exceptions.Abort, EXIT_INTERRUPTED, "Interrupted."),
    (OfflineError, EXIT_FAILURE, _pull_hint),
    (HubUnreachableError, EXIT_FAILURE, "Error: {exc} (-m PATH.gguf)"),
    (NoProjectorError, EXIT_FAILURE, "Error: {exc} with --mmproj"),
    (NoSpaceError, EXIT_FAILURE, "Error: {exc} (--cache-dir or CAPRL_LOCAL_HOME moves it)"),
    (CaprlError, EXIT_FAILURE, "Error: {exc}"),
    (MemoryError, EXIT_FAILURE, "Error: out of memory; lower --max-image-tokens or use a smaller quant"),
)


def _verbose_requested(argv: list[str]) -> bool:
    return "--verbose" in argv or "-v" in argv


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, map every failure to a message and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = _verbose_requested(args)
    console.configure_logging(verbose)
    try:
        code = cli.main(args=args, prog_name="caprl-local", standalone_mode=False)
        return code if isinstance(code, int) else EXIT_OK
    except BrokenPipeError as exc:  # stdout closed outside a command (click's own output)
        return _report(StdoutClosed(str(exc)), tracebacks=False)
    except BaseException as exc:  # noqa: BLE001 - this is the one place errors become exit codes
        return _report(exc, tracebacks=verbose or os.environ.get("CAPRL_DEBUG", "") not in ("", "0"))


def _silence_stdout() -> None:
    """Point stdout at the null device, so that what is left in its buffer never fails again at exit."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # no stdout at all, or no descriptor beneath it
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - open for the rest of the process


def _report(exc: BaseException, *, tracebacks: bool) -> int:
    """One line on stderr for `exc`, its exit code from ERROR_TABLE; the traceback with
    --verbose or CAPRL_DEBUG=1 (which leaves llama.cpp's log off)."""
    for exc_type, code, message in ERROR_TABLE:
        if isinstance(exc, exc_type):
            console.clear_status()  # never glued to a "Loading ..." line
            if isinstance(exc, StdoutClosed):
                _silence_stdout()
            elif isinstance(exc, click.ClickException):
                exc.show()
            elif message:
                if code == EXIT_INTERRUPTED and sys.stderr.isatty():
                    click.echo(err=True)  # end a progress line first
                # Messages quote outside text (llama.cpp's lines, names from the Hub, servers' answers): escaped.
                console.say(message(exc) if callable(message) else message.format(exc=exc))
            if tracebacks and code == EXIT_FAILURE:
                traceback.print_exception(exc, file=sys.stderr)
            return code
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    # A bug in caprl-local: still one line, with the traceback only on request.
    console.say(f"Error: unexpected {type(exc).__name__}: {exc} (set CAPRL_DEBUG=1 for the traceback)")
    if tracebacks:
        traceback.print_exception(exc, file=sys.stderr)
    return EXIT_FAILURE
