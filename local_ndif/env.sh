# shellcheck shell=bash
# Environment of the local NDIF stack: paths, ports and the settings the NDIF
# processes read. Sourced by install.sh, up.sh and down.sh; tests source the
# stack.env that up.sh writes instead.
#
# NDIF_STACK_HOME (default <repo>/.ndif-stack) contains the server venv, logs,
# PID files and the Ray and NDIF state, so a clean clone starts from nothing.

NDIF_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export NDIF_REPO
export NDIF_STACK_HOME="${NDIF_STACK_HOME:-$NDIF_REPO/.ndif-stack}"
export NDIF_SERVER_VENV="$NDIF_STACK_HOME/server-venv"
export NDIF_STACK_LOGS="$NDIF_STACK_HOME/logs"
export NDIF_STACK_RUN="$NDIF_STACK_HOME/run"
# Python of the client side (the package and nnsight 0.8.1) for readiness checks.
export NDIF_CLIENT_PYTHON="${NDIF_CLIENT_PYTHON:-$NDIF_REPO/.venv/bin/python}"

# Network namespace with only a loopback interface. Ray looks up its own IP by
# probing an outside address, and inside this namespace it finds only 127.0.0.1.
export NDIF_NETNS=ndifvec

# Ports, all bound to 127.0.0.1 inside the namespace.
export NDIF_REDIS_PORT=6379
export NDIF_S3_PORT=9000
export NDIF_RAY_HEAD_PORT=6385
export NDIF_RAY_CLIENT_PORT=10001
export NDIF_API_PORT=8001

# Variables read by the NDIF processes (ndif 0.1.2).
export NDIF_HOME="$NDIF_STACK_HOME/ndif-home"
export NDIF_REDIS_URL="redis://127.0.0.1:$NDIF_REDIS_PORT"
export NDIF_OBJECT_STORE_URL="http://127.0.0.1:$NDIF_S3_PORT"
# moto accepts any key pair, so these are not secrets.
export NDIF_OBJECT_STORE_ACCESS_KEY=local NDIF_OBJECT_STORE_SECRET_KEY=local
export NDIF_RAY_ADDRESS="ray://127.0.0.1:$NDIF_RAY_CLIENT_PORT"
export NDIF_API_URL="http://127.0.0.1:$NDIF_API_PORT"
# The controller builds model actors from this class (see cpu_actor.py).
export NDIF_MODEL_IMPORT_PATH=cpu_actor.CPUModelActor
export NDIF_DEFAULT_DTYPE=float32
export NDIF_DEFAULT_PADDING_BIAS=0

# Model loading is offline: models come from local directories.
export HF_HOME="$NDIF_STACK_HOME/hf-home"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export RAY_USAGE_STATS_ENABLED=0 GRPC_ENABLE_FORK_SUPPORT=0

# The server venv's `ray`, `ndif` and `python` come first on PATH for the server
# processes. The Ray workers import cpu_actor.py from local_ndif/.
export PATH="$NDIF_SERVER_VENV/bin:$PATH"
export PYTHONPATH="$NDIF_REPO/local_ndif"
