#!/usr/bin/env bash
# Set up the host (scripts/setup.sh) and run the whole test suite as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
