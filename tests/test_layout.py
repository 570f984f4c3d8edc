"""One source for what the BPF programs and userspace share: bpf/bpfkeep.h.

bpfkeep.progs.header reads the installed header for its flags, callback and
errno names and struct layouts.  Checked here against the C compiler
(no root), against the BTF the kernel holds for the loaded programs' maps
(root), and the errno buckets against the OS's own errno names.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from bpfkeep.progs import header as bk_header
from bpfkeep.progs import loader
from bpfkeep.progs import maps as bpfmaps
from bpfkeep.progs.header import HeaderError, parse_header

REPO = Path(__file__).resolve().parent.parent
INSTALLED = bk_header.bpf_dir()
# Pinned map -> the struct of its values.
MAP_VALUES = {
    loader.MAP_POLICY: "bk_policy",
    loader.MAP_POLICIES: "bk_policy",
    loader.MAP_COUNTERS: "bk_counters",
    loader.MAP_SK: "bk_sk",
    loader.MAP_SWEEP: "bk_sweep",
    loader.MAP_SWEEPSTATS: "bk_sweepstats",
    loader.MAP_PEERS: "bk_peer",
    loader.MAP_RULES: "bk_rule",
    loader.MAP_LOSSES: "bk_losses",
    loader.MAP_CONFIG: "bk_config",
    loader.MAP_LEARNED: "bk_learned",
    loader.MAP_BYPASS: "bk_bypass",
    loader.MAP_BYPASSED: "bk_bypassed",
    loader.MAP_REPAIRED: "bk_repaired",
}
# Pinned map -> the struct of its keys (where a struct).
MAP_KEYS = {
    loader.MAP_PEERS: "bk_peer_key",
    loader.MAP_RULES: "bk_rule_key",
    loader.MAP_LOSSES: "bk_loss_key",
    loader.MAP_LEARNED: "bk_path_key",
    loader.MAP_BYPASS: "bk_bypass_key",
}
# Records of the ring buffer (no BTF of their own: gcc's layout is checked).
RECORDS = {"bk_loss_event"}


def test_the_installed_header_is_the_one_read():
    assert (INSTALLED / "bpfkeep.h").read_bytes() == (REPO / "bpf" / "bpfkeep.h").read_bytes()
    assert bk_header.header() == bk_header.header(INSTALLED / "bpfkeep.h")
    assert INSTALLED.parent == Path(bk_header.__file__).parent.parent  # the package's own copy
    assert set(MAP_VALUES.values()) | set(MAP_KEYS.values()) | RECORDS == set(
        bk_header.header().structs
    )


def test_layouts_match_the_c_compiler(tmp_path):
    """sizeof and offsetof of every member, as gcc lays out the header."""
    structs = bk_header.header().structs
    lines = []
    for name, layout in structs.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for m in layout.members:
            lines.append(
                f'printf("{name}.{m.name} %zu %zu\\n", offsetof(struct {name}, {m.name}), '
                f"sizeof(((struct {name} *)0)->{m.name}));"
            )
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n"
        '#include "bpfkeep.h"\nint main(void) {\n' + "\n".join(lines) + "\nreturn 0; }\n"
    )
    exe = tmp_path / "layout"
    subprocess.run(["gcc", f"-I{INSTALLED}", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    want = []
    for name, layout in structs.items():
        want.append(f"{name} {layout.size}")
        want += [f"{name}.{m.name} {m.offset} {m.size}" for m in layout.members]
        assert struct.calcsize(layout.fmt) == layout.size
    assert out.split("\n")[:-1] == want


def test_the_old_layout_is_0_1s_header():
    """The one layout kept by hand is history: bpfkeep 0.1's bk_policy,
    read from 0.1's own header."""
    old = parse_header(bk_header._source(REPO / "tests" / "data" / "bpf-0.1" / "bpfkeep.h"))
    fmt = re.sub(r"(?<![0-9])1(?=[A-Za-z])", "", old.struct("bk_policy").fmt)  # 1Q -> Q
    assert fmt == bpfmaps.LEGACY_POLICY_FMT
    assert struct.calcsize(bpfmaps.LEGACY_POLICY_FMT) == old.struct("bk_policy").size


def test_constants_come_from_the_header():
    h = bk_header.header()
    assert h.defines["BK_F_ENFORCE"] == bpfmaps.F_ENFORCE
    assert bpfmaps.CALLBACKS == ("connect", "listen", "passive_established")
    assert len(bpfmaps.ERRNO_BUCKETS) == h.defines["BK_NERR"]
    assert bpfmaps.NOPT == h.defines["BK_NOPT_BPF"] == len(bpfmaps.BPF_OPTIONS)
    # What bpfmaps exports under a header name is the header's value (a
    # flag only the programs use needs no Python name).
    exported = 0
    for name, v in h.defines.items():
        m = re.fullmatch(r"BK_((?:F|SWEEP|SWI|SWR)_\w+)", name)
        if m and hasattr(bpfmaps, m.group(1)):
            assert getattr(bpfmaps, m.group(1)) == v, name
            exported += 1
    assert exported >= 14


def test_errno_buckets_are_the_oss_errno_names():
    """The programs bucket errno by number (bk_err_bucket, in whichever
    installed BPF source defines it); each bucket's name is the OS's name
    of that number.  ENOTSUPP (524) is the kernel's own, never seen by
    userspace."""
    definition = re.compile(r"bk_err_bucket\(int err\)\s*\{(.*?)\n\}", re.S)
    bodies = [
        m.group(1)
        for f in sorted(INSTALLED.iterdir())
        if f.suffix in (".c", ".h") and (m := definition.search(f.read_text()))
    ]
    assert len(bodies) == 1, f"bk_err_bucket defined {len(bodies)} times under {INSTALLED}"
    body = bodies[0]
    cases = re.findall(r"case (\d+):\s*return BK_ERR_(\w+);", body)
    assert sorted(n for _, n in cases) == sorted(b for b in bpfmaps.ERRNO_BUCKETS if b != "other")
    for number, name in cases:
        if name == "ENOTSUPP":
            assert int(number) == 524
        else:
            assert getattr(errno, name) == int(number), (number, name)


def test_bcc_gets_every_source_once_as_one_text():
    """bcc rewrites map calls and finds programs only in the text it is
    handed: the unit with every installed source written in, each once,
    and no "..." include left for the compiler."""
    text = bk_header.unit_text(INSTALLED / loader.SOURCE)
    own_include = re.compile(r'^\s*#\s*include\s+"[^"]+"\s*$', re.M)
    assert not own_include.search(text)
    for f in sorted(INSTALLED.iterdir()):
        if f.suffix in (".c", ".h"):
            for part in own_include.split(f.read_text()):
                if part.strip():
                    assert text.count(part.strip("\n")) == 1, f.name
    for program in ("int bk_sockops(", "int bk_setsockopt(", "BPF_ITER(tcp)"):
        assert text.count(program) == 1, program


def test_sweep_entry_is_the_struct():
    fields = [f.name for f in dataclasses.fields(bpfmaps.SweepEntry)]
    assert fields == [m.name for m in bpfmaps.SWEEP.members]
    e = bpfmaps.SweepEntry(7, bpfmaps.SWEEP_UNDO, 3, val=(1, -1, 2, 3, 4, 5, 6, 7))
    back = bpfmaps.SweepEntry.decode(e.encode())
    assert (back.owner, back.action, back.in_flags, back.val) == (7, 2, 3, e.val)


def test_parser_lays_out_like_c_and_refuses_what_it_cannot_read():
    h = parse_header(
        "#define A 0x2u /* two */\n#define B (A << 2) \\\n  | 1\n#define F(x) x\n"
        '#define S "text"\nstruct s { __u16 a; __u64 b[A][B]; __u8 c; };\n'
    )
    assert h.defines == {"A": 2, "B": 9}
    s = h.struct("s")
    assert [(m.name, m.offset, m.dims) for m in s.members] == [
        ("a", 0, ()),
        ("b", 8, (2, 9)),
        ("c", 152, ()),
    ]
    assert s.size == 160 and struct.calcsize(s.fmt) == 160
    assert s.unpack(s.pack(a=1, b=range(18), c=3)) == {"a": 1, "b": tuple(range(18)), "c": 3}
    for bad in ("struct t { int x; };", "struct t { __u32 x, y; };", "struct t { __u8 x[N]; };"):
        with pytest.raises(HeaderError):
            parse_header(bad)


# -- against the compiled object -------------------------------------------------


def _btf_struct(pin: str, part: str = "value") -> tuple[bk_header.Layout, dict]:
    """The value (or key) type of a pinned map, from the BTF the kernel
    holds: as C (read with the same parser) and as bpftool's JSON (offsets,
    size)."""
    c = subprocess.run(
        ["bpftool", "btf", "dump", "map", "pinned", pin, part, "format", "c"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    raw = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "map", "pinned", pin, part],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (btf,) = [t for t in json.loads(raw)["types"] if t["kind"] == "STRUCT"]
    return parse_header(c).struct(btf["name"]), btf


@pytest.mark.kernel
@pytest.mark.parametrize("pinned", sorted(MAP_VALUES))
def test_layouts_match_the_loaded_programs_btf(shared_objects, pinned):
    pin = os.path.join(shared_objects, pinned)
    ours = bk_header.header().struct(MAP_VALUES[pinned])
    theirs, btf = _btf_struct(pin)
    assert theirs == ours
    assert btf["size"] == ours.size
    assert [(m["name"], m["bits_offset"]) for m in btf["members"]] == [
        (m.name, 8 * m.offset) for m in ours.members
    ]
    info = json.loads(
        subprocess.run(
            ["bpftool", "-j", "map", "show", "pinned", pin],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["bytes_value"] == ours.size


@pytest.mark.kernel
@pytest.mark.parametrize("pinned", sorted(MAP_KEYS))
def test_key_layouts_match_the_loaded_programs_btf(shared_objects, pinned):
    ours = bk_header.header().struct(MAP_KEYS[pinned])
    theirs, btf = _btf_struct(os.path.join(shared_objects, pinned), "key")
    assert theirs == ours and btf["size"] == ours.size
