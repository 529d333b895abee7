"""Writing one file through Beam's FileSystems (local paths, gs:// and any other
filesystem Beam knows): numpy arrays without pickles, JSON sorted, indented and
strict (pipeline.strict_json: no NaN or Infinity)."""
from __future__ import annotations

import io

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.strict_json import dumps


def save_npy(path: str, array: np.ndarray) -> None:
    """np.save through Beam's FileSystems (local or gs://)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


def save_json(path: str, obj: dict) -> None:
    with FileSystems.create(path) as f:
        f.write(dumps(obj, indent=2, sort_keys=True).encode('utf-8'))
