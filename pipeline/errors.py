"""Errors a person can act on, carried out of a running pipeline, and the exit codes.

Runners wrap an exception raised in a DoFn in their own (with tracebacks and
runner detail); the marked message, with the exit code it stands for, is found
again in that text by the launcher.
"""
from __future__ import annotations

import logging
import re

# Exit codes, the same for every command (pipeline.cli.common; docs/input-and-errors.md).
EXIT_OK = 0
EXIT_FAILED = 1      # the work failed; the message says why (nothing was published)
EXIT_USAGE = 2       # refused before any work: an option or a path (argparse's code)
EXIT_GATE = 3        # train: the gate kept the previous model (the new one is published)
EXIT_MODEL_CHECK = 4  # train: the trained model failed its sanity check (not published)
EXIT_INTERNAL = 70   # a bug (EX_SOFTWARE): the traceback is printed

_START, _END = '<<WALS-ERROR', ' WALS-ERROR>>'
# '<<WALS-ERROR message WALS-ERROR>>', or with an exit code other than 1:
# '<<WALS-ERROR[4] message WALS-ERROR>>'.
_CODE = re.compile(r'\[(\d+)\] ')


def _mark(message: str, code: int) -> str:
    return f'{_START}{"" if code == EXIT_FAILED else f"[{code}]"} {message}{_END}'


def _innermost(text: str) -> tuple[str, int] | None:
    """(message, exit code) between the last start marker before the first end
    marker (runners may quote a message inside their own wrapped copy of it)."""
    end = text.find(_END)
    start = text.rfind(_START, 0, end) if end >= 0 else -1
    if start < 0:
        return None
    body = text[start + len(_START):end]
    code = _CODE.match(body)
    if code:
        return body[code.end():], int(code.group(1))
    return body.removeprefix(' '), EXIT_FAILED


class QuietMarkedErrors(logging.Filter):
    """Drops runner log records that only repeat a marked error or an out-of-memory
    error (the launcher prints each once, in one line, without a traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return _START not in message and 'MemoryError: ' not in message


class MarkedError(Exception):
    """An error whose message a runner carries out of a pipeline to the launcher,
    which prints it (`plain`) and exits with `exit_code`."""
    exit_code = EXIT_FAILED

    def __init__(self, message: str):
        self.plain = message
        super().__init__(_mark(message, self.exit_code))


class InputError(MarkedError, ValueError):
    """The input cannot give a model (too many bad lines, no ratings, bad header,
    a damaged compressed file...)."""


class ModelCheckError(MarkedError, ArithmeticError):
    """The trained model failed its sanity check (pipeline/training/model_check.py):
    a non-finite factor or metric, rows with training data whose vector is all
    zero, an implicit input without a positive value. It is never published."""
    exit_code = EXIT_MODEL_CHECK


class RunnerError(MarkedError, RuntimeError):
    """The runner lost or repeated elements (an accounting check between stages failed):
    the run stops, publishing nothing, with this one line."""


class NumericalError(ModelCheckError):
    """Training produced a non-finite factor or RMSE."""


def marked_error(exc: BaseException) -> tuple[str, int] | None:
    """(message, exit code) of the marked error inside an exception raised by any
    runner, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = _innermost(str(exc))
        if found is not None:
            return found
        exc = exc.__cause__ or exc.__context__
    return None


def user_message(exc: BaseException) -> str | None:
    """The marked message inside an exception raised by any runner, or None."""
    found = marked_error(exc)
    return found[0] if found is not None else None
