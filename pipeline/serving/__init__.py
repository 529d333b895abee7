"""Online recommendations over HTTP (`python -m pipeline.serve`): an ASGI app (FastAPI
on uvicorn) that answers one-user, batch, similar-item and fold-in requests from a
published model, verified against its _SUCCESS manifest. With --model_root it polls
the root's LATEST pointer and swaps each newly promoted version in atomically after
loading and verifying it in the background, so a promotion never fails a request.
Modules: model_holder (load, verify, poll, swap), scorer (concurrent requests batched
into one exact top-K call), app (the routes, limits, errors, API key, /metrics),
server (the command line). Docs: docs/serving.md.
"""
