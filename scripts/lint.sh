#!/usr/bin/env bash
# Format and lint everything: ruff for Python, clang-format for C.
#   scripts/lint.sh          check only (CI)
#   scripts/lint.sh --fix    rewrite files
set -euo pipefail
cd "$(dirname "$0")/.."
ruff=.venv/bin/ruff
c_files=(bpf/*.c bpf/bpfkeep.h preload/*.c preload/*.h tests/progs/*.c tests/preload_helpers/*.c bench/*.c)
# bpf/bpfkeep_options.h and preload/bpfkeep_options.h are generated.
if [ "${1:-}" = --fix ]; then
    "$ruff" format bpfkeep tests bench setup.py
    "$ruff" check --fix bpfkeep tests bench setup.py
    command -v clang-format >/dev/null && clang-format -i "${c_files[@]}"
else
    "$ruff" format --check bpfkeep tests bench setup.py
    "$ruff" check bpfkeep tests bench setup.py
    if command -v clang-format >/dev/null; then
        clang-format --dry-run --Werror "${c_files[@]}"
    fi
fi
