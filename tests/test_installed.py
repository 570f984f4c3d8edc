"""The suite tests the installed package, not the checkout.

``pip install`` must ship the BPF sources, the option header and
libbpfkeep.so; the tests run the venv's ``bpfkeep`` console script from a
directory outside the checkout, so a missing package-data entry makes the
kernel, preload and exec tests fail.  These tests make sure that stays so:
if pytest or a ``python -c`` it starts imported the checkout's bpfkeep/,
the source tree would silently stand in for the package.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import BPFKEEP, REPO

import bpfkeep

SOURCE_PKG = REPO / "bpfkeep"  # the checkout's package (the venv may live in REPO)


def _installed_dir() -> Path:
    return Path(bpfkeep.__file__).resolve().parent


def _under(path: Path, top: Path) -> bool:
    return path.resolve().is_relative_to(top.resolve())


def test_pytest_imports_the_installed_package():
    where = _installed_dir()
    assert not _under(where, SOURCE_PKG), (
        f"pytest imported bpfkeep from the checkout ({where}): run it from outside "
        "the checkout (scripts/test.sh does) or with PYTHONSAFEPATH=1"
    )
    assert _under(where, Path(sys.prefix)), f"bpfkeep at {where}, not in the venv {sys.prefix}"


def test_processes_the_tests_start_import_the_installed_package():
    out = subprocess.run(
        [sys.executable, "-c", "import bpfkeep; print(bpfkeep.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert not _under(Path(out), SOURCE_PKG), f"python -c imported the checkout's {out}"
    assert Path(out).resolve().parent == _installed_dir()


def test_the_cli_the_tests_run_is_the_venvs_console_script():
    script = Path(BPFKEEP)
    assert script.is_file() and os.access(script, os.X_OK), f"{script} missing"
    first = script.read_text().splitlines()[0]
    assert first == f"#!{sys.executable}" or first.endswith(sys.executable), first
    proc = subprocess.run([BPFKEEP, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert bpfkeep.__version__ in proc.stdout + proc.stderr


def test_installed_package_has_bpf_sources_header_and_shim():
    pkg = _installed_dir()
    shipped = pkg / "_bpf"
    sources = sorted(p.name for p in (REPO / "bpf").iterdir() if p.suffix in (".c", ".h"))
    assert "bpfkeep_options.h" in sources and any(s.endswith(".bpf.c") for s in sources)
    extra = sorted(p.name for p in shipped.iterdir() if p.name not in sources)
    assert not extra, f"the installed package has BPF sources the checkout has not: {extra}"
    for name in sources:
        f = shipped / name
        assert f.is_file(), f"{name} is not in the installed package ({shipped})"
        assert f.read_bytes() == (REPO / "bpf" / name).read_bytes(), (
            f"installed {name} differs from the checkout's: reinstall (pip install .)"
        )
    lib = pkg / "_lib" / "libbpfkeep.so"
    assert lib.is_file(), f"libbpfkeep.so is not in the installed package ({lib})"
    assert lib.read_bytes()[:4] == b"\x7fELF"

    # And the program uses those copies, not the source tree's.
    from bpfkeep import preload
    from bpfkeep.progs import loader

    assert loader.bpf_dir().resolve() == shipped.resolve()
    env = {k: v for k, v in os.environ.items() if k != preload.LIB_ENV}
    assert preload.library_path(env) == lib


def _imported_top_level(pkg: Path) -> set[str]:
    names = set()
    for src in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(src.read_text(), str(src))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def test_runtime_dependencies_are_what_the_program_imports():
    """Declared runtime requirements == third-party modules the installed
    package imports anywhere (bcc comes from Debian's python3-bpfcc)."""
    third_party = _imported_top_level(_installed_dir()) - set(sys.stdlib_module_names)
    third_party -= {"bpfkeep", "bcc"}
    by_module = importlib.metadata.packages_distributions()
    imported = {_norm(d) for m in third_party for d in by_module.get(m, [m])}
    declared = {
        _norm(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0])
        for r in importlib.metadata.requires("bpfkeep") or []
        if "extra ==" not in r
    }
    assert declared == imported, (
        f"pyproject dependencies {sorted(declared)} but the program imports {sorted(imported)}"
    )
