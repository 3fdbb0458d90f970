#!/usr/bin/env bash
# `fitdist train` under torchrun, on one node or several; DDP and DeepSpeed configs alike (the
# config's strategy.kind decides). Arguments pass through to `fitdist train`:
#   launch/torchrun.sh CONFIG.yaml [key=value ...] [--resume]
# Environment:
#   NPROC          processes per node (default: the node's GPU count, else 1)
#   NNODES         number of nodes (default 1: a standalone rendezvous on a free local port)
#   RDZV_ENDPOINT  host[:port] of a c10d rendezvous (multi-node; node ranks are assigned)
#   RDZV_ID        job id shared by the nodes of one c10d rendezvous (default: fitdist)
#   NODE_RANK, MASTER_ADDR, MASTER_PORT   a static multi-node rendezvous instead (port 29500)
#   LOCAL_ADDR     address this node advertises (default: its hostname)
#   MAX_RESTARTS   elastic restarts after a worker dies (default 0); restarted workers resume from
#                  the run's last checkpoint (run.resume=auto is added when MAX_RESTARTS > 0)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives the workers between the SIGTERM it forwards and SIGKILL
#                  (default 120): a preempted run finishes its step, agrees within
#                  run.preempt_check_every steps and saves its checkpoint inside this grace
#   CACHE_ROOT     node-local directory for Triton's and the inductor's compile caches (default
#                  $SLURM_TMPDIR, $TMPDIR or /tmp, then fitdist-$USER); TRITON_CACHE_DIR and
#                  TORCHINDUCTOR_CACHE_DIR, when set, win
#   PYTHON         interpreter with fitdist installed (default: $VENV or <repo>/.venv, else python3)
set -euo pipefail

# the interpreter: $PYTHON, else the virtual environment launch/setup.sh makes, else python3
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/.venv}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$venv/bin/python" ]; then PYTHON="$venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
NNODES="${NNODES:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

# SIGUSR1 too (what SLURM's --signal sends): fitdist saves and exits 75 on either
args=(--nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}"
      --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  args+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-fitdist}")
elif [ "$NNODES" -gt 1 ]; then
  : "${NODE_RANK:?multi-node needs NODE_RANK (with MASTER_ADDR) or RDZV_ENDPOINT}"
  : "${MASTER_ADDR:?multi-node needs MASTER_ADDR (with NODE_RANK) or RDZV_ENDPOINT}"
  args+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
         --master-port "${MASTER_PORT:-29500}")
else
  args+=(--standalone)
fi
if [ -n "${LOCAL_ADDR:-}" ]; then
  args+=(--local-addr "$LOCAL_ADDR")
fi

extra=()
if [ "$MAX_RESTARTS" -gt 0 ]; then
  extra+=(run.resume=auto)  # a restarted worker group continues from the latest checkpoint
  # A fresh store per restart: in the store torchrun shares across restarts, a restarted rank can
  # read the address its dead predecessor published and fail to connect (pytorch/pytorch#135712).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
fi

# Compile caches on node-local disk: every rank of every node writing one cache in a shared home
# directory is slow and races on NFS.
cache_root="${CACHE_ROOT:-${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/fitdist-${USER:-$(id -u)}}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$cache_root/triton}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$cache_root/inductor}"

# One intra-op thread per process unless told otherwise (torchrun's own default, said aloud).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
: "${1:?usage: launch/torchrun.sh CONFIG.yaml [key=value ...] [--resume]}"
config="$1"
shift
# Check the config and overrides once, in this one process, before torchrun starts any rank: a typo
# then exits 2 with one line, not one error per rank plus torchrun's traceback (no data is read and
# no weights loaded). slurm.sbatch checks once per job and sets FITDIST_CHECKED for its nodes.
if [ -z "${FITDIST_CHECKED:-}" ]; then
  "$PYTHON" -m fitdist.cli check "$config" ${extra[@]+"${extra[@]}"} "$@" \
    --nproc-per-node "$NPROC" --nnodes "$NNODES" >/dev/null
fi
if [ -n "${FITDIST_CHECK_ONLY:-}" ]; then exit 0; fi
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m fitdist.cli train "$config" ${extra[@]+"${extra[@]}"} "$@"
