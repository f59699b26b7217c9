#!/usr/bin/env bash
# Set the machine up (idempotent), then run the whole test suite against real containers,
# real CRIU and real kernel networking. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/scripts/setup.sh"
cd "$ROOT"
.venv/bin/ruff check vzbackup migrate storage scheduler tests bench
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
