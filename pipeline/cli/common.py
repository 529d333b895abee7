"""What every command shares: logging, the check that leftover arguments are Beam
options, and the one mapping from errors to messages and exit codes.

Exit codes (the same for every command; docs/input-and-errors.md):
  0  done                       3  the gate kept the previous model (train)
  1  the work failed with a clear message (bad input, an untrusted model, ...)
  2  refused before any work (a bad option or path; argparse's code)
  4  the trained model failed its sanity check and was not published (train)
  70 an internal error (a bug: the traceback is printed)
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from typing import Callable

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.errors import (EXIT_FAILED, EXIT_INTERNAL, MarkedError, QuietMarkedErrors,
                             marked_error)
from pipeline.options import ConfigError
from pipeline.store.publish import PublishFailed, UntrustedModel

log = logging.getLogger(__name__)

# How the user started the command: `python -m pipeline` (each module's alias) or
# `wals` (pipeline/cli/main.py sets it), for the usage lines of --help.
COMMAND = 'python -m pipeline'


def prog(subcommand: str) -> str:
    """The command line's name in usage and error lines."""
    return f'wals {subcommand}' if COMMAND == 'wals' else f'python -m pipeline.{subcommand}'


def setup_logging(*, quiet: tuple[str, ...] = (), verbose: tuple[str, ...] = ()) -> None:
    """INFO to stderr, Beam at WARNING (`verbose` loggers at INFO, `quiet` ones at
    ERROR), and runner records that only repeat a marked error dropped (the command
    prints it once, without a traceback)."""
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    logging.getLogger('apache_beam').setLevel(logging.WARNING)
    for name in verbose:
        logging.getLogger(name).setLevel(logging.INFO)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietMarkedErrors())


def unknown_options(argv: list[str]) -> list[str]:
    """The --flags in argv that no PipelineOptions class (Beam's or ours) defines:
    Beam keeps those only when asked to retain unknown options."""
    try:   # DaskOptions (--dask_client_address ...) is defined with its runner
        import apache_beam.runners.dask.dask_runner  # noqa: F401
    except ImportError:   # the `dask` extra is not installed
        pass
    known = PipelineOptions([]).get_all_options()
    retained = PipelineOptions(argv).get_all_options(retain_unknown_options=True)
    unknown = set(retained) - set(known)
    return [a for a in argv if a.startswith('--')
            and a[2:].split('=', 1)[0].replace('-', '_') in unknown]


def split_beam_args(rest: list[str], not_here: argparse.ArgumentParser | None = None
                    ) -> list[str]:
    """Checks that leftover arguments are all Beam options; ConfigError on a typo.
    not_here: a parser whose flags are a mistake in this command (the trainer's
    model options given to `recommend`, say), not something to pass on to Beam."""
    bad = []
    if not_here is not None:
        flags = {s for a in not_here._actions for s in a.option_strings}
        bad = [a for a in rest if a.startswith('--') and a.split('=', 1)[0] in flags]
    bad += [a for a in unknown_options(rest) if a not in bad]
    if bad:
        raise ConfigError(f'unknown option(s): {" ".join(bad)} (see --help)')
    if rest and not rest[0].startswith('-'):
        raise ConfigError(f'unexpected argument {rest[0]!r} (see --help)')
    return rest


def fail(message: str, code: int = EXIT_FAILED) -> int:
    """Prints `error: message` to stderr; returns the exit code."""
    print(f'error: {message}', file=sys.stderr)
    return code


def out_of_memory(exc: BaseException) -> str | None:
    """What a MemoryError says ('Unable to allocate 441 GiB for an array ...'), also
    when a runner carries it out of a pipeline as text; None for other errors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError):
            return str(exc) or 'MemoryError'
        found = re.search(r'MemoryError: ([^\n]*)', str(exc))
        if found:
            return found.group(1).strip()
        exc = exc.__cause__ or exc.__context__
    return None


# Write failures that say the storage is full, not that the code is wrong.
STORAGE_FULL = {errno.ENOSPC: 'no space left on the device',
                errno.EFBIG: 'file too large (a file-size limit, ulimit -f)',
                errno.EDQUOT: 'disk quota exceeded'}


def storage_full(exc: BaseException) -> str | None:
    """'<what> writing <file>' when exc (or what it wraps, also as a runner's text)
    is a write that failed for lack of space: ENOSPC, EFBIG, EDQUOT; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_FULL:
            where = f' writing {exc.filename}' if exc.filename else ''
            return f'{STORAGE_FULL[exc.errno]}{where}'
        found = re.search(r'\[Errno (\d+)\][^\n]*', str(exc))
        if found and int(found.group(1)) in STORAGE_FULL:
            path = re.search(r"\[Errno \d+\] [^:\n]*: '([^'\n]+)'", found.group(0))
            where = f' writing {path.group(1)}' if path else ''
            return f'{STORAGE_FULL[int(found.group(1))]}{where}'
        for code, text in STORAGE_FULL.items():   # a library's own error (TensorFlow's)
            found = re.search(rf'([^\s;]+); {re.escape(os.strerror(code))}', str(exc))
            if found:
                return f'{text} writing {found.group(1)}'
        exc = exc.__cause__ or exc.__context__
    return None


def run_command(body: Callable[[], int], parser: argparse.ArgumentParser,
                refused: tuple[type[BaseException], ...] = (),
                failed: tuple[type[BaseException], ...] = (),
                after_failure: str = '') -> int:
    """Runs a command's body and maps what it raises to a message and an exit code,
    the one mapping of every command:
    - ConfigError (which includes pipeline.store.publish.OutputRefused and
      OutputExists: an output refused before any work) and `refused` -> argparse's `prog: error: ...` (exit 2, nothing done);
    - pipeline.errors.MarkedError (InputError, ModelCheckError, ...), raised here or
      carried out of a pipeline by a runner -> `error: ...` and after_failure on
      stderr, with the error's exit code (1; 4 for a model that failed its check);
    - UntrustedModel (a model folder that is missing, changed or forged),
      PublishFailed (the filesystem refused a step of publishing) and `failed` ->
      `error: ...` (exit 1); running out of memory -> `error: out of
      memory ...` (exit 1); a write refused for lack of space (ENOSPC, EFBIG,
      EDQUOT) -> `error: no space left ...` (exit 1: nothing was published);
    Anything else is a bug: its traceback and 70."""
    try:
        return body()
    except (ConfigError, *refused) as e:
        parser.error(str(e))
    except MarkedError as e:
        # A runner may re-raise it with its own wrapped message: the marked part.
        message, code = marked_error(e) or (e.plain, e.exit_code)
        return fail(f'{message}{after_failure}', code)
    except (UntrustedModel, PublishFailed, *failed) as e:
        return fail(f'{getattr(e, "plain", e)}{after_failure}')
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    except Exception as e:   # noqa: BLE001 - runner-wrapped errors become a message
        found = marked_error(e)
        if found is not None:
            message, code = found
            return fail(f'{message}{after_failure}', code)
        memory = out_of_memory(e)
        if memory is not None:
            return fail(f'out of memory: {memory} (an option too large for this machine, '
                        f'such as --latent_factors or --top_k?){after_failure}')
        full = storage_full(e)
        if full is not None:
            return fail(f'{full}; nothing was published (an earlier output is '
                        f'unchanged): free space or raise the limit and run again'
                        f'{after_failure}')
        log.exception('internal error (a bug): %s', e)
        return EXIT_INTERNAL
    return EXIT_INTERNAL   # not reached: parser.error exits
