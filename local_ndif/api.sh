#!/usr/bin/env bash
# Stop or start only the NDIF API of a running local stack, to test how clients
# ride out an API restart. Redis, Ray, the controller and the models stay up.
#
#   bash local_ndif/api.sh stop     # TERM the API (gunicorn), KILL after 20 s
#   bash local_ndif/api.sh start    # start it again and wait for GET /status = 200
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
pid_file="$NDIF_STACK_RUN/api.pid"

case "${1:-}" in
  stop)
    [[ -f "$pid_file" ]] || { echo "api.sh: no API PID file at $pid_file; is the stack up?" >&2; exit 1; }
    pid="$(cat "$pid_file")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pid_file"
    echo "NDIF API (PID $pid) stopped"
    ;;
  start)
    [[ ! -f "$pid_file" ]] || { echo "api.sh: the API is already running (PID $(cat "$pid_file"))" >&2; exit 1; }
    # Same command as up.sh, from NDIF_STACK_HOME so the server cannot import the client package.
    cd "$NDIF_STACK_HOME"
    GUNICORN_CMD_ARGS="--bind 127.0.0.1:$NDIF_API_PORT" setsid ip netns exec "$NDIF_NETNS" \
      ndif start --foreground api >>"$NDIF_STACK_LOGS/api.log" 2>&1 </dev/null &
    echo $! >"$pid_file"
    deadline=$(($(date +%s) + ${NDIF_UP_API_TIMEOUT_S:-120}))
    # /connected returns 200 before the API has reconnected to Ray; /status returns 503 until then.
    until [[ "$(ip netns exec "$NDIF_NETNS" curl -s -o /dev/null -w '%{http_code}' "$NDIF_API_URL/status")" == 200 ]]; do
      if (($(date +%s) >= deadline)); then
        echo "api.sh: $NDIF_API_URL/status did not return 200 in time; read $NDIF_STACK_LOGS/api.log" >&2
        exit 1
      fi
      sleep 0.5
    done
    echo "NDIF API up at $NDIF_API_URL"
    ;;
  *)
    echo "usage: bash local_ndif/api.sh stop|start" >&2
    exit 2
    ;;
esac
