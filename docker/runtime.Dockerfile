# syntax=docker/dockerfile:1
# An example image for trainer and inference pods: a PyTorch (CUDA, NCCL) base plus weightsync[runtime].
# Build your own trainer or engine on top of it, or add `pip install "weightsync[runtime]"` to yours.
#   docker build -f docker/runtime.Dockerfile -t weightsync-runtime:0.1.0 .

# Pinned by version (torch 2.5.1, CUDA 12.4, cuDNN 9); pin by digest too in a release pipeline.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
LABEL org.opencontainers.image.title="weightsync-runtime" \
      org.opencontainers.image.description="Example PyTorch image with the weightsync runtime" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/weightsync/weightsync"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
WORKDIR /src
# The context is filtered by docker/runtime.Dockerfile.dockerignore: sources, pyproject.toml and examples/
# (kept at /opt/weightsync/examples, where examples/demo.yaml and examples/fsdp.yaml run them from).
COPY . .
# torch comes from the base image; the runtime extra must not replace it with another build (checked).
# DL3013 (pin pip versions) does not apply: "." is this checkout, whose dependencies pyproject.toml bounds.
# hadolint ignore=DL3013
RUN torch_before="$(python -c 'import torch; print(torch.__version__)')" \
 && pip install --no-cache-dir ".[runtime]" \
 && test "$(python -c 'import torch; print(torch.__version__)')" = "$torch_before" \
 && python -c "import weightsync.runtime" \
 && mkdir -p /opt/weightsync \
 && cp -r examples /opt/weightsync/examples \
 && rm -rf /src
RUN groupadd --system --gid 65532 weightsync \
 && useradd --system --uid 65532 --gid 65532 --create-home --home-dir /home/weightsync \
      --shell /usr/sbin/nologin weightsync
WORKDIR /home/weightsync
USER 65532:65532
# The rendezvous store (WEIGHTSYNC_MASTER_PORT, default 29500) listens on the trainer.
EXPOSE 29500
CMD ["python"]
