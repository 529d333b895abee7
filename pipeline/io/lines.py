"""Cutting a byte stream into pieces of whole lines with bounded memory, and the
one rule for splitting a text into lines.

A line is the bytes up to a newline (\\n) or the end of the file. Training input,
ID lists (--users, --items) and a new user's ratings (--new_user_ratings) all split
on \\n only (and drop one \\r before it): \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028 and
\\u2029, which str.splitlines() also breaks on, may be part of an ID.

A line longer than --max_line_bytes is never held whole: it is streamed past in
small reads and reported as an OverlongLine (its offset, length and first bytes),
so memory stays about one piece whatever the input (an endless line, a binary
file without newlines).
"""
from __future__ import annotations

import dataclasses
from typing import BinaryIO, Iterator

SKIP_READ_BYTES = 1 << 20          # reads while streaming past an overlong line
PREFIX_BYTES = 500                 # what a bad-line report shows of a line


@dataclasses.dataclass(frozen=True)
class OverlongLine:
    """A line longer than the limit, streamed past: where it starts, its length
    (without the line break) and its first bytes."""
    offset: int
    length: int
    prefix: bytes


Piece = tuple[int, 'bytes | OverlongLine']


def split_lines(text: str) -> list[str]:
    """The lines of a text: split on \\n only, one \\r before it dropped, no empty
    last line for a text that ends with \\n."""
    lines = text.split('\n')
    if lines and lines[-1] == '':
        lines.pop()
    return [line[:-1] if line.endswith('\r') else line for line in lines]


class _Reader:
    """A binary file whose read-ahead past a line's end can be given back: by
    seeking back (a file), or to the stream itself (DecompressedStream.unread), or
    kept here."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._seekable = bool(getattr(f, 'seekable', lambda: False)())
        self._back = b''

    def read(self, n: int) -> bytes:
        if self._back:
            data, self._back = self._back[:n], self._back[n:]
            if len(data) < n:
                data += self._f.read(n - len(data))
            return data
        return self._f.read(n)

    def unread(self, data: bytes) -> None:
        if not data:
            return
        if not self._back and self._seekable:
            self._f.seek(self._f.tell() - len(data))
        elif not self._back and hasattr(self._f, 'unread'):
            self._f.unread(data)
        else:
            self._back = data + self._back

    def read_through_newline(self, limit: int) -> tuple[bytes, bool]:
        """The bytes up to and including the next newline, if it comes within
        `limit` bytes (True), or else the first `limit` or more bytes read (False;
        the end of the file counts as a line's end: True). Reads start small (a
        line usually ends soon) and grow."""
        parts, have, step = [], 0, 1 << 12
        while True:
            data = self.read(min(step, max(limit - have, 1)))
            step = min(step * 4, SKIP_READ_BYTES)
            if not data:
                return b''.join(parts), True
            nl = data.find(b'\n')
            if nl >= 0:
                self.unread(data[nl + 1:])
                parts.append(data[:nl + 1])
                return b''.join(parts), True
            parts.append(data)
            have += len(data)
            if have >= limit:
                return b''.join(parts), False

    def skip_through_newline(self) -> tuple[int, bool]:
        """Streams past the rest of a line: (bytes skipped before its newline,
        whether a newline ended it)."""
        skipped, step = 0, 1 << 12
        while True:
            data = self.read(step)
            step = min(step * 4, SKIP_READ_BYTES)
            if not data:
                return skipped, False
            nl = data.find(b'\n')
            if nl >= 0:
                self.unread(data[nl + 1:])
                return skipped + nl, True
            skipped += len(data)


def line_pieces(f: BinaryIO, pos: int, stop: int | None, block_bytes: int,
                max_line_bytes: int, mid_line: bool = False) -> Iterator[Piece]:
    """(offset, bytes of whole lines) pieces of the lines that start at or after
    `pos` (f positioned there; mid_line: inside a line, whose rest is streamed past
    and belongs to whoever read its start) and before `stop` (None: to the end),
    each about block_bytes; a line that crosses `stop` is read to its end. A line
    longer than max_line_bytes that does not fit in its block is streamed past and
    given as (offset, OverlongLine); shorter lines stay in the pieces (the parser
    judges a line's length exactly: a \\r before the newline does not count)."""
    reader = _Reader(f)
    hold = max_line_bytes + 1          # + a \r the parser will drop
    if mid_line:
        skipped, newline = reader.skip_through_newline()
        pos += skipped + newline
    while stop is None or pos < stop:
        n = block_bytes if stop is None else min(block_bytes, stop - pos)
        data = reader.read(n)
        if not data:
            return
        if data.endswith(b'\n'):
            yield pos, data
            pos += len(data)
            continue
        cut = data.rfind(b'\n') + 1        # the last line of `data` is not finished
        head = len(data) - cut
        rest, ended = (b'', False) if head > hold else \
            reader.read_through_newline(hold + 1 - head)
        line = head + len(rest) - rest.endswith(b'\n')
        if ended and line <= hold:
            data += rest
            yield pos, data
            pos += len(data)
            continue
        # An overlong line starts at pos + cut: the lines before it, then the line
        # itself streamed past.
        if cut:
            yield pos, data[:cut]
        start = pos + cut
        prefix = (data[cut:cut + PREFIX_BYTES] + rest[:PREFIX_BYTES])[:PREFIX_BYTES]
        del data
        skipped, newline = reader.skip_through_newline()
        length = line + skipped
        yield start, OverlongLine(start, length, prefix)
        pos = start + length + (1 if newline else 0)
