"""Layer 2, store: what is published and how. The staging and atomic publishing of
an output with its _SUCCESS manifest (publish.py), the checks every publisher runs
before any work and the reclaim of killed runs' leftovers (output_guard.py),
leases that tell a live job from a dead one (leases.py), reading a model back
verified (model_files.py), the versioned model root, LATEST, pruning and its
readers (model_root.py), the run report and the gate (report.py), writing one file
(files.py) and the check that remote runners get storage every worker can read
(shared_storage.py).
May import: errors, options, wals_core."""
