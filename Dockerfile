# fitdist on a CUDA PyTorch base, with its DeepSpeed extra; the entry point is launch/torchrun.sh,
# so the container's arguments are those of `fitdist train` (CONFIG.yaml key=value ...).
#   docker build -t fitdist .            # --build-arg BASE=... for another PyTorch/CUDA image
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs -e NPROC=8 \
#     fitdist fitdist/configs/fmnist-fitnets.yaml strategy.kind=ddp
# devel, not runtime: DeepSpeed compiles some of its ops with nvcc at first use. Another BASE
# needs `python` and `pip` on PATH with torch + torchvision installed, in an environment pip may
# install into (conda as here, or a venv: a distribution's system Python refuses with
# "externally-managed-environment"), and a C++ compiler (DeepSpeed's CPU ops build at first use).
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PYTHON=python \
    WANDB_MODE=offline
WORKDIR /workspace

# dependencies first (a layer that survives source edits), then the package itself
COPY pyproject.toml README.md ./
COPY fitdist/__init__.py fitdist/__init__.py
RUN pip install ".[deepspeed]" && pip uninstall -y fitdist
COPY . .
RUN pip install --no-deps -e ".[deepspeed]" && python -c "import fitdist, deepspeed"

ENTRYPOINT ["bash", "launch/torchrun.sh"]
CMD ["fitdist/configs/fmnist-fitnets.yaml", "strategy.kind=ddp"]
