#!/usr/bin/env bash
# Stop the local NDIF stack: every process in network namespace ndifvec, by PID.
#
#   bash local_ndif/down.sh
#
# All of those processes were started by up.sh (Redis, moto, the Ray daemons
# and workers, the API), so no other process on the machine is signalled. Each
# gets SIGTERM, and whatever is still alive after the grace period gets SIGKILL.
# Then the namespace is deleted. Exits 0 when nothing was running.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

# NOTE: Ray 2.60's gcs_server (and sometimes the raylet) often outlive SIGTERM,
# because they stall flushing metrics to an agent that has already exited. The
# grace period mostly bounds that wait.
grace_s="${NDIF_DOWN_GRACE_S:-10}"

netns_exists() { ip netns list | grep -qw "$NDIF_NETNS"; }
netns_pids() { ip netns pids "$NDIF_NETNS" 2>/dev/null || true; }

# Remove stack.env and the PID files first, so nothing reads them during shutdown.
rm -f "$NDIF_STACK_HOME/stack.env" "$NDIF_STACK_HOME/stack.env.tmp" "$NDIF_STACK_RUN"/*.pid

if ! netns_exists; then
  echo "[down] netns $NDIF_NETNS does not exist; nothing to stop."
  exit 0
fi

pids="$(netns_pids)"
if [[ -n "$pids" ]]; then
  echo "[down] SIGTERM to $(wc -w <<<"$pids") processes in netns $NDIF_NETNS"
  # shellcheck disable=SC2086  # one argument per PID
  kill -TERM $pids 2>/dev/null || true
  deadline=$(($(date +%s) + grace_s))
  while [[ -n "$(netns_pids)" ]] && (($(date +%s) < deadline)); do
    sleep 0.5
  done
  left="$(netns_pids)"
  if [[ -n "$left" ]]; then
    echo "[down] SIGKILL to $(wc -w <<<"$left") processes still running after ${grace_s}s:"
    for pid in $left; do
      echo "  $pid $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-100)"
    done
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    sleep 1
  fi
fi

left="$(netns_pids)"
if [[ -n "$left" ]]; then
  echo "[down] ERROR: processes survive SIGKILL in netns $NDIF_NETNS: ${left//$'\n'/ }. The namespace is kept." >&2
  exit 1
fi
ip netns delete "$NDIF_NETNS"
echo "[down] stopped; netns $NDIF_NETNS deleted. Logs stay in $NDIF_STACK_LOGS."
