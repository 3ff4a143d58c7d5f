# syntax=docker/dockerfile:1
# The weightsync operator image: slim Python, weightsync[operator] only (kopf, kubernetes, prometheus-client;
# never torch), running as an unprivileged user. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t weightsync-operator:0.1.0 .
# The chart (charts/weightsync-operator) runs it with a read-only root filesystem as UID 65532.

# Pinned by version; pin by digest too (python:3.11.11-slim-bookworm@sha256:...) in a release pipeline.
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/weightsync
WORKDIR /src
# The context is filtered by docker/operator.Dockerfile.dockerignore: sources and pyproject.toml only.
COPY . .
RUN /opt/weightsync/bin/pip install --no-cache-dir ".[operator]" \
 && ! /opt/weightsync/bin/python -c "import torch" 2>/dev/null

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="weightsync-operator" \
      org.opencontainers.image.description="The weightsync Kubernetes operator (kopf)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/weightsync/weightsync"
RUN groupadd --system --gid 65532 weightsync \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin weightsync
COPY --from=build /opt/weightsync /opt/weightsync
ENV PATH=/opt/weightsync/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
# 8080: liveness/readiness (/healthz); 9090: Prometheus metrics (/metrics).
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "weightsync.operator"]
