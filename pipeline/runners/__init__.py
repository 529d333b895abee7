"""Layer 2, runners: the one factory that turns options into a pipeline on a runner
(factory.py), the corrected Dask runner (dask_runner.py) and the check of the
private Beam names it relies on (beam_private.py), the fix for the FnApiRunner's
data-plane race applied before every local pipeline (beam_fixes.py), the Google Cloud launch
options shared by every Dataflow launch (cloud_launch.py) and the allocator
settings for processes that move big arrays (memory_tuning.py).
May import: errors, options, wals_core."""
