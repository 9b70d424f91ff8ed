# The GPU-machine image of blf: the key-free inference worker, python -m workers.gpu, with
# the [gpu] extra (vLLM).
#
#   docker build -f docker/gpu.Dockerfile -t blindference-node-gpu .
#   docker run -d --gpus all \
#     -e BLF_BROKER_URL=redis://:PASSWORD@control-host:6379/0 \
#     -e BLF_NODE_ADDRESS=0x... -e BLF_SUPPORTED_MODEL_IDS=... -e BLF_MODEL_BACKENDS=... \
#     -e BLF_CLUSTER_KEY_FILE=/etc/blf/cluster.key \
#     -v /etc/blf/cluster.key:/etc/blf/cluster.key:ro \
#     blindference-node-gpu --gpus 1
#
# It holds only the cluster key, mounted at run time; no keystore, password or control key
# (compose/gpu.yml). The CUDA base must suit the host's driver: pick another tag of
# nvidia/cuda with --build-arg CUDA_IMAGE=... See docs/deploy.md.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Python 3.11 from Ubuntu 22.04; gcc and the Python headers are for Triton, which vLLM's
# kernels compile with at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3.11-dev gcc ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/blf/src
COPY pyproject.toml README.md beat_schedule.py ./
COPY blf ./blf
COPY workers ./workers
RUN pip install --upgrade pip \
 && pip install ".[gpu]" \
 && rm -rf build ./*.egg-info

WORKDIR /root
ENTRYPOINT ["python", "-m", "workers.gpu"]
