#!/usr/bin/env bash
# Set up the host (scripts/setup.sh) and run the whole test suite as root.
#   scripts/test.sh [pytest arguments]      default: lint, then the whole tests/ directory
# pytest runs from a directory outside the checkout with PYTHONSAFEPATH=1,
# so that it and every python the tests start import the package installed
# in .venv, never the checkout's bpfkeep/ (tests/test_installed.py checks).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
bash scripts/setup.sh
args=()
for a in "$@"; do  # test paths given relative to the checkout
    if [ -e "${a%%::*}" ]; then a="$repo/$a"; fi
    args+=("$a")
done
if [ ${#args[@]} -eq 0 ]; then
    # The whole suite (what CI runs) starts with the format and lint check:
    # ruff and clang-format, under a second.
    bash scripts/lint.sh
    args=("$repo/tests")
fi
cd /
export PYTHONSAFEPATH=1
exec "$repo/.venv/bin/pytest" -q -p no:cacheprovider --rootdir="$repo" -c "$repo/pyproject.toml" \
    "${args[@]}"
