# fitdist on the torch it is tested with; the entry point is launch/torchrun.sh, so the container's
# arguments are those of `fitdist train` (CONFIG.yaml key=value ...).
#   docker build -t fitdist .
#   docker build --build-arg BASE=registry.local/python:3.11 -t fitdist .   # a local base image
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs -e NPROC=8 \
#     fitdist fitdist/configs/fmnist-fitnets.yaml strategy.kind=ddp
# torch 2.14.1's wheels carry CUDA 13.0's runtime libraries (cuDNN, NCCL included), so the image
# needs no CUDA toolkit and the host an NVIDIA driver for CUDA 13.0 (R580 or newer); on an older
# driver fitdist stops at start with one line naming it. Any BASE with python3 (3.10+) works: torch
# goes into a virtual environment of its own, pinned as in launch/setup.sh.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# a C++ compiler: DeepSpeed builds its CPU ops at first use, and torch.compile's CPU code needs one
RUN if command -v apt-get >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 WANDB_MODE=offline \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHON=/opt/venv/bin/python
RUN python3 -m venv /opt/venv
WORKDIR /workspace

# torch first, the tested versions; then the dependencies (a layer that survives source edits)
COPY pyproject.toml README.md ./
COPY fitdist/__init__.py fitdist/__init__.py
RUN pip install "torch==2.14.1" "torchvision==0.29.1" && pip install ".[deepspeed]" && pip uninstall -y fitdist
COPY . .
RUN pip install --no-deps -e ".[deepspeed]" && python -c "import deepspeed; from fitdist.versions import check_versions; \
    check_versions(('torch', 'torchvision', 'deepspeed'))"

ENTRYPOINT ["bash", "launch/torchrun.sh"]
CMD ["fitdist/configs/fmnist-fitnets.yaml", "strategy.kind=ddp"]
