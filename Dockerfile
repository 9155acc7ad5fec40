# syntax=docker/dockerfile:1
# Targets: gpu (default: NVIDIA CUDA runtime, onnxruntime-gpu), cpu (onnxruntime), train (torch CPU build,
# retrains and re-exports into the model repository). Every Python package version comes from
# pyproject.toml: nothing is pinned twice. tests/unit/test_docker.py checks that.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The CUDA major version and cuDNN that the `gpu` extra's onnxruntime-gpu wheel was built for (its
# build_and_package_info.py says 13.0; tests/unit/test_gpu_pins.py reads it): CUDA 13 needs driver 580+
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- the service's dependencies, CPU flavour --------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
COPY export ./export
COPY vitserve ./vitserve
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir ".[cpu]"

# ---- the same with onnxruntime-gpu: the `gpu` extra's pin without its [cuda,cudnn] libraries, which
# ---- the CUDA image has already ------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
COPY export ./export
COPY vitserve ./vitserve
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . "$(python3 -c 'import re, tomllib; print(re.sub(r"\[.*\]", "", tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"][0]))')"

# ---- runtime images: the service and the model repository, no torch, not root ------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --create-home --uid 10001 vitserve
COPY --from=cpu-build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=vitserve service ./service
COPY --chown=vitserve model_repository ./model_repository
USER 10001
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 VITSERVE_MODEL_REPOSITORY=/app/model_repository VITSERVE_DEVICE=cpu
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status != 200)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]

FROM ${PYTHON_IMAGE} AS train
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY service ./service
COPY models ./models
COPY export ./export
COPY vitserve ./vitserve
# the CPU build of the pinned torch (a plain PyPI install would pull the CUDA build)
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu,train,hf]"
CMD ["sh", "-c", "python -m export vit && python -m export detr && python -m export imagetransformer"]

FROM ${CUDA_IMAGE} AS gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 vitserve
COPY --from=gpu-build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=vitserve service ./service
COPY --chown=vitserve model_repository ./model_repository
USER 10001
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 VITSERVE_MODEL_REPOSITORY=/app/model_repository VITSERVE_DEVICE=cuda
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status != 200)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
