# The recommendation server, python -m pipeline.serve (docs/serving.md, "Docker" and
# "Cloud Run"). Build from the repository root:
#   docker build -t wals-serve .
# The image holds the code and its dependencies, never a model: the model root (or a
# model folder) is read at run time, from gs:// or from a mounted volume.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY setup.py ./
COPY pipeline ./pipeline
COPY wals_core ./wals_core
# local: Apache Beam with its gcp extra (reads and verifies gs:// models); serve: the
# HTTP server. Not the test, tune, dask or export (TensorFlow) extras.
RUN pip install ".[local,serve]"

# Not root: the server needs no privilege and writes no file.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin serve
USER 10001

# Cloud Run sends traffic to $PORT (8080 unless configured otherwise); the server
# binds $PORT when it is set. Binding 0.0.0.0 requires an API key: set
# WALS_SERVE_API_KEY (e.g. from Secret Manager) or mount a file for --api_key_file.
EXPOSE 8080
ENTRYPOINT ["python", "-m", "pipeline.serve", "--host", "0.0.0.0"]
# The default model source; replace it with arguments to `docker run IMAGE ...` or
# Cloud Run's --args (e.g. --model_root gs://BUCKET/models).
CMD ["--model_root", "/models"]
