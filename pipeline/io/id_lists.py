"""Lists a person gives a command in a file: IDs one per line (--users, --items)
and a new user's ratings (--new_user_ratings).

Lines split as the training input splits them (pipeline.io.lines.split_lines: on
\\n only, a \\r before it dropped), so any ID the trainer kept can be asked for,
whatever other separators (\\x0b, \\x0c, \\x1c, \\x85, \\u2028 ...) it holds. Compressed
files (.gz, ...) are read like training input, with the same integrity checks.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.errors import InputError
from pipeline.io.decompress import open_uncompressed
from pipeline.io.lines import split_lines
from pipeline.io.read import special_file_kind
from pipeline.options import DEFAULT_MAX_ABS_VALUE, ConfigError
from wals_core.vocab import lookup_known

_READ_BYTES = 64 << 20


def read_list_text(path: str, flag: str) -> str:
    """The whole text of a list file (UTF-8, a byte order mark dropped), or a
    ConfigError naming the file and the option."""
    kind = special_file_kind(path)
    if kind is not None:
        raise ConfigError(f'{flag} {path} is {kind}: give a file')
    try:
        with open_uncompressed(path) as f:
            data = b''.join(iter(lambda: f.read(_READ_BYTES), b''))
    except InputError as e:
        raise ConfigError(f'{flag}: {e.plain}') from None
    except Exception as e:   # noqa: BLE001 - the filesystem's own error says why
        raise ConfigError(f'{flag}: cannot read {path}: {e}') from None
    try:
        return data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise ConfigError(f'{flag} {path} line {line}: not UTF-8 text (byte '
                          f'{e.start:,})') from None


def read_id_file(path: str, flag: str = '--users') -> list[str]:
    """The IDs of a file, one per line (surrounding spaces trimmed, as the trainer
    trims IDs; blank lines skipped), in file order. An empty list is a ConfigError:
    it would publish an empty result."""
    ids = [s for s in (line.strip() for line in split_lines(read_list_text(path, flag))) if s]
    if not ids:
        raise ConfigError(f'{flag} {path} lists no ID (it is empty or blank)')
    return ids


def select(vocab: np.ndarray, ids: list[str]) -> tuple[np.ndarray, list[str], int]:
    """(sorted unique row numbers, unknown IDs in file order, duplicates) of an ID list."""
    index = lookup_known(vocab, np.array(ids, dtype=str)) if ids else np.zeros(0, np.int64)
    unknown = [s for s, i in zip(ids, index.tolist()) if i < 0]
    known = index[index >= 0]
    rows = np.unique(known)
    return rows.astype(np.int64), unknown, int(len(known) - len(rows))


def read_new_user_ratings(path: str, max_abs_value: float = DEFAULT_MAX_ABS_VALUE,
                          flag: str = '--new_user_ratings') -> list[tuple[str, float]]:
    """(item ID, rating) per line: item<TAB or comma>rating (blank lines skipped).
    A rating that is not a finite number, or whose absolute value is above
    max_abs_value (the model's --max_abs_value), is a ConfigError naming the line,
    as such a line is bad in training input."""
    out = []
    for n, line in enumerate(split_lines(read_list_text(path, flag)), 1):
        if not line.strip():
            continue
        fields = [s.strip() for s in (line.split('\t') if '\t' in line else line.split(','))]
        try:
            if len(fields) < 2 or not fields[0]:
                raise ValueError
            value = float(fields[1])
        except ValueError:
            raise ConfigError(f'{flag} {path} line {n}: expected item<TAB or comma>rating, '
                              f'got {line[:200]!r}') from None
        if not math.isfinite(value) or abs(value) > max_abs_value:
            raise ConfigError(f'{flag} {path} line {n}: the rating {fields[1][:50]!r} is '
                              f'{"not a finite number" if not math.isfinite(value) else "out of range"}'
                              f' (ratings must be finite, with |rating| <= '
                              f'{max_abs_value:g}, the model\'s --max_abs_value)')
        out.append((fields[0], value))
    if not out:
        raise ConfigError(f'{flag} {path} holds no ratings')
    return out
