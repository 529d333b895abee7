"""The file the retraining DAG's train task runs: `python3 wals_train_launcher.py OPTIONS`.

The Beam operator runs a pipeline *file*; the trainer is the module pipeline.train of
the project. This launcher finds the project next to the --setup_file it is given (the
same setup.py from which Dataflow's workers install it), puts that folder first on
sys.path and hands over to pipeline.train.main, passing its exit code on unchanged
(0 promoted, 3 the gate kept the previous model, 1 run error, 2 bad command line).
"""
from __future__ import annotations

import logging
import os
import sys


def project_dir(argv: list[str]) -> str:
    """The folder of --setup_file (given as `--setup_file=PATH` or `--setup_file PATH`)."""
    for i, arg in enumerate(argv):
        if arg.startswith('--setup_file='):
            return os.path.dirname(os.path.abspath(arg.split('=', 1)[1]))
        if arg == '--setup_file' and i + 1 < len(argv):
            return os.path.dirname(os.path.abspath(argv[i + 1]))
    sys.exit('wals_train_launcher: --setup_file PATH/setup.py is required (the project '
             'to run and to install on the Dataflow workers)')


def main(argv: list[str]) -> int:
    sys.path.insert(0, project_dir(argv))
    # The trainer quiets apache_beam to WARNING; keep the Dataflow runner's INFO
    # lines: "Created job with id: [...]" is how the operator learns the job id
    # (console link, cancel on kill).
    logging.getLogger('apache_beam.runners.dataflow').setLevel(logging.INFO)
    from pipeline import train   # the documented entry point (pipeline/train.py)
    return train.main(argv)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
