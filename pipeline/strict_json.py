"""Strict JSON, for every JSON the tool writes or prints: NaN and Infinity are not
JSON (RFC 8259), and Python's json module would write them unless told not to.
A value that is not finite raises NonFiniteValue, naming where it is."""
from __future__ import annotations

import json
import math
from typing import Any

from pipeline.errors import MarkedError


class NonFiniteValue(MarkedError, ValueError):
    """A float that is NaN or infinite, which strict JSON cannot hold (a marked
    error: a runner carries its message out of a pipeline)."""


def dumps(obj: Any, **kwargs) -> str:
    """json.dumps(obj, allow_nan=False, **kwargs); NonFiniteValue names the first
    non-finite value's place (e.g. items[3].score)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        where = first_non_finite(obj)
        if where is None:
            raise
        raise NonFiniteValue(f'{where[0] or "the value"} is {where[1]}: not a finite '
                             'number, which JSON cannot hold') from None


def loads(text: str | bytes) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity."""
    def refuse(name: str):
        raise NonFiniteValue(f'{name} is not JSON')
    return json.loads(text, parse_constant=refuse)


def first_non_finite(obj: Any, path: str = '') -> tuple[str, float] | None:
    """(path, value) of the first NaN or infinite float inside obj, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path, obj)
    if isinstance(obj, dict):
        items = ((f'{path}.{k}' if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f'{path}[{n}]', v) for n, v in enumerate(obj))
    else:
        return None
    for where, value in items:
        found = first_non_finite(value, where)
        if found is not None:
            return found
    return None
