"""A reader of a model root's LATEST in a loop, as a process of its own (the fault
matrix runs it while other processes publish and promote):

    python -m tests.latest_reader ROOT STOP_FILE REPORT_JSON

Until STOP_FILE exists it resolves LATEST the way every reader does (the version
named in its lease first: pipeline.store.model_root.holding), loads it verified
(pipeline.store.model_files.load_model_files, then Recommender.load) and records
the version. REPORT_JSON gets {"loads": n, "versions": [in order seen], "errors":
[messages]}: any exception is an error (a partial or unverifiable model).
"""
from __future__ import annotations

import json
import os
import sys
import time


def main(root: str, stop: str, report: str) -> int:
    from pipeline.serving.recommender import Recommender
    from pipeline.store.model_files import load_model_files
    from pipeline.store.model_root import holding
    from pipeline.store.publish import new_run_id
    loads, seen, errors = 0, [], []
    while not os.path.exists(stop):
        try:
            with holding(root, new_run_id()) as folder:
                files = load_model_files(folder)
                rec = Recommender.load(folder)
                assert files.col.shape[0] > 0 and rec is not None
            version = folder.rstrip('/').rsplit('/', 1)[-1]
            if not seen or seen[-1] != version:
                seen.append(version)
            loads += 1
        except Exception as e:   # noqa: BLE001 - every failure is reported
            errors.append(f'{type(e).__name__}: {e}')
            time.sleep(0.05)
    with open(report, 'w', encoding='utf-8') as f:
        json.dump({'loads': loads, 'versions': seen, 'errors': errors}, f)
    return 0


if __name__ == '__main__':
    sys.exit(main(*sys.argv[1:4]))
