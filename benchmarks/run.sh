#!/usr/bin/env bash
# Run the benchmark as documented in docs/benchmarks.md: install the compared library,
# start the local NDIF stack unless it is already up, run every contender inside the
# stack's network namespace, and stop the stack again if this script started it.
#
#   bash benchmarks/run.sh [benchmarks/run.py ARGS...]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="$repo/.venv/bin/python"
stack_home="${NDIF_STACK_HOME:-$repo/.ndif-stack}"

# steering-vectors 0.12.2 declares transformers<5; it runs on 5.22 without its pins,
# so it is installed without dependencies plus the one it imports that is missing.
"$python" -m pip install --quiet --no-deps steering-vectors==0.12.2
"$python" -m pip install --quiet scikit-learn

started_stack=0
if [[ ! -f "$stack_home/stack.env" ]]; then
  bash local_ndif/install.sh
  bash local_ndif/up.sh
  started_stack=1
fi
stop_stack() {
  if [[ $started_stack == 1 ]]; then bash "$repo/local_ndif/down.sh"; fi
}
trap stop_stack EXIT

set -a
# shellcheck source=/dev/null
source "$stack_home/stack.env"
HF_HUB_OFFLINE=1
set +a
ip netns exec ndifvec "$python" benchmarks/run.py "$@"
