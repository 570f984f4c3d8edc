#!/usr/bin/env bash
# Format and lint everything: ruff for Python, clang-format for C.
#   scripts/lint.sh          check only (CI)
#   scripts/lint.sh --fix    rewrite files
set -euo pipefail
cd "$(dirname "$0")/.."
ruff=.venv/bin/ruff
c_files=(bpf/*.c bpf/bpfkeep.h preload/*.c tests/progs/*.c)
# bpf/bpfkeep_options.h and preload/bpfkeep_options.h are generated.
if [ "${1:-}" = --fix ]; then
    "$ruff" format bpfkeep tests setup.py
    "$ruff" check --fix bpfkeep tests setup.py
    command -v clang-format >/dev/null && clang-format -i "${c_files[@]}"
else
    "$ruff" format --check bpfkeep tests setup.py
    "$ruff" check bpfkeep tests setup.py
    if command -v clang-format >/dev/null; then
        clang-format --dry-run --Werror "${c_files[@]}"
    fi
fi
