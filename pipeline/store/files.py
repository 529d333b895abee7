"""Writing one file through Beam's FileSystems (local paths, gs:// and any other
filesystem Beam knows): numpy arrays without pickles, JSON sorted and indented."""
from __future__ import annotations

import io
import json

import numpy as np
from apache_beam.io.filesystems import FileSystems


def save_npy(path: str, array: np.ndarray) -> None:
    """np.save through Beam's FileSystems (local or gs://)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


def save_json(path: str, obj: dict) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode('utf-8'))
