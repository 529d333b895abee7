"""Reading a compressed input file as its uncompressed bytes, in bounded pieces,
with an explicit check that every compressed stream ends properly.

Beam's CompressedFile (what FileSystems.open gives for a compressed suffix) stops
quietly where the compressed data stops: a truncated .gz or .xz reads as a shorter
file, and a corrupt one raises the codec's own error without the file's name. Here
every codec Beam detects by suffix (CompressionTypes.detect_compression_type) is
read through the codec's incremental decompressor:

- a file whose last stream has no end-of-stream marker (gzip: the trailer with the
  CRC32 and ISIZE, which zlib verifies; bzip2, xz/lzma, zstd and zlib-deflate: their
  end markers) raises DamagedFile, naming the file and the uncompressed byte and
  line where the data stops;
- data the codec cannot decode (a flipped byte, a CRC mismatch, a file that is not
  of its suffix's format) raises DamagedFile the same way;
- a stream without an integrity check is refused (UncheckedFile), since damage
  inside it could pass unnoticed: zstd frames written without a content checksum
  (the zstd command writes one by default; python-zstandard and Beam's writer do
  not), xz --check=none and the legacy .lzma format. gzip (CRC32), bzip2 (block and
  stream CRCs) and zlib-deflate (Adler-32) always carry one;
- several streams one after another (multi-member gzip, concatenated bzip2, xz or
  zstd) are read as one text, as gzip -d and Beam read them; zero bytes after the
  last gzip member are padding (GNU gzip and Python's gzip accept them too);
- memory stays bounded whatever the data: zlib, bzip2 and lzma are asked for at
  most the bytes wanted (max_length), and zstd, which has no such limit, is fed
  slices small enough that even its densest blocks cannot expand past a few MiB.
"""
from __future__ import annotations

import bz2
import lzma
import zlib

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import InputError

READ_BYTES = 1 << 20       # compressed bytes per read of the underlying file
_FIRST_READ_BYTES = 64 << 10   # the first reads are smaller: a look at a file's
                               # start (pipeline.io.read.check_input_files) costs little
_STEP_BYTES = 64 << 10     # uncompressed bytes asked of a decompressor at a time
# A zstd block of 4 bytes (an RLE block) can stand for 128 KiB: feeding slices of
# 1 KiB keeps one call's output under 32 MiB.
_ZSTD_SLICE = 1024
_ZSTD_HEADER_BYTES = 18    # the longest zstd frame header
_NAMES = {CompressionTypes.GZIP: 'gzip', CompressionTypes.BZIP2: 'bzip2',
          CompressionTypes.DEFLATE: 'deflate (zlib)', CompressionTypes.ZSTD: 'zstd',
          CompressionTypes.LZMA: 'xz/lzma'}


class DamagedFile(InputError):
    """A compressed file that is truncated or corrupt."""


class UncheckedFile(InputError):
    """A compressed stream without an integrity check (corruption undetectable)."""


def compression_of(path: str) -> str:
    """Beam's compression type for a path, by its suffix (UNCOMPRESSED if none)."""
    return CompressionTypes.detect_compression_type(path)


def is_compressed(path: str) -> bool:
    return compression_of(path) != CompressionTypes.UNCOMPRESSED


class _Member:
    """One compressed stream (a gzip member, a bzip2/xz/zstd stream) being decoded:
    feed() compressed bytes when needs_input, take(n) at most n uncompressed bytes."""

    def __init__(self, compression: str):
        self._zlib = compression in (CompressionTypes.GZIP, CompressionTypes.DEFLATE)
        self._zstd = compression == CompressionTypes.ZSTD
        if compression == CompressionTypes.GZIP:
            self._d = zlib.decompressobj(zlib.MAX_WBITS | 16)   # gzip header and trailer
        elif compression == CompressionTypes.DEFLATE:
            self._d = zlib.decompressobj()                      # zlib header, as Beam writes
        elif compression == CompressionTypes.BZIP2:
            self._d = bz2.BZ2Decompressor()
        elif compression == CompressionTypes.LZMA:
            self._d = lzma.LZMADecompressor()                   # .xz and legacy .lzma
        else:
            import zstandard   # a Beam dependency, imported only when needed
            self._d = zstandard.ZstdDecompressor(
                max_window_size=1 << 31).decompressobj()
        self._in = b''        # compressed bytes given but not yet passed on
        self._pos = 0         # zstd: self._in[:_pos] was passed on
        self._out = b''       # zstd: decoded bytes not yet taken
        self.good = b''       # zlib: what decoded before an error, within the failed step

    @property
    def eof(self) -> bool:
        """The stream's end marker was read and all its bytes were taken."""
        return self._d.eof and not self._out

    @property
    def needs_input(self) -> bool:
        if self._d.eof or len(self._in) > self._pos or self._out:
            return False
        return self._zlib or self._zstd or self._d.needs_input

    @property
    def unused(self) -> bytes:
        """Compressed bytes after this stream's end (the next stream's start)."""
        return self._d.unused_data + self._in[self._pos:]

    def has_check(self) -> bool | None:
        """Whether the stream carries an integrity check (None: not known yet)."""
        if self._zstd:
            import zstandard
            try:
                return zstandard.get_frame_parameters(self._in).has_checksum
            except zstandard.ZstdError:
                return True   # no frame header: the decoder reports the damage
        if isinstance(self._d, lzma.LZMADecompressor):
            check = self._d.check
            return None if check == lzma.CHECK_UNKNOWN else check != lzma.CHECK_NONE
        return True

    def feed(self, data: bytes) -> None:
        self._in = self._in[self._pos:] + data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._zstd:
            parts, have = [self._out], len(self._out)
            view = memoryview(self._in)
            while have < n and self._pos < len(self._in) and not self._d.eof:
                part = self._d.decompress(view[self._pos:self._pos + _ZSTD_SLICE])
                self._pos += _ZSTD_SLICE
                parts.append(part)
                have += len(part)
            view.release()
            data = b''.join(parts)
            out, self._out = data[:n], data[n:]
            return out
        if self._d.eof:
            return b''
        if self._zlib:
            # A copy of the state (cheap beside a step's work) lets an error be placed
            # to the byte: the failed call's output is lost, the replay finds it.
            before, data = self._d.copy(), self._in
            try:
                out = self._d.decompress(self._in, n)
            except zlib.error:
                self.good = _decodable_prefix(before, data, n)
                raise
            # At the end of the stream the rest is in unused_data (and, again, in
            # unconsumed_tail when the output limit was reached at the same time).
            self._in = b'' if self._d.eof else self._d.unconsumed_tail
            return out
        data, self._in = self._in, b''
        return self._d.decompress(data, n)


def _decodable_prefix(d, data: bytes, n: int) -> bytes:
    """The uncompressed bytes (at most n) that zlib decompressor d gives from data
    before it fails, decoded in small steps."""
    good = []
    try:
        while sum(map(len, good)) < n:
            piece = d.decompress(data, 256)
            if not piece:
                break
            good.append(piece)
            data = d.unconsumed_tail
    except zlib.error:
        pass
    return b''.join(good)


class DecompressedStream:
    """The uncompressed bytes of a compressed file: read(n) gives up to n bytes (n
    unless the text ends), b'' at the end; DamagedFile when the data is truncated
    or corrupt. `offset` and `lines` say how far the text has been read."""

    def __init__(self, raw, compression: str, path: str):
        self._raw = raw
        self._compression = compression
        self.path = path
        self._member: _Member | None = None
        self._pending = b''     # compressed bytes read but not yet given to a member
        self._members = 0
        self.offset = 0         # uncompressed bytes given out so far
        self.lines = 0          # newlines among them
        self._back = b''        # bytes given back (unread), read again first
        self._checked: bool | None = False   # the current stream has a check
        self._read_size = _FIRST_READ_BYTES

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> 'DecompressedStream':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def unread(self, data: bytes) -> None:
        """Gives back bytes read past a line's end: the next read starts with them."""
        self._back = data + self._back
        self.offset -= len(data)
        self.lines -= data.count(b'\n')

    def read(self, n: int) -> bytes:
        pieces, have = [], 0
        if self._back:
            first, self._back = self._back[:n], self._back[n:]
            pieces.append(first)
            have = len(first)
            self.offset += len(first)
            self.lines += first.count(b'\n')
        while have < n:
            piece = self._next(n - have)
            if not piece:
                break
            pieces.append(piece)
            have += len(piece)
            self.offset += len(piece)             # for the error messages
            self.lines += piece.count(b'\n')
        return pieces[0] if len(pieces) == 1 else b''.join(pieces)

    def _next(self, n: int) -> bytes:
        """Up to n bytes from the current stream, starting the next one as needed."""
        stalled = 0
        while True:
            if self._member is None:
                data = self._pending or self._raw_read()
                self._pending = b''
                if not data:
                    return b''                      # every stream ended properly
                if self._members and self._compression == CompressionTypes.GZIP \
                        and not data.strip(b'\0'):
                    if self._only_zeros_left():
                        return b''                  # zero padding after the last member
                    raise self._damaged('data after the zero bytes that follow a '
                                        'gzip member')
                if self._compression == CompressionTypes.ZSTD:
                    while len(data) < _ZSTD_HEADER_BYTES:   # the whole frame header
                        more = self._raw_read()
                        if not more:
                            break
                        data += more
                self._member = _Member(self._compression)
                self._member.feed(data)
                self._checked = False
            try:   # in steps, so that an error's offset is known to within a step
                out = self._member.take(min(n, _STEP_BYTES))
            except Exception as e:   # noqa: BLE001 - zlib.error, OSError, LZMAError, ZstdError
                self.offset += len(self._member.good)
                self.lines += self._member.good.count(b'\n')
                raise self._damaged(str(e) or type(e).__name__) from None
            if not self._checked:
                self._checked = self._member.has_check()
                if self._checked is False:
                    raise self._unchecked()
            if out:
                return out
            if self._member.eof:
                self._pending = self._member.unused
                self._member = None
                self._members += 1
                continue
            if self._member.needs_input or stalled > 2:
                data = self._raw_read()
                if not data:
                    raise self._truncated()
                self._member.feed(data)
                stalled = 0
            else:
                stalled += 1

    def _raw_read(self) -> bytes:
        size, self._read_size = self._read_size, min(self._read_size * 4, READ_BYTES)
        try:
            return self._raw.read(size)
        except Exception as e:   # noqa: BLE001 - the filesystem's own error says why
            raise InputError(f'{self.path}: cannot read: {e}') from None

    def _only_zeros_left(self) -> bool:
        """Whether the rest of the file (read in pieces) is zero bytes."""
        while True:
            data = self._raw_read()
            if not data:
                return True
            if data.strip(b'\0'):
                self._pending = data
                return False

    def _unchecked(self) -> UncheckedFile:
        how = ('recompress it with the zstd command, which writes a checksum by default '
               '(zstd -C)' if self._compression == CompressionTypes.ZSTD else
               'recompress it with xz, whose default check is CRC64')
        return UncheckedFile(
            f'{self.path}: its {_NAMES[self._compression]} data carries no integrity '
            f'check (stream {self._members + 1}), so damage inside it could not be '
            f'detected: {how}, or with gzip')

    def _where(self) -> str:
        return f'byte {self.offset:,} of the uncompressed text (line {self.lines + 1:,})'

    def _truncated(self) -> DamagedFile:
        return DamagedFile(
            f'{self.path}: the {_NAMES[self._compression]} data ends before its '
            f'end-of-stream marker: the file is truncated (an interrupted copy or '
            f'download?) and its text stops after {self._where()}')

    def _damaged(self, detail: str) -> DamagedFile:
        return DamagedFile(
            f'{self.path}: corrupt {_NAMES[self._compression]} data ({detail}), found '
            f'after {self._where()} (a damaged file: copy it again)')


def open_uncompressed(path: str):
    """A readable binary file object of `path`'s text: the file itself, or for a
    compressed suffix a DecompressedStream over it."""
    compression = compression_of(path)
    try:
        raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    except Exception as e:   # noqa: BLE001 - the filesystem's own error says why
        raise InputError(f'cannot read {path}: {e}') from None
    if compression == CompressionTypes.UNCOMPRESSED:
        return raw
    return DecompressedStream(raw, compression, path)
