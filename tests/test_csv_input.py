"""web_views input is CSV: quoted fields, delimiters inside quotes and doubled quotes
read as the csv module reads them, with every line still accounted for."""
from __future__ import annotations

import csv
import io
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.io.parse import LineFormat, _parse_columnar, parse_lines, parse_range
from tests.pipeline_support import load_model, run_pipeline

HEADER = ['visitId', 'clientId', 'contentId', 'timeOnPage']
COLUMNS = (1, 2, 3)


def web_views_format(delimiter: str) -> LineFormat:
    return LineFormat(delimiter, COLUMNS, len(HEADER), nonnegative=True, has_header=True,
                      quoted=True)


def expected_from_csv_module(text: str, delimiter: str) -> tuple[list, dict]:
    """What the file holds as the csv module reads it: the kept (user, item, value)
    and {line index: reason} of the bad lines, by the web_views rules."""
    kept, bad = [], {}
    rows = csv.reader(io.StringIO(text, newline=''), delimiter=delimiter, strict=True)
    for n, row in enumerate(rows):
        if n == 0 or not row:
            continue                               # the header, a blank line
        if len(row) != len(HEADER):
            bad[n] = 'wrong_field_count'
            continue
        user, item, value = (row[c].strip() for c in COLUMNS)
        if not user or not item:
            bad[n] = 'empty_id'
            continue
        try:
            number = float(value)
        except ValueError:
            bad[n] = 'not_a_number'
            continue
        if not math.isfinite(number):
            bad[n] = 'not_finite'
        elif number < 0:
            bad[n] = 'negative_value'
        else:
            kept.append((user, item, number))
    return kept, bad


# Fields with the characters that matter to CSV (no line breaks: a record is a line).
field_text = st.text(alphabet=' ,;|\t"ab1x', max_size=6)
value_text = st.one_of(st.integers(-3, 500).map(str), st.sampled_from(['1.5', ' 7 ', 'nan', 'inf']),
                       field_text)
row = st.tuples(st.integers(0, 99).map(str), field_text, field_text, value_text)
rows = st.lists(st.one_of(row.map(list), st.just([])), min_size=1, max_size=40)
quoting = st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC])


def write_csv(rows: list[list[str]], delimiter: str, quoting: int, crlf: bool,
              extra_field: set[int]) -> str:
    out = io.StringIO(newline='')
    writer = csv.writer(out, delimiter=delimiter, quoting=quoting, doublequote=True,
                        lineterminator='\r\n' if crlf else '\n')
    writer.writerow(HEADER)
    for n, fields in enumerate(rows):
        if not fields:
            out.write('\r\n' if crlf else '\n')          # a blank line
        else:
            writer.writerow(fields + (['more'] if n in extra_field else []))
    return out.getvalue()


@settings(max_examples=300, deadline=None)
@given(rows, st.sampled_from([',', ';', '\t', '|']), quoting, st.booleans(),
       st.sets(st.integers(0, 39), max_size=3))
def test_web_views_lines_parse_as_the_csv_module_reads_them(rows, delimiter, quoting, crlf,
                                                           extra_field):
    text = write_csv(rows, delimiter, quoting, crlf, extra_field)
    kept, bad = expected_from_csv_module(text, delimiter)
    data = text.encode('utf-8')
    fmt = web_views_format(delimiter)
    for chunk in (parse_lines(data, 'f', 0, fmt), parse_range(data, 'f', 0, fmt)):
        got = list(zip(chunk.users.tolist(), chunk.items.tolist(), chunk.values.tolist()))
        assert sorted(got) == sorted(kept)
        assert {b.index: b.reason for b in chunk.bad} == bad     # exact lines, and why
        assert chunk.counts['lines_read'] == len(rows) + 1
        assert chunk.counts['blank'] == sum(1 for r in rows if not r)


clean_id = st.text(alphabet='ab1x ', min_size=1, max_size=5).filter(str.strip)
clean_rows = st.lists(st.tuples(st.integers(0, 99).map(str), clean_id, clean_id,
                                st.integers(0, 500).map(str)).map(list), min_size=1, max_size=40)


def test_web_views_fast_path_agrees_or_leaves_quoted_ranges_to_the_line_parser():
    taken = []

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(clean_rows, rows), st.sampled_from([',', ';', '\t', '|']), quoting,
           st.booleans())
    def check(rows, delimiter, quoting, crlf):
        text = write_csv(rows, delimiter, quoting, crlf, set())
        data = text.encode('utf-8')
        fmt = web_views_format(delimiter)
        fast = _parse_columnar(data, 'f', 0, fmt)
        lines = parse_lines(data, 'f', 0, fmt)
        if b'"' in data:
            assert fast is None
        if fast is None:     # then it must have been a range the line parser is for
            assert b'"' in data or lines.bad or lines.counts['blank'] or \
                any(f != f.strip() for r in rows for f in r[1:3])
            return
        taken.append(len(rows))
        assert fast.users.tolist() == lines.users.tolist()
        assert fast.items.tolist() == lines.items.tolist()
        assert fast.values.tobytes() == lines.values.tobytes()
        assert fast.counts == lines.counts and fast.bad == lines.bad == []

    check()
    assert len(taken) >= 20, f'the fast path answered only {len(taken)} of 200 cases'


def test_clean_web_views_ranges_take_the_fast_path():
    data = b'visitId,clientId,contentId,timeOnPage\n1,c1,100,30\n2,c2,101,4\n'
    fast = _parse_columnar(data, 'f', 0, web_views_format(','))
    assert fast is not None and fast.values.tolist() == [30.0, 4.0]
    assert fast.items.tolist() == ['100', '101'] and fast.counts['header'] == 1


def test_quoted_fields_from_the_issue():
    data = (b'"visitId","clientId","contentId","timeOnPage"\n'
            b'1,c1,100,"30"\n'                     # was not_a_number
            b'2,"c,2",101,5\n'                     # was wrong_field_count
            b'3,"say ""hi""",102,"7"\n'
            b'4,c4,103,"8\n'                       # unclosed quote
            b'5,c5,"10"4,9\n')                     # text after a closing quote
    fmt = web_views_format(',')
    chunk = parse_range(data, 'f', 0, fmt)
    assert chunk.users.tolist() == ['c1', 'c,2', 'say "hi"']
    assert chunk.values.tolist() == [30.0, 5.0, 7.0]
    assert [(b.index, b.reason) for b in chunk.bad] == [(4, 'bad_quotes'), (5, 'bad_quotes')]


def test_quoted_web_views_through_the_pipeline(tmp_path):
    lines = ['"visitId","clientId","contentId","timeOnPage"']
    for n in range(300):
        lines.append(f'{n},"client, {n % 20}","{100 + n % 15}","{n % 50 + 1}"')
    lines.insert(120, '999,"broken,100,5')
    path = tmp_path / 'views.csv'
    path.write_text('\n'.join(lines) + '\n')
    metrics = run_pipeline(path, tmp_path / 'out', '--data_type', 'web_views', '--num_iters',
                           '1', '--max_bad_fraction', '0.01')
    assert metrics['lines'] == {'lines_read': 302, 'kept': 300, 'skipped_header': 1,
                                'skipped_blank': 0, 'bad': 1,
                                'bad_by_reason': {'bad_quotes': 1}}
    model = load_model(tmp_path / 'out')
    assert model['user'].tolist() == sorted(f'client, {n}' for n in range(20))
    assert model['item'].tolist() == list(range(100, 115))
    errors = [json.loads(l) for f in (tmp_path / 'out' / 'errors').glob('*.jsonl')
              for l in f.read_text().splitlines()]
    assert [(e['line'], e['reason']) for e in errors] == [(121, 'bad_quotes')]


@pytest.mark.parametrize('line, user, value', [
    (b'"42"\t7\t5', '"42"', 5.0),               # quotes are part of a ratings ID
    (b'42\t7\t"5"', None, None),                # and make a rating not a number
])
def test_ratings_format_keeps_quotes_as_text(line, user, value):
    for chunk in (parse_lines(line, 'f', 0, LineFormat('\t')),
                  parse_range(line, 'f', 0, LineFormat('\t'))):
        if user is None:
            assert [b.reason for b in chunk.bad] == ['not_a_number']
        else:
            assert chunk.users.tolist() == [user] and chunk.values.tolist() == [value]


# --- The header is the first non-blank line -----------------------------------------

@pytest.mark.parametrize('fmt', [web_views_format(','), LineFormat(',', has_header=True)])
def test_header_is_the_first_nonblank_line(fmt):
    data = b'\n \r\nvisitId,clientId,contentId,timeOnPage\n1,c1,100,30\n\n2,c2,101,4\n'
    for chunk in (parse_lines(data, 'f', 0, fmt), parse_range(data, 'f', 0, fmt)):
        assert chunk.counts == {'lines_read': 6, 'blank': 3, 'header': 1, 'kept': 2}
        assert chunk.bad == []


def test_web_views_file_starting_with_blank_lines(tmp_path):
    lines = ['', '', 'visitId,clientId,contentId,timeOnPage']
    lines += [f'{n},c{n % 9},{n % 7},{n % 40 + 1}' for n in range(200)]
    path = tmp_path / 'views.csv'
    path.write_bytes(b'\xef\xbb\xbf' + '\r\n'.join(lines).encode() + b'\r\n')
    metrics = run_pipeline(path, tmp_path / 'out', '--data_type', 'web_views',
                           '--num_iters', '1', '--max_bad_fraction', '0')
    assert metrics['lines'] == {'lines_read': 203, 'kept': 200, 'skipped_header': 1,
                                'skipped_blank': 2, 'bad': 0, 'bad_by_reason': {}}
