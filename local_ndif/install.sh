#!/usr/bin/env bash
# Install what the local NDIF stack needs: Debian packages (Redis, iproute2 for
# `ip netns`, curl for health checks) and the server virtualenv on Python 3.12.
#
#   bash local_ndif/install.sh
#
# Idempotent: a marker file records the pinned versions of a finished install,
# so a rerun with the same pins only checks the apt packages and returns.
# Runs as root (apt-get and, later, `ip netns` need it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

# Pins of the server venv. ndif 0.1.2 requires Python 3.12 or 3.13.
# transformers 5.23 and later break nnsight 0.8.1, and nnsight must match the
# client's 0.8.1 because the request payload is nnsight's own serialization.
# torch 2.13.0 from PyPI is a CUDA build, which also runs on a CPU-only machine.
server_pins=(
  "torch==2.13.0"
  "ndif[api,ray]==0.1.2"
  "nnsight==0.8.1"
  "transformers==5.22.2"
  "moto[server]"
  "gguf"
)
marker="$NDIF_SERVER_VENV/.ndif-vectors-installed"
marker_text="$(printf '%s\n' "${server_pins[@]}")"

log() { printf '[install] %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------
missing=()
# redis-cli (the health check) comes with redis-server as a dependency.
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || missing+=(redis-server)
command -v ip >/dev/null || missing+=(iproute2)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  # A system Redis that the package may start does not conflict: the stack's own
  # Redis listens inside the network namespace.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  log "apt packages present (redis-server, redis-cli, ip, curl)"
fi

# --- server virtualenv ------------------------------------------------------
if [[ -f "$marker" && "$(cat "$marker")" == "$marker_text" ]]; then
  log "server venv up to date: $NDIF_SERVER_VENV"
  exit 0
fi

# Find a Python 3.12. `python3.12` may be a pyenv shim that fails when 3.12 is
# not the active pyenv version, so each candidate is run before it is chosen.
find_python312() {
  local candidate
  for candidate in "${NDIF_SERVER_PYTHON:-}" python3.12 \
    "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
    /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [[ -n "$candidate" ]] || continue
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$candidate" || echo "$candidate"
      return 0
    fi
  done
  return 1
}
if ! python312="$(find_python312)"; then
  echo "install.sh: no working Python 3.12 found (tried \$NDIF_SERVER_PYTHON, python3.12," \
    "pyenv versions, /usr/bin, /usr/local/bin). Install Python 3.12 or set" \
    "NDIF_SERVER_PYTHON=/path/to/python3.12." >&2
  exit 1
fi
log "server Python: $python312"

rm -rf "$NDIF_SERVER_VENV"
"$python312" -m venv "$NDIF_SERVER_VENV"
"$NDIF_SERVER_VENV/bin/pip" install -q --upgrade pip
log "pip install ${server_pins[*]} (torch's CUDA wheels are about 2.7 GB: several minutes)"
"$NDIF_SERVER_VENV/bin/pip" install -q "${server_pins[@]}"

# Fail now, not at `up.sh`, if the resolver moved a pin the server depends on.
"$NDIF_SERVER_VENV/bin/python" - <<'PY'
from importlib.metadata import version
expected = {"ndif": "0.1.2", "nnsight": "0.8.1", "transformers": "5.22.2", "torch": "2.13.0"}
found = {name: version(name) for name in expected}
wrong = {n: v for n, v in found.items() if not v.startswith(expected[n])}
if wrong:
    raise SystemExit(f"server venv has unexpected versions {wrong}; expected {expected}")
print("[install] server venv versions:", found)
PY
printf '%s\n' "$marker_text" >"$marker"
log "done: $NDIF_SERVER_VENV"
