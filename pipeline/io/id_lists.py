"""Lists a person gives a command in a file: IDs one per line (--users, --items)
and a new user's ratings (--new_user_ratings)."""
from __future__ import annotations

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.options import ConfigError
from wals_core.vocab import lookup_known


def read_id_file(path: str) -> list[str]:
    """The IDs of a file, one per line (surrounding spaces trimmed, blank lines
    skipped), in file order."""
    try:
        with FileSystems.open(path) as f:
            text = f.read().decode('utf-8-sig')
    except Exception as e:   # noqa: BLE001 - the filesystem's own error says why
        raise ConfigError(f'cannot read {path}: {e}') from None
    return [s for s in (line.strip() for line in text.splitlines()) if s]


def select(vocab: np.ndarray, ids: list[str]) -> tuple[np.ndarray, list[str], int]:
    """(sorted unique row numbers, unknown IDs in file order, duplicates) of an ID list."""
    index = lookup_known(vocab, np.array(ids, dtype=str)) if ids else np.zeros(0, np.int64)
    unknown = [s for s, i in zip(ids, index.tolist()) if i < 0]
    known = index[index >= 0]
    rows = np.unique(known)
    return rows.astype(np.int64), unknown, int(len(known) - len(rows))


def read_new_user_ratings(path: str) -> list[tuple[str, float]]:
    """(item ID, rating) per line: item<TAB or comma>rating (blank lines skipped)."""
    out = []
    try:
        with FileSystems.open(path) as f:
            text = f.read().decode('utf-8-sig')
    except Exception as e:   # noqa: BLE001
        raise ConfigError(f'cannot read {path}: {e}') from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = [s.strip() for s in (line.split('\t') if '\t' in line else line.split(','))]
        try:
            if len(fields) < 2 or not fields[0]:
                raise ValueError
            out.append((fields[0], float(fields[1])))
        except ValueError:
            raise ConfigError(f'{path} line {n}: expected item<TAB or comma>rating, got '
                              f'{line!r}') from None
    if not out:
        raise ConfigError(f'{path} holds no ratings')
    return out
