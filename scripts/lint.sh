#!/usr/bin/env bash
# Format and lint everything: ruff for Python, clang-format for C.
#   scripts/lint.sh          check only (CI)
#   scripts/lint.sh --fix    rewrite files
set -euo pipefail
cd "$(dirname "$0")/.."
ruff=.venv/bin/ruff
if ! command -v clang-format >/dev/null; then
    echo "lint.sh: clang-format is missing: apt-get install clang-format (scripts/setup.sh does)" >&2
    exit 1
fi
if [ ! -x "$ruff" ]; then
    echo "lint.sh: $ruff is missing: run scripts/setup.sh (installs the dev extra)" >&2
    exit 1
fi
c_files=(bpf/*.c bpf/bpfkeep.h bpf/bypass.h bpf/common.bpf.h preload/*.c preload/*.h tests/progs/*.c tests/preload_helpers/*.c bench/*.c)
# bpf/bpfkeep_options.h and preload/bpfkeep_options.h are generated.
if [ "${1:-}" = --fix ]; then
    "$ruff" format bpfkeep tests bench setup.py
    "$ruff" check --fix bpfkeep tests bench setup.py
    clang-format -i "${c_files[@]}"
else
    "$ruff" format --check bpfkeep tests bench setup.py
    "$ruff" check bpfkeep tests bench setup.py
    clang-format --dry-run --Werror "${c_files[@]}"
fi
