#!/usr/bin/env bash
# The project's full test run, as CI does it: install and start the local NDIF stack,
# run every test inside its network namespace, stop the stack whatever happened.
#
#   bash local_ndif/run_tests.sh [PYTEST ARGS...]
#
# Exits with pytest's status, so a failed test, or no test run at all (status 5),
# fails the run.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
client_python="$repo/.venv/bin/python"

bash local_ndif/install.sh
bash local_ndif/up.sh
trap 'bash "$repo/local_ndif/down.sh"' EXIT

stack_home="${NDIF_STACK_HOME:-$repo/.ndif-stack}"
set -a
# shellcheck source=/dev/null
source "$stack_home/stack.env"
NDIF_STACK_HOME="$stack_home"
# The namespace has no route out; nothing may try the Hub.
HF_HUB_OFFLINE=1
set +a

status=0
ip netns exec ndifvec "$client_python" -m pytest -v -rfE "$@" || status=$?
exit "$status"
