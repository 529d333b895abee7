"""Layer 3, serving: using a published model.

- recommender.py: the one-user Python API (load verified, recommend, similar
  items, fold-in);
- batch.py (the graph) and batch_run.py (one run): batch recommendations;
- export.py: the TensorFlow SavedModel (TensorFlow is imported only there);
- the HTTP server (`wals serve`, `python -m pipeline.serve`): an ASGI app
  (FastAPI on uvicorn) that answers one-user, batch, similar-item and fold-in
  requests. With --model_root it polls the root's LATEST pointer and swaps each
  newly promoted version in atomically after loading and verifying it in the
  background, so a promotion never fails a request. Modules: model_holder (load,
  verify, poll, swap), scorer (concurrent requests batched into one exact top-K
  call), app (the routes, limits, errors, API key, /metrics), server (uvicorn:
  one process, or --workers N sharing the port). Docs: docs/serving.md.

May import: io, store, runners, errors, options, wals_core."""
