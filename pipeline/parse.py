"""Parsing a range of a delimited ratings file into arrays (no Beam import).

Every line is accounted for: kept, a header, blank, or bad with a reason, so
that lines_read = kept + header + blank + bad.
ratings data: user, item, rating[, more columns ignored].
web_views data: CSV whose header names clientId, contentId and timeOnPage; a line
must have as many fields as the header.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np

WEB_VIEW_COLUMNS = ('clientId', 'contentId', 'timeOnPage')
BAD_REASONS = ('too_few_fields', 'wrong_field_count', 'empty_id', 'not_a_number',
               'not_finite', 'not_utf8', 'negative_value')


@dataclasses.dataclass
class BadLine:
    path: str
    offset: int        # byte offset of the line in the (uncompressed) file
    index: int         # line number within its range, 0-based
    reason: str
    text: str
    range_offset: int = 0  # byte offset of the line's range (for line numbers)


@dataclasses.dataclass(frozen=True)
class LineFormat:
    delimiter: str
    columns: tuple[int, int, int] = (0, 1, 2)   # user, item, value field positions
    exact_fields: int | None = None             # web_views: the header's field count
    nonnegative: bool = False                   # web_views: time on page >= 0
    has_header: bool = False                    # first line of each file is a header


@dataclasses.dataclass
class ParsedChunk:
    """Ratings parsed from one file range: parallel arrays plus line accounting."""
    users: np.ndarray      # str IDs
    items: np.ndarray      # str IDs
    values: np.ndarray     # float64
    counts: Counter        # lines_read, kept, header, blank, bad:<reason>
    bad: list[BadLine]     # every bad line of the range
    path: str = ''
    offset: int = 0        # byte offset of the range's first line
    header_suspect: bool = False  # the file's first line is bad and no header was declared
    started_at: float = 0.0       # wall clock when reading began (phase timings)


def header_columns(header_line: str, delimiter: str) -> tuple[tuple[int, int, int], int]:
    """(positions of clientId, contentId, timeOnPage; number of fields) of a header."""
    names = [n.strip().strip('"') for n in
             header_line.lstrip('\ufeff').rstrip('\r\n').split(delimiter)]
    missing = [c for c in WEB_VIEW_COLUMNS if c not in names]
    if missing:
        raise ValueError(f'web_views header must name {", ".join(WEB_VIEW_COLUMNS)}; '
                         f'missing {", ".join(missing)} in {header_line.strip()[:200]!r}')
    return tuple(names.index(c) for c in WEB_VIEW_COLUMNS), len(names)  # type: ignore


def parse_range(data: bytes, path: str, base_offset: int, fmt: LineFormat) -> ParsedChunk:
    """Parses the whole lines in `data`, which start at byte `base_offset` of `path`."""
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
    first_of_file = base_offset == 0 and bool(lines)
    if first_of_file and lines[0].startswith(b'\xef\xbb\xbf'):
        lines[0] = lines[0][3:]           # a UTF-8 byte order mark is not data
    start = 0
    if fmt.has_header and first_of_file:
        counts['header'] += 1
        start = 1

    def reject(n: int, reason: str, text: str) -> None:
        counts[f'bad:{reason}'] += 1
        bad.append(BadLine(path, int(offsets[n]), n, reason, text[:500]))

    delim = fmt.delimiter
    need = max(fmt.columns) + 1
    u_col, i_col, v_col = fmt.columns
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
            reject(n, 'not_utf8', raw.decode('utf-8', 'replace'))
            continue
        fields = line.split(delim)
        if fmt.exact_fields is not None and len(fields) != fmt.exact_fields:
            reject(n, 'wrong_field_count', line)
            continue
        if len(fields) < need:
            reject(n, 'too_few_fields', line)
            continue
        user, item = fields[u_col].strip(), fields[i_col].strip()
        if not user or not item:
            reject(n, 'empty_id', line)
            continue
        users.append(user)
        items.append(item)
        values.append(fields[v_col].strip())
        where.append(n)

    parsed = _to_floats(values)
    ok = np.isfinite(parsed)
    if fmt.nonnegative:
        ok &= ~(parsed < 0)
    for j in np.flatnonzero(~ok):
        if np.isnan(parsed[j]) and not _is_nan_text(values[j]):
            reason = 'not_a_number'
        elif not np.isfinite(parsed[j]):
            reason = 'not_finite'
        else:
            reason = 'negative_value'
        reject(where[j], reason, lines[where[j]].rstrip(b'\r').decode('utf-8'))
    bad.sort(key=lambda b: b.index)
    counts['kept'] = int(ok.sum())
    first_data = next((n for n in range(start, len(lines)) if lines[n].strip()), None)
    suspect = (first_of_file and not fmt.has_header and bool(bad)
               and first_data is not None and bad[0].index == first_data)
    return ParsedChunk(_str_array(users)[ok], _str_array(items)[ok], parsed[ok], counts, bad,
                       path=path, offset=base_offset, header_suspect=suspect)


def _str_array(texts: list[str]) -> np.ndarray:
    return np.array(texts, dtype=str) if texts else np.array([], dtype=str)


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
