"""Parsing a range of a delimited ratings file into arrays (no Beam import).

Every line is accounted for: kept, a header, blank, or bad with a reason, so
that lines_read = kept + header + blank + bad. The reasons (docs/input-and-errors.md):
line_too_long, not_utf8, bad_quotes, wrong_field_count, too_few_fields, empty_id,
id_too_long, not_a_number, not_finite, negative_value, out_of_range.
ratings data: user, item, rating[, more columns ignored].
web_views data: CSV whose header (the first non-blank line) names clientId,
contentId and timeOnPage; a line must have as many fields as the header. Fields may
be quoted ("c,2", "30", "a ""b"" c") as the csv module reads them; a record is one
line (a quoted field cannot hold a line break).
"""
from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter

import numpy as np

from pipeline.io.lines import PREFIX_BYTES, OverlongLine

WEB_VIEW_COLUMNS = ('clientId', 'contentId', 'timeOnPage')


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
    has_header: bool = False                    # first non-blank line of a file is a header
    quoted: bool = False                        # web_views: CSV quoting ("a,b" is one field)
    max_id_length: int | None = None            # longer user or item IDs: bad lines
    max_line_bytes: int | None = None           # longer lines (without \r\n): bad lines
    max_abs_value: float | None = None          # |value| above it: bad (out_of_range)


@dataclasses.dataclass
class ParsedChunk:
    """Ratings parsed from one file range, IDs factorized: the range's distinct user
    IDs and a code per rating (so later steps touch each distinct string once),
    plus the line accounting."""
    user_codes: np.ndarray  # int32 index into user_ids, one per kept rating
    user_ids: np.ndarray    # distinct str IDs
    item_codes: np.ndarray
    item_ids: np.ndarray
    values: np.ndarray      # float64, one per kept rating
    counts: Counter         # lines_read, kept, header, blank, bad:<reason>
    bad: list[BadLine]      # every bad line of the range
    path: str = ''
    offset: int = 0         # byte offset of the range's first line
    header_suspect: bool = False  # the file's first line is bad and no header was declared
    started_at: float = 0.0       # wall clock when reading began (phase timings)

    @property
    def users(self) -> np.ndarray:
        """The user ID of every kept rating."""
        return self.user_ids[self.user_codes]

    @property
    def items(self) -> np.ndarray:
        return self.item_ids[self.item_codes]


def split_csv(line: str, delimiter: str) -> list[str] | None:
    """The fields of one CSV line as the csv module reads them (quotes, delimiters
    inside quotes, doubled quotes); None when its quoting is broken."""
    try:
        return next(csv.reader([line], delimiter=delimiter, quotechar='"', doublequote=True,
                               strict=True), [''])
    except csv.Error:
        return None


def split_fields(line: str, fmt: LineFormat) -> list[str] | None:
    """A line's fields: CSV for web_views (the csv module only for lines with a quote,
    where it can differ from a split), a plain split for ratings."""
    if fmt.quoted and '"' in line:
        return split_csv(line, fmt.delimiter)
    return line.split(fmt.delimiter)


def header_columns(header_line: str, delimiter: str) -> tuple[tuple[int, int, int], int]:
    """(positions of clientId, contentId, timeOnPage; number of fields) of a CSV header."""
    fields = split_csv(header_line.lstrip('\ufeff').rstrip('\r\n'), delimiter) or []
    names = [n.strip() for n in fields]
    missing = [c for c in WEB_VIEW_COLUMNS if c not in names]
    if missing:
        raise ValueError(f'web_views header must name {", ".join(WEB_VIEW_COLUMNS)}; '
                         f'missing {", ".join(missing)} in {header_line.strip()[:200]!r}')
    return tuple(names.index(c) for c in WEB_VIEW_COLUMNS), len(names)  # type: ignore


def parse_range(data: bytes, path: str, base_offset: int, fmt: LineFormat) -> ParsedChunk:
    """Parses the whole lines in `data`, which start at byte `base_offset` of `path`.

    Clean ranges take a columnar fast path (pyarrow's CSV reader); a range with
    anything unusual in it (a bad or blank line, CR without LF, padded IDs...) is
    parsed line by line, so that every line gets its own verdict.
    """
    return _parse_columnar(data, path, base_offset, fmt) or \
        parse_lines(data, path, base_offset, fmt)


def parse_lines(data: bytes, path: str, base_offset: int, fmt: LineFormat) -> ParsedChunk:
    """The line-by-line parser: exact accounting for any input."""
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
    # The header is the file's first non-blank line (blank lines before it are blank).
    header = None
    if fmt.has_header and first_of_file:
        header = next((n for n, l in enumerate(lines) if l.strip()), None)
        if header is not None and _too_long(lines[header], fmt):
            header = None        # bad (line_too_long), as when it is streamed past
        counts['header'] += header is not None

    def reject(n: int, reason: str, text: str) -> None:
        counts[f'bad:{reason}'] += 1
        bad.append(BadLine(path, int(offsets[n]), n, reason, text[:500]))

    need = max(fmt.columns) + 1
    u_col, i_col, v_col = fmt.columns
    users, items, values, where = [], [], [], []
    for n in range(len(lines)):
        if n == header:
            continue
        raw = lines[n]
        if raw.endswith(b'\r'):
            raw = raw[:-1]
        if fmt.max_line_bytes is not None and len(raw) > fmt.max_line_bytes:
            reject(n, 'line_too_long', raw[:PREFIX_BYTES].decode('utf-8', 'replace'))
            continue
        if not raw.strip():
            counts['blank'] += 1
            continue
        try:
            line = raw.decode('utf-8')
        except UnicodeDecodeError:
            reject(n, 'not_utf8', raw.decode('utf-8', 'replace'))
            continue
        fields = split_fields(line, fmt)
        if fields is None:
            reject(n, 'bad_quotes', line)
            continue
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
        if fmt.max_id_length is not None and max(len(user), len(item)) > fmt.max_id_length:
            reject(n, 'id_too_long', line)
            continue
        users.append(user)
        items.append(item)
        values.append(fields[v_col].strip())
        where.append(n)

    parsed = _to_floats(values)
    ok = np.isfinite(parsed)
    if fmt.nonnegative:
        ok &= ~(parsed < 0)
    if fmt.max_abs_value is not None:
        ok &= ~(np.abs(parsed) > fmt.max_abs_value)
    for j in np.flatnonzero(~ok):
        if np.isnan(parsed[j]) and not _is_nan_text(values[j]):
            reason = 'not_a_number'
        elif not np.isfinite(parsed[j]):
            reason = 'not_finite'
        elif fmt.nonnegative and parsed[j] < 0:
            reason = 'negative_value'
        else:
            reason = 'out_of_range'
        reject(where[j], reason, lines[where[j]].rstrip(b'\r').decode('utf-8'))
    bad.sort(key=lambda b: b.index)
    counts['kept'] = int(ok.sum())
    first_data = next((n for n in range(len(lines)) if n != header and lines[n].strip()),
                      None)
    suspect = (first_of_file and not fmt.has_header and bool(bad)
               and first_data is not None and bad[0].index == first_data)
    user_codes, user_ids = factorize(_str_array(users)[ok])
    item_codes, item_ids = factorize(_str_array(items)[ok])
    return ParsedChunk(user_codes, user_ids, item_codes, item_ids, parsed[ok], counts, bad,
                       path=path, offset=base_offset, header_suspect=suspect)


def _too_long(line: bytes, fmt: LineFormat) -> bool:
    return fmt.max_line_bytes is not None and len(line.removesuffix(b'\r')) > fmt.max_line_bytes


def overlong_chunk(path: str, line: OverlongLine) -> ParsedChunk:
    """The chunk of one line too long to hold (pipeline.io.lines streamed past it):
    one line read, bad for line_too_long."""
    counts = Counter(lines_read=1, kept=0)
    counts['bad:line_too_long'] = 1
    text = line.prefix.decode('utf-8', 'replace')
    no_ids = np.array([], dtype=str)
    no_codes = np.zeros(0, np.int32)
    return ParsedChunk(no_codes, no_ids, no_codes, no_ids, np.zeros(0, np.float64), counts,
                       [BadLine(path, line.offset, 0, 'line_too_long', text)],
                       path=path, offset=line.offset)


def factorize(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 code per ID, sorted distinct IDs)."""
    uniq, codes = np.unique(ids, return_inverse=True)
    return codes.astype(np.int32).reshape(-1), uniq


_BOM = b'\xef\xbb\xbf'


def _parse_columnar(data: bytes, path: str, base_offset: int,
                    fmt: LineFormat) -> ParsedChunk | None:
    """All lines of a clean range at once, or None when the range needs the
    line-by-line parser. Gives exactly what parse_lines gives whenever it answers."""
    if fmt.quoted and b'"' in data:
        return None                      # quoted CSV fields: the csv module reads them
    if fmt.max_line_bytes is not None and may_have_long_line(data, fmt.max_line_bytes):
        return None                      # a line may be too long: judged line by line
    counts: Counter = Counter()
    body = data
    if base_offset == 0 and body.startswith(_BOM):
        body = body[3:]
    if fmt.has_header and base_offset == 0:
        cut = body.find(b'\n')
        if not body[:cut if cut >= 0 else len(body)].strip():
            return None                  # blank lines before the header
        body = b'' if cut < 0 else body[cut + 1:]
        counts['header'] = 1
    if not body or body.count(b'\r') != body.count(b'\r\n'):
        return None
    try:
        body.decode('utf-8')
    except UnicodeDecodeError:
        return None
    lines = body.count(b'\n') + (0 if body.endswith(b'\n') else 1)
    first = body[:body.find(b'\n')] if b'\n' in body else body
    width = first.count(fmt.delimiter.encode('utf-8')) + 1
    if width < max(fmt.columns) + 1 or fmt.exact_fields not in (None, width):
        return None
    table = _read_table(body, fmt.delimiter, width, fmt.columns)
    if table is None or table.num_rows != lines:
        return None
    user_codes, user_ids = _encode(table.column(0))
    item_codes, item_ids = _encode(table.column(1))
    value_codes, value_texts = _encode(table.column(2))
    if not (len(user_ids) and len(item_ids)) or user_ids[0] == '' or item_ids[0] == '':
        return None                      # an empty ID or a blank line
    if fmt.max_id_length is not None and max(user_ids.dtype.itemsize, item_ids.dtype.itemsize) \
            > 4 * fmt.max_id_length:
        return None                      # an ID may be too long: judged line by line
    values = _to_floats(value_texts.tolist())
    if not np.all(np.isfinite(values)) or (fmt.nonnegative and np.any(values < 0)) or \
            (fmt.max_abs_value is not None and np.any(np.abs(values) > fmt.max_abs_value)):
        return None
    counts['lines_read'] = lines + counts['header']
    counts['kept'] = lines
    return ParsedChunk(user_codes, user_ids, item_codes, item_ids, values[value_codes],
                       counts, [], path=path, offset=base_offset)


def may_have_long_line(body: bytes, max_line_bytes: int) -> bool:
    """False when no line of body is longer than max_line_bytes; True when one may
    be. Any line longer than 2w holds a whole aligned window of w bytes, so with
    w = max_line_bytes // 2 it is enough to find a newline in every window: a
    few find() calls per MiB (the exact count is left to the line parser)."""
    w = max_line_bytes // 2
    if w < 4096:                       # small limits: one exact pass instead
        ends = np.flatnonzero(np.frombuffer(body, np.uint8) == 10)
        lengths = np.diff(np.concatenate([[-1], ends, [len(body)]])) - 1
        return bool(np.any(lengths > max_line_bytes))
    return any(body.find(b'\n', s, s + w) < 0 for s in range(0, len(body) - w + 1, w))


_ARROW_BLOCK_BYTES = 16 << 20   # 4 blocks per 64 MiB range: work for every core


def _read_table(body: bytes, delimiter: str, width: int, columns: tuple[int, int, int]):
    """pyarrow Table of the user, item and value columns as strings, or None if
    any line has another number of fields than the first."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    names = [f'f{n}' for n in range(width)]
    try:
        return pcsv.read_csv(
            pa.py_buffer(body),
            # Blocks parsed on Arrow's thread pool (one per core) and joined in
            # order: the same table as one thread; the parse step 0.8x the wall
            # time on 2 cores (bench/results/parse_speed.md).
            read_options=pcsv.ReadOptions(column_names=names, use_threads=True,
                                          block_size=_ARROW_BLOCK_BYTES),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char=False,
                                            escape_char=False, ignore_empty_lines=False),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                include_columns=[names[c] for c in columns], strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _encode(column) -> tuple[np.ndarray, np.ndarray]:
    """(int32 code per row, sorted distinct texts stripped of surrounding spaces)."""
    import pyarrow.compute as pc
    encoded = pc.dictionary_encode(column).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    texts = np.array([t.strip() for t in encoded.dictionary.to_pylist()], dtype=str)
    uniq, remap = np.unique(texts, return_inverse=True)   # also merges " 1" into "1"
    return remap.astype(np.int32).reshape(-1)[codes], uniq


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
