"""Parsing a range of a delimited ratings file into arrays (no Beam import).

Every line is accounted for: kept, a header, blank, or bad with a reason.
ratings data: user, item, rating[, more columns ignored].
web_views data: CSV whose header names clientId, contentId and timeOnPage.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np

WEB_VIEW_COLUMNS = ('clientId', 'contentId', 'timeOnPage')
MAX_EXAMPLES = 5   # bad-line examples kept per range, for error messages


@dataclasses.dataclass
class BadLine:
    path: str
    offset: int        # byte offset of the line in the (uncompressed) file
    reason: str
    text: str


@dataclasses.dataclass
class ParsedChunk:
    """Ratings parsed from one file range: parallel arrays plus line accounting."""
    users: np.ndarray      # str IDs
    items: np.ndarray      # str IDs
    values: np.ndarray     # float64
    counts: Counter        # lines_read, kept, header, blank, bad:<reason>
    bad: list[BadLine]     # every bad line of the range
    started_at: float = 0.0  # wall clock when reading the range began (phase timings)

    @classmethod
    def empty(cls) -> 'ParsedChunk':
        return cls(np.array([], dtype=str), np.array([], dtype=str),
                   np.array([], dtype=np.float64), Counter(), [])


def header_columns(header_line: str, delimiter: str) -> tuple[int, int, int]:
    """Positions of clientId, contentId, timeOnPage in a web_views header line."""
    names = [n.strip().strip('"') for n in header_line.lstrip('\ufeff').rstrip('\r\n').split(delimiter)]
    missing = [c for c in WEB_VIEW_COLUMNS if c not in names]
    if missing:
        raise ValueError(f'web_views header must name {", ".join(WEB_VIEW_COLUMNS)}; '
                         f'missing {", ".join(missing)} in {header_line.strip()!r}')
    return tuple(names.index(c) for c in WEB_VIEW_COLUMNS)  # type: ignore[return-value]


def parse_range(data: bytes, path: str, base_offset: int, delimiter: str,
                columns: tuple[int, int, int], skip_first_line: bool,
                nonnegative: bool = False) -> ParsedChunk:
    """Parses whole lines `data` that start at byte `base_offset` of `path`.

    columns: field positions of (user, item, value); skip_first_line drops a
    header; nonnegative marks negative values bad (time on page).
    """
    counts: Counter = Counter()
    bad: list[BadLine] = []
    lines = data.split(b'\n')
    if lines and lines[-1] == b'':
        lines.pop()
    offsets = np.zeros(len(lines), dtype=np.int64)
    if lines:
        np.cumsum([len(l) + 1 for l in lines[:-1]], out=offsets[1:])
    offsets += base_offset
    counts['lines_read'] = len(lines)
    if base_offset == 0 and lines and lines[0].startswith(b'\xef\xbb\xbf'):
        lines[0] = lines[0][3:]           # UTF-8 byte order mark
    start = 0
    if skip_first_line and lines:
        counts['header'] += 1
        start = 1

    need = max(columns) + 1
    u_col, i_col, v_col = columns
    users, items, values, where = [], [], [], []
    for n in range(start, len(lines)):
        raw = lines[n]
        if raw.endswith(b'\r'):
            raw = raw[:-1]
        if not raw.strip():
            counts['blank'] += 1
            continue
        try:
            line = raw.decode('utf-8')
        except UnicodeDecodeError:
            _bad(bad, counts, path, offsets[n], 'not_utf8', raw.decode('utf-8', 'replace'))
            continue
        fields = line.split(delimiter)
        if len(fields) < need:
            _bad(bad, counts, path, offsets[n], 'too_few_fields', line)
            continue
        user, item = fields[u_col].strip(), fields[i_col].strip()
        if not user or not item:
            _bad(bad, counts, path, offsets[n], 'empty_id', line)
            continue
        users.append(user)
        items.append(item)
        values.append(fields[v_col].strip())
        where.append(n)

    parsed = _to_floats(values)
    ok = np.isfinite(parsed)
    if nonnegative:
        ok &= ~(parsed < 0)
    if not ok.all():
        for j in np.flatnonzero(~ok):
            n = where[j]
            reason = 'negative_value' if parsed[j] < 0 else (
                'not_a_number' if np.isnan(parsed[j]) and not _is_nan_text(values[j])
                else 'not_finite')
            _bad(bad, counts, path, offsets[n], reason,
                 lines[n].rstrip(b'\r').decode('utf-8', 'replace'))
    counts['kept'] = int(ok.sum())
    return ParsedChunk(np.array(users, dtype=str)[ok] if users else np.array([], dtype=str),
                       np.array(items, dtype=str)[ok] if items else np.array([], dtype=str),
                       parsed[ok], counts, bad)


def _bad(bad: list, counts: Counter, path: str, offset, reason: str, text: str) -> None:
    counts[f'bad:{reason}'] += 1
    bad.append(BadLine(path, int(offset), reason, text[:500]))


def _is_nan_text(text: str) -> bool:
    return text.strip().lower() in ('nan', '+nan', '-nan')


def _to_floats(texts: list[str]) -> np.ndarray:
    """float64 of every text; NaN where a text is not a number at all."""
    if not texts:
        return np.array([], dtype=np.float64)
    try:
        return np.array(texts, dtype=str).astype(np.float64)
    except ValueError:
        out = np.empty(len(texts), dtype=np.float64)
        for j, t in enumerate(texts):
            try:
                out[j] = float(t)
            except ValueError:
                out[j] = math.nan
        return out
