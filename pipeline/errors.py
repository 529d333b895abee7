"""Errors a person can act on, carried out of a running pipeline.

Runners wrap an exception raised in a DoFn in their own (with tracebacks and
runner detail); the marked message is found again in that text by the launcher.
"""
from __future__ import annotations

import logging

_START, _END = '<<WALS-ERROR ', ' WALS-ERROR>>'


def _innermost(text: str) -> str | None:
    """The message between the last start marker before the first end marker
    (runners may quote a message inside their own wrapped copy of it)."""
    end = text.find(_END)
    start = text.rfind(_START, 0, end) if end >= 0 else -1
    return text[start + len(_START):end] if start >= 0 else None


class QuietMarkedErrors(logging.Filter):
    """Drops runner log records that only repeat a marked error (the launcher prints
    it once, without a traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _START not in record.getMessage()


class InputError(ValueError):
    """The input cannot give a model (too many bad lines, no ratings, bad header...)."""

    def __init__(self, message: str):
        self.plain = message
        super().__init__(f'{_START}{message}{_END}')


class NumericalError(ArithmeticError):
    """Training produced a non-finite factor or RMSE."""

    def __init__(self, message: str):
        self.plain = message
        super().__init__(f'{_START}{message}{_END}')


def user_message(exc: BaseException) -> str | None:
    """The marked message inside an exception raised by any runner, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = _innermost(str(exc))
        if found is not None:
            return found
        exc = exc.__cause__ or exc.__context__
    return None


# Exit codes, the same for every command (pipeline.cli.common; README "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1      # the work failed; the message says why (nothing was published)
EXIT_USAGE = 2       # refused before any work: an option or a path (argparse's code)
EXIT_GATE = 3        # train: the gate kept the previous model (the new one is published)
EXIT_INTERNAL = 70   # a bug (EX_SOFTWARE): the traceback is printed


class RunnerError(RuntimeError):
    """The runner lost or repeated elements (an accounting check between stages failed):
    the run stops, publishing nothing, with this one line."""

    def __init__(self, message: str):
        self.plain = message
        super().__init__(f'{_START}{message}{_END}')
