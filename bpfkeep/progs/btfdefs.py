"""The running kernel's struct offsets the loss program reads (bpf/
loss.bpf.c), as ``-D`` macros for bcc, found in the kernel's BTF.

bcc compiles against a distro header set and applies no CO-RE relocation:
the offsets must come from the running kernel itself.  Without BTF, or
when a member is missing or a bitfield, the loss program is left out
(every other program works as before) and the reason is said once.
"""

from __future__ import annotations

from bpfkeep.kernel import btf

# macro -> (struct, member path)
OFFSETS = {
    "BK_O_SK_FAMILY": ("sock", "__sk_common.skc_family"),
    "BK_O_SK_DPORT": ("sock", "__sk_common.skc_dport"),
    "BK_O_SK_DADDR": ("sock", "__sk_common.skc_daddr"),
    "BK_O_SK_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "BK_O_SK_PROTOCOL": ("sock", "sk_protocol"),
    "BK_O_SK_ERR": ("sock", "sk_err"),
    "BK_O_SK_CGROUP": ("sock", "sk_cgrp_data.cgroup"),
    "BK_O_TP_SRTT_US": ("tcp_sock", "srtt_us"),
    "BK_O_TP_SND_UNA": ("tcp_sock", "snd_una"),
    "BK_O_TP_WRITE_SEQ": ("tcp_sock", "write_seq"),
    "BK_O_TP_LSNDTIME": ("tcp_sock", "lsndtime"),
    "BK_O_TP_FIRST_TX_MSTAMP": ("tcp_sock", "first_tx_mstamp"),
    "BK_O_TP_RCV_TSTAMP": ("tcp_sock", "rcv_tstamp"),
    "BK_O_TP_LRCVTIME": ("tcp_sock", "inet_conn.icsk_ack.lrcvtime"),
    "BK_O_TP_USER_TIMEOUT": ("tcp_sock", "inet_conn.icsk_user_timeout"),
    "BK_O_TP_KEEPALIVE_TIME": ("tcp_sock", "keepalive_time"),
    "BK_O_TP_PROBES_OUT": ("tcp_sock", "inet_conn.icsk_probes_out"),
    "BK_O_CG_LEVEL": ("cgroup", "level"),
    "BK_O_CG_KN": ("cgroup", "kn"),
    "BK_O_KN_ID": ("kernfs_node", "id"),
}
# The sizes the program reads them as (bytes).
SIZES = {
    "BK_O_SK_FAMILY": 2,
    "BK_O_SK_DPORT": 2,
    "BK_O_SK_DADDR": 4,
    "BK_O_SK_V6_DADDR": 16,
    "BK_O_SK_PROTOCOL": 2,
    "BK_O_SK_ERR": 4,
    "BK_O_SK_CGROUP": 8,
    "BK_O_TP_SRTT_US": 4,
    "BK_O_TP_SND_UNA": 4,
    "BK_O_TP_WRITE_SEQ": 4,
    "BK_O_TP_LSNDTIME": 4,
    "BK_O_TP_FIRST_TX_MSTAMP": 8,
    "BK_O_TP_RCV_TSTAMP": 4,
    "BK_O_TP_LRCVTIME": 4,
    "BK_O_TP_USER_TIMEOUT": 4,
    "BK_O_TP_KEEPALIVE_TIME": 4,
    "BK_O_TP_PROBES_OUT": 1,
    "BK_O_CG_LEVEL": 4,
    "BK_O_CG_KN": 8,
    "BK_O_KN_ID": 8,
}


def loss_cflags(b: btf.Btf | None = None) -> tuple[list[str], str | None]:
    """(the -D flags, None), or ([], why the loss program cannot be built
    for this kernel)."""
    try:
        b = b or btf.vmlinux()
        flags = ["-DBK_BTF=1"]
        for macro, (struct, path) in OFFSETS.items():
            size = b.size(struct, path)
            if size != SIZES[macro]:
                return [], f"{struct}.{path} is {size} bytes in this kernel, not {SIZES[macro]}"
            flags.append(f"-D{macro}={b.offset(struct, path)}")
        # The cgroup's ancestors: pointers since Linux 6.0, ids before.
        if b.has("cgroup", "ancestors"):
            flags.append(f"-DBK_O_CG_ANCESTORS={b.offset('cgroup', 'ancestors')}")
        elif b.has("cgroup", "ancestor_ids"):
            flags.append(f"-DBK_O_CG_ANCESTOR_IDS={b.offset('cgroup', 'ancestor_ids')}")
        else:
            return [], "struct cgroup has neither ancestors[] nor ancestor_ids[]"
    except btf.BtfError as e:
        return [], str(e)
    return flags, None


# What the bypass programs (bpf/bypass.bpf.c) read besides the loss
# program's: macro -> (struct, member path, size in bytes).  They are built
# only with the loss program's offsets too (they share its owner lookup).
BYPASS_OFFSETS = {
    "BK_O_SOCKET_SK": ("socket", "sk", 8),
    "BK_O_SK_STATE": ("sock", "__sk_common.skc_state", 1),
    "BK_O_SK_FLAGS": ("sock", "__sk_common.skc_flags", 8),
    "BK_O_SK_COOKIE": ("sock", "__sk_common.skc_cookie", 8),
    "BK_O_TP_KEEPALIVE_INTVL": ("tcp_sock", "keepalive_intvl", 4),
    "BK_O_TP_KEEPALIVE_PROBES": ("tcp_sock", "keepalive_probes", 1),
}
# enum sock_flags: the bit of sk_flags that SO_KEEPALIVE sets.
BYPASS_ENUMERATORS = {"BK_SOCK_KEEPOPEN": "SOCK_KEEPOPEN"}


def bypass_cflags(b: btf.Btf | None = None) -> tuple[list[str], str | None]:
    """(the -D flags, None), or ([], why the bypass programs cannot be
    built for this kernel).  An MPTCP socket's first subflow is optional:
    without it (no MPTCP in the kernel) the MPTCP program is left out."""
    try:
        b = b or btf.vmlinux()
        flags = ["-DBK_BYPASS_BTF=1"]
        for macro, (struct, path, want) in BYPASS_OFFSETS.items():
            size = b.size(struct, path)
            if size != want:
                return [], f"{struct}.{path} is {size} bytes in this kernel, not {want}"
            flags.append(f"-D{macro}={b.offset(struct, path)}")
        for macro, name in BYPASS_ENUMERATORS.items():
            flags.append(f"-D{macro}={b.enumerator(name)}")
        if b.has("mptcp_sock", "first") and b.size("mptcp_sock", "first") == 8:
            flags.append(f"-DBK_O_MSK_FIRST={b.offset('mptcp_sock', 'first')}")
    except btf.BtfError as e:
        return [], str(e)
    return flags, None
