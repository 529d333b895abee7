"""The options table of docs/options.md, generated from the one table of options
(wals_core/defaults.py and pipeline/option_table.py).

    python scripts/options_table.py            # print the table
    python scripts/options_table.py --write    # rewrite it in docs/options.md

tests/test_option_table.py fails when docs/options.md's table is not what this
prints (so the docs cannot drift from the code's defaults and help texts).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.option_table import END, START, markdown_table  # noqa: E402

DOC = ROOT / 'docs' / 'options.md'


def section() -> str:
    """The table with its markers, as docs/options.md must hold it."""
    return f'{START}\n{markdown_table()}\n{END}'


def current(text: str) -> str:
    """docs/options.md's table with its markers ('' when the markers are missing)."""
    if START not in text or END not in text:
        return ''
    return text[text.index(START):text.index(END) + len(END)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--write', action='store_true',
                        help='rewrite the table in docs/options.md')
    args = parser.parse_args()
    if not args.write:
        print(section())
        return 0
    text = DOC.read_text()
    old = current(text)
    if not old:
        raise SystemExit(f'{DOC}: no {START!r} ... {END!r} markers to replace')
    DOC.write_text(text.replace(old, section()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
