#!/usr/bin/env bash
# Start the local NDIF stack in network namespace ndifvec and deploy the models.
#
#   bash local_ndif/up.sh [MODELS_DIR]
#
# MODELS_DIR contains one transformers directory per model (a subdirectory with a
# config.json); every one of them is deployed. Without the argument the test
# models are written to $NDIF_STACK_HOME/models by scripts/make_test_models.py.
#
# Order: Redis and the moto S3 store, the Ray head and NDIF controller, the API
# (health: GET /connected returns 200), `ndif deploy`, then a remote trace on
# each model from the client venv. On success it writes $NDIF_STACK_HOME/stack.env
# for the tests. On failure it prints the log to read, stops the processes it
# started (set NDIF_KEEP_ON_FAILURE=1 to keep them) and exits non-zero.
#
# Needs root (ip netns), local_ndif/install.sh run once, and the client venv
# ($NDIF_CLIENT_PYTHON, default <repo>/.venv/bin/python) with nnsight 0.8.1.
# -E: the ERR trap below also fires inside functions.
set -Eeuo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

# Timeouts in seconds, each measured from the start of its own step.
infra_timeout="${NDIF_UP_INFRA_TIMEOUT_S:-30}"
ray_timeout="${NDIF_UP_RAY_TIMEOUT_S:-180}"
api_timeout="${NDIF_UP_API_TIMEOUT_S:-120}"
deploy_timeout="${NDIF_UP_DEPLOY_TIMEOUT_S:-600}"
ready_timeout="${NDIF_UP_READY_TIMEOUT_S:-300}"

# Logical resources the Ray head advertises. The controller places each model on
# a GPU by `cuda_memory_bytes`, so one logical GPU replaces the missing card,
# and the CPU actor ignores the GPU id it gets. Each model actor and the controller
# reserve one logical CPU, so the count is above the 2 real cores of a CI machine.
ray_num_cpus="${NDIF_RAY_NUM_CPUS:-4}"
ray_cuda_memory_bytes="${NDIF_RAY_CUDA_MEMORY_BYTES:-8589934592}"
# Ray puts Unix sockets under its temp dir, and a socket path may not exceed 107
# bytes, so the default is short instead of under NDIF_STACK_HOME.
ray_temp_dir="${NDIF_RAY_TEMP_DIR:-/tmp/ndifvec-ray}"

started_ns=$(date +%s%N)
elapsed() {
  local tenths=$((($(date +%s%N) - started_ns) / 100000000))
  printf '%4d.%ds' $((tenths / 10)) $((tenths % 10))
}
log() { printf '[up %s] %s\n' "$(elapsed)" "$*"; }
in_netns() { ip netns exec "$NDIF_NETNS" "$@"; }

fail() {
  printf '[up] ERROR: %s\n' "$1" >&2
  if [[ "${NDIF_KEEP_ON_FAILURE:-0}" == 1 ]]; then
    printf '[up] The processes are still running (NDIF_KEEP_ON_FAILURE=1); stop them with local_ndif/down.sh.\n' >&2
  else
    printf '[up] Stopping what was started; logs stay in %s.\n' "$NDIF_STACK_LOGS" >&2
    bash "$here/down.sh" >&2 || true
  fi
  exit 1
}
trap 'fail "command failed at line $LINENO: $BASH_COMMAND"' ERR

# Poll CONDITION (a shell command) every half second until it succeeds or
# TIMEOUT seconds pass. On timeout, fail with WHAT and the LOG to read.
wait_for() {
  local what="$1" timeout="$2" log_file="$3" condition="$4"
  local deadline=$(($(date +%s) + timeout))
  until eval "$condition" >/dev/null 2>&1; do
    if (($(date +%s) >= deadline)); then
      fail "$what did not come up within ${timeout}s. Read $log_file (last lines below).
$(tail -n 20 "$log_file" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g')"
    fi
    sleep 0.5
  done
}

# Start COMMAND detached inside the namespace, output to LOG, PID to run/NAME.pid.
# `ip netns exec` and setsid both exec without forking here (a background job of
# a script is no process group leader), so $! is the server's own PID.
start_in_netns() {
  local name="$1"
  shift
  setsid ip netns exec "$NDIF_NETNS" "$@" >"$NDIF_STACK_LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$NDIF_STACK_RUN/$name.pid"
}

# --- preconditions ---------------------------------------------------------
[[ $EUID -eq 0 ]] || fail "up.sh must run as root, because it creates a network namespace."
[[ -x "$NDIF_SERVER_VENV/bin/ndif" ]] ||
  fail "server venv $NDIF_SERVER_VENV is missing; run local_ndif/install.sh first."
[[ -x "$NDIF_CLIENT_PYTHON" ]] ||
  fail "client Python $NDIF_CLIENT_PYTHON not found; create the project venv or set NDIF_CLIENT_PYTHON."
if ip netns list | grep -qw "$NDIF_NETNS" && [[ -n "$(ip netns pids "$NDIF_NETNS")" ]]; then
  trap - ERR
  echo "[up] ERROR: the stack is already running (processes in netns $NDIF_NETNS); run local_ndif/down.sh first." >&2
  exit 1
fi

mkdir -p "$NDIF_STACK_LOGS" "$NDIF_STACK_RUN" "$NDIF_HOME"
# The servers inherit this working directory, and Python puts it on sys.path of
# the Ray workers: started from the repo root, they could import the client package.
cd "$NDIF_STACK_HOME"
rm -f "$NDIF_STACK_HOME/stack.env" "$NDIF_STACK_RUN"/*.pid
rm -rf "$ray_temp_dir"

# --- models ----------------------------------------------------------------
if [[ $# -ge 1 ]]; then
  models_dir="$(cd "$1" && pwd)"
else
  models_dir="$NDIF_STACK_HOME/models"
  log "writing the test models to $models_dir"
  "$NDIF_CLIENT_PYTHON" "$NDIF_REPO/scripts/make_test_models.py" "$models_dir" \
    >"$NDIF_STACK_LOGS/make-test-models.log" 2>&1 ||
    fail "scripts/make_test_models.py failed; read $NDIF_STACK_LOGS/make-test-models.log."
fi

# models.yaml with a precomputed model_key and size_bytes per model: ndif 0.1.2
# would otherwise size the model through nnsight 0.8.1 (a TypeError) and build
# the key with a Hub lookup, which fails offline. The key must equal, byte for
# byte, what nnsight's TransformersModel(dir, task="text-generation")
# .to_model_key() sends: check_client.py verifies that.
"$NDIF_SERVER_VENV/bin/python" - "$models_dir" "$NDIF_STACK_HOME/models.yaml" \
  "$NDIF_STACK_HOME/model-keys.env" <<'PY' || fail "could not write models.yaml for $models_dir."
import json, re, sys
from pathlib import Path

import yaml

models_dir, yaml_path, keys_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
model_dirs = sorted(
    d for d in models_dir.iterdir()
    if (d / "config.json").is_file() and not d.name.endswith(".partial")
)
if not model_dirs:
    sys.exit(f"no model directories (with config.json) in {models_dir}")

deployments, env_lines = [], []
for model_dir in model_dirs:
    identity = {"repo_id": str(model_dir), "revision": None, "task": "text-generation"}
    key = "nnsight.modeling.transformers.TransformersModel:" + json.dumps(identity)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    weights = weights or sum(f.stat().st_size for f in model_dir.glob("*.bin"))
    if not weights:
        sys.exit(f"{model_dir} has no *.safetensors or *.bin weights")
    deployments.append({
        "checkpoint": str(model_dir),
        "task": "text-generation",
        "model_key": key,
        "size_bytes": weights,
        "dtype": "float32",
        "actor_class": "cpu_actor.CPUModelActor",
        # A pinned deployment is exempt from the controller's eviction, so no test waits for a reload.
        "pinned": True,
    })
    name = re.sub(r"[^A-Za-z0-9]+", "_", model_dir.name).upper()
    env_lines.append(f"NDIF_MODEL_KEY_{name}='{key}'")
yaml_path.write_text(yaml.safe_dump({"models": deployments}, sort_keys=False))
keys_path.write_text("\n".join(env_lines) + "\n")
PY

# --- network namespace ------------------------------------------------------
if ! ip netns list | grep -qw "$NDIF_NETNS"; then
  ip netns add "$NDIF_NETNS"
fi
in_netns ip link set lo up
log "netns $NDIF_NETNS ready (loopback only)"

# --- Redis and the S3 store -------------------------------------------------
start_in_netns redis redis-server --bind 127.0.0.1 --port "$NDIF_REDIS_PORT" \
  --save "" --appendonly no --protected-mode yes --daemonize no
start_in_netns moto "$NDIF_SERVER_VENV/bin/moto_server" -H 127.0.0.1 -p "$NDIF_S3_PORT"
wait_for "Redis" "$infra_timeout" "$NDIF_STACK_LOGS/redis.log" \
  'in_netns redis-cli -h 127.0.0.1 -p "$NDIF_REDIS_PORT" ping | grep -q PONG'
wait_for "moto S3 server" "$infra_timeout" "$NDIF_STACK_LOGS/moto.log" \
  'in_netns curl -sf -o /dev/null "http://127.0.0.1:$NDIF_S3_PORT/"'
log "redis on :$NDIF_REDIS_PORT and moto (S3) on :$NDIF_S3_PORT up"

# --- Ray head and NDIF controller -------------------------------------------
# Adapted from ndif/services/ray/start.sh (head branch): every address is
# 127.0.0.1 and the resources include the logical GPU described above.
# `ray start` daemonizes, and its processes stay in the namespace for down.sh.
cpu_memory_bytes=$("$NDIF_SERVER_VENV/bin/python" -c 'import psutil; print(psutil.virtual_memory().total)')
resources="{\"head\": 10, \"cuda_memory_bytes\": $ray_cuda_memory_bytes, \"cpu_memory_bytes\": $cpu_memory_bytes}"
ray_log="$NDIF_STACK_LOGS/ray-start.log"
(
  unset RAY_ADDRESS
  timeout "$ray_timeout" ip netns exec "$NDIF_NETNS" ray start --head \
    --node-ip-address=127.0.0.1 \
    --num-cpus="$ray_num_cpus" --num-gpus=1 --resources="$resources" \
    --object-store-memory=1000000000 \
    --port="$NDIF_RAY_HEAD_PORT" --ray-client-server-port="$NDIF_RAY_CLIENT_PORT" \
    --include-dashboard=true --dashboard-host=127.0.0.1 \
    --disable-usage-stats --temp-dir="$ray_temp_dir"
) >"$ray_log" 2>&1 </dev/null || fail "ray start failed; read $ray_log and $ray_temp_dir/session_latest/logs/."
ln -sfn "$ray_temp_dir/session_latest/logs" "$NDIF_STACK_LOGS/ray"
log "ray head up (resources $resources)"

# The launcher schedules the detached Controller actor and exits.
controller_log="$NDIF_STACK_LOGS/controller-launch.log"
RAY_ADDRESS="127.0.0.1:$NDIF_RAY_HEAD_PORT" timeout "$ray_timeout" \
  ip netns exec "$NDIF_NETNS" python -m ndif.services.ray.deployments.controller.controller \
  >"$controller_log" 2>&1 </dev/null ||
  fail "the NDIF controller launcher failed; read $controller_log and $NDIF_STACK_LOGS/ray/."
log "NDIF controller launched"

# --- API ---------------------------------------------------------------------
# `ndif start --foreground api` execs gunicorn, so the PID file is gunicorn's.
# GUNICORN_CMD_ARGS overrides the bind address of NDIF's gunicorn config.
GUNICORN_CMD_ARGS="--bind 127.0.0.1:$NDIF_API_PORT" start_in_netns api ndif start --foreground api
wait_for "the NDIF API (GET $NDIF_API_URL/connected)" "$api_timeout" "$NDIF_STACK_LOGS/api.log" \
  '[[ "$(in_netns curl -s -o /dev/null -w "%{http_code}" "$NDIF_API_URL/connected")" == 200 ]]'
log "API up: GET $NDIF_API_URL/connected returns 200"

# --- deploy ----------------------------------------------------------------
deploy_log="$NDIF_STACK_LOGS/deploy.log"
timeout "$deploy_timeout" ip netns exec "$NDIF_NETNS" ndif deploy -f "$NDIF_STACK_HOME/models.yaml" \
  >"$deploy_log" 2>&1 </dev/null ||
  fail "ndif deploy failed or timed out after ${deploy_timeout}s; read $deploy_log and $NDIF_STACK_LOGS/ray/ (worker-*.err)."
log "ndif deploy reports every model READY"

# --- readiness: a remote trace on each model from the client venv -----------
# stack.env is written to a temporary name first, so tests never read a
# stack.env for a stack that has not passed this check.
stack_env="$NDIF_STACK_HOME/stack.env"
{
  echo "# Written by local_ndif/up.sh; source it (set -a) to reach the local NDIF stack."
  echo "# Run clients inside the namespace: ip netns exec $NDIF_NETNS ..."
  echo "NDIF_NETNS=$NDIF_NETNS"
  echo "NDIF_HOST=$NDIF_API_URL"
  echo "NDIF_TEST_MODELS_DIR=$models_dir"
  cat "$NDIF_STACK_HOME/model-keys.env"
} >"$stack_env.tmp"
ready_log="$NDIF_STACK_LOGS/readiness.log"
(
  set -a
  # shellcheck source=/dev/null
  source "$stack_env.tmp"
  set +a
  # The client must not import the server's PYTHONPATH (cpu_actor.py).
  PYTHONPATH="" timeout "$ready_timeout" ip netns exec "$NDIF_NETNS" \
    "$NDIF_CLIENT_PYTHON" "$here/check_client.py" --remote-only --wait "$ready_timeout"
) >"$ready_log" 2>&1 </dev/null ||
  fail "a model did not answer a remote trace; read $ready_log and $NDIF_STACK_LOGS/ray/ (worker-*.err)."
mv "$stack_env.tmp" "$stack_env"
log "every model answered a remote trace"

echo
echo "Local NDIF is up in netns $NDIF_NETNS."
echo "  API:      $NDIF_API_URL"
echo "  stack:    $stack_env"
echo "  logs:     $NDIF_STACK_LOGS"
echo "  models:"
sed -n 's/^NDIF_MODEL_KEY_\([A-Z0-9_]*\)=.\(.*\).$/    \1: \2/p' "$NDIF_STACK_HOME/model-keys.env"
echo "Stop it with: bash local_ndif/down.sh"
