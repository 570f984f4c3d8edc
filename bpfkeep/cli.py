"""bpfkeep's command line: ``main(argv) -> exit code``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from bpfkeep import __version__, config, containers, daemon, doctor, peers, runner
from bpfkeep.audit import command as audit
from bpfkeep.enforcer import Enforcer
from bpfkeep.errors import BpfkeepError, PermissionProblem, UsageError
from bpfkeep.kernel import cgroups
from bpfkeep.kernel.privileges import has_bpf_privileges, require_privileges
from bpfkeep.options import (
    AUTO_MAX,
    AUTO_MIN,
    BY_KEY,
    MODES,
    TUNABLE,
    Option,
    Policy,
    parse_value,
)
from bpfkeep.preload import library_path
from bpfkeep.sweep.engine import SweepUnavailable


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _option_type(opt: Option, *, auto: bool = False) -> Callable[[str], int | str]:
    def convert(raw: str) -> int | str:
        if auto and raw.strip().lower() == "auto":
            return "auto"
        try:
            return parse_value(opt, raw)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = opt.key  # argparse names the type in some messages
    return convert


def add_policy_arguments(p: argparse.ArgumentParser, *, bpf_only: bool = True) -> None:
    g = p.add_argument_group("policy (0 = leave the kernel default)")
    for opt in TUNABLE:
        if bpf_only and not opt.bpf:
            continue
        default = (
            "(keepidle + keepintvl * keepcnt) * 1000" if opt.default is None else str(opt.default)
        )
        auto = opt.key == "keepidle" and bpf_only
        g.add_argument(
            opt.flag,
            dest=opt.key,
            type=_option_type(opt, auto=auto),
            metavar=opt.unit.upper() if opt.unit != "bytes" else "BYTES",
            help=f"{opt.help} [{opt.unit}, {opt.minimum}..{opt.maximum}; default {default}]"
            + ('; "auto": learned from the path (bpfkeep daemon)' if auto else ""),
        )
    if bpf_only:
        for key, what in (
            ("keepidle_min", f"the lowest keepidle auto goes to [s; default {AUTO_MIN}]"),
            ("keepidle_max", f"where keepidle auto starts [s; default {AUTO_MAX}]"),
        ):
            g.add_argument(
                "--" + key.replace("_", "-"),
                dest=key,
                type=_option_type(BY_KEY["keepidle"]),
                metavar="S",
                help=what,
            )
    g.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="set (default): applications may change the values afterwards; enforce: "
        "they cannot turn keepalive off or raise the times above the policy",
    )
    g.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="ADDRESS[,port=P][,KEY=VALUE]...",
        help="other values for the connections to these peers (a CIDR, an address or a "
        "host name; the most specific rule wins), or ADDRESS,exempt to leave them as the "
        "program made them; repeatable, e.g. --peer 10.20.0.0/16,keepidle=300",
    )


def policy_from_args(args: argparse.Namespace) -> Policy:
    values: dict[str, object] = {o.key: getattr(args, o.key, None) for o in TUNABLE}
    values["mode"] = args.mode or "set"
    for key in ("keepidle_min", "keepidle_max"):
        values[key] = getattr(args, key, None)
    policy = Policy.from_mapping(values)
    specs = getattr(args, "peer", None) or []
    if not specs:
        return policy
    given = {k: v for k, v in values.items() if v is not None}
    rules = peers.build(
        given,
        [peers.parse_spec(s) for s in specs],
        where=lambda j, key: f"--peer {specs[j]}: {key}",
    )
    return policy.with_peers(rules)


def _add_workload_arguments(p: argparse.ArgumentParser, group) -> None:
    group.add_argument(
        "--container",
        metavar="NAME",
        help="the cgroup of the running container of this exact name (docker, podman; "
        "containerd and CRI-O: the kubelet's container name)",
    )
    group.add_argument(
        "--pod",
        metavar="NAMESPACE/NAME[/CONTAINER]",
        help="a Kubernetes pod's cgroup (all its containers), or one container's",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="take where the container runtimes are from this daemon config's [containers] "
        "table (default: their standard sockets and state directories)",
    )


def _workload_cgroup(args: argparse.Namespace) -> str:
    """--cgroup, or the cgroup --container / --pod name."""
    if args.cgroup is not None:
        return args.cgroup
    sources = config.load(args.config).runtimes if args.config else containers.Sources()
    mount = cgroups.cgroup2_mount()
    return containers.find(mount, sources, container=args.container, pod=args.pod)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bpfkeep",
        description="TCP keepalive for every socket of a cgroup, enforced in the kernel.",
    )
    p.add_argument("--version", action="version", version=f"bpfkeep {__version__}")
    p.add_argument(
        "--pin-dir",
        default=None,
        help="bpffs directory holding bpfkeep's objects "
        "(default $BPFKEEP_PIN_DIR or /sys/fs/bpf/bpfkeep)",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("attach", help="apply a policy to a cgroup (or update it)")
    where = a.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--cgroup",
        metavar="PATH",
        help="cgroup v2 path, absolute or relative to the cgroup2 mount",
    )
    _add_workload_arguments(a, where)
    a.add_argument("--force", action="store_true", help="allow the root cgroup")
    a.add_argument(
        "--no-existing",
        action="store_true",
        help="leave the TCP sockets that already exist as they are (by default "
        "they are brought to the policy too: Linux 5.15+)",
    )
    add_policy_arguments(a)

    d = sub.add_parser("detach", help="remove bpfkeep's programs from a cgroup")
    target = d.add_mutually_exclusive_group(required=True)
    target.add_argument("--cgroup", metavar="PATH")
    _add_workload_arguments(d, target)
    target.add_argument(
        "--all",
        action="store_true",
        help="every bpfkeep attachment, and unpin the programs (uninstall)",
    )
    d.add_argument("--force", action="store_true", help="allow the root cgroup")
    d.add_argument(
        "--no-existing",
        action="store_true",
        help="leave listeners with the values the policy gave them (by default they "
        "go back to the defaults, or to an ancestor's policy, so that the "
        "connections they accept from now on no longer get it)",
    )

    s = sub.add_parser("status", help="cgroups with a bpfkeep policy, with counters")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    r = sub.add_parser(
        "run",
        help="run COMMAND in a fresh cgroup with the policy attached",
        description="Run COMMAND in a fresh child cgroup with the policy attached, like "
        "systemd-run --scope --wait: the cgroup and the policy stay until no process is "
        "left in it, so a program that daemonizes stays covered.  SIGTERM, SIGINT, "
        "SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 go to the main process (once it has "
        "exited, to what is left in the cgroup); no process is ever moved out.  Exit "
        "status: the main process's; 127 command not found, 126 not executable, 128+N "
        "killed by signal N.  If bpfkeep run itself is killed, the next run, status or "
        "the daemon (at start and on reload) detaches the policy and removes the "
        "cgroup once it is empty (runs are recorded in /run/bpfkeep/runs).",
    )
    r.add_argument(
        "--via",
        choices=("auto", "bpf", "preload"),
        default="auto",
        help="bpf, the LD_PRELOAD shim, or bpf when possible (default)",
    )
    add_policy_arguments(r, bpf_only=False)
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")

    e = sub.add_parser("exec", help="run COMMAND with the LD_PRELOAD shim (no privileges)")
    e.add_argument(
        "--hook",
        choices=("connect", "socket"),
        default="connect",
        help="wrap connect()/listen() (default) or socket()",
    )
    add_policy_arguments(e, bpf_only=False)
    e.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")

    sub.add_parser("preload-path", help="print the LD_PRELOAD shim's absolute path")
    audit.add_parser(sub)
    doctor.add_parser(sub)

    dm = sub.add_parser(
        "daemon", help="keep the config's policies attached; serve Prometheus metrics"
    )
    dm.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    dm.add_argument(
        "--detach-on-exit",
        action="store_true",
        help="detach the daemon's policies on SIGTERM (default: they stay enforced)",
    )
    dm.add_argument("--check", action="store_true", help="validate the config and exit")
    return p


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError(f"{args.command}: no COMMAND given (bpfkeep {args.command} -- COMMAND)")
    return cmd


def _fmt_policy(pol: Policy) -> str:
    parts = []
    for opt in TUNABLE:
        v = getattr(pol, opt.key)
        if opt.key == "keepidle" and pol.auto:
            parts.append(f"keepidle=auto({pol.keepidle_min}..{pol.keepidle_max}s)")
        elif v and opt.bpf:
            parts.append(
                f"{opt.key}={v}{'' if opt.unit in ('probes', 'retransmits', 'bytes') else opt.unit}"
            )
    if pol.idle_limit:
        parts.append(f"idle_limit={pol.idle_limit}s")
    return " ".join(parts)


def _resolved(policy: Policy) -> Policy:
    """The policy with its host-name rules resolved, once (the daemon
    resolves them again every resolve_interval; attach and run do not)."""

    def failed(name: str, why: str) -> None:
        print(
            f"bpfkeep: warning: peer rule {name}: the name does not resolve ({why}); its rule "
            "applies to no peer (bpfkeep daemon resolves names again; attach and run once)",
            file=sys.stderr,
        )

    return peers.resolve_names(policy, peers.Resolver(), failed)


def _fmt_peer(p: peers.Peer) -> str:
    what = "exempt" if p.policy is None else _fmt_policy(p.policy)
    if p.policy is not None and p.policy.mode == "enforce":
        what += " mode=enforce"
    shown = [peers.show_network(n) for n in p.networks]
    at = ""
    if p.is_name:
        at = f" ({', '.join(shown)})" if shown else " (not resolved)"
    return f"{p.label}{at}: {what}"


def _fmt_learned(got) -> str:
    """One path's learned idle limit, its evidence and the keepidle in force."""
    limit = f"idle limit {got.limit} s" if got.limit else "no idle limit known"
    evidence = [f"{got.losses} loss(es)"]
    if got.ignored:
        evidence.append(f"{got.ignored} set aside")
    if got.upper_ms:
        evidence.append(f"lost after {got.upper_ms / 1000:.0f} s idle")
    if got.lower_ms:
        evidence.append(f"survived {got.lower_ms / 1000:.0f} s idle")
    return f"{limit} ({', '.join(evidence)}); keepidle {got.keepidle} s"


def cmd_status(enf, as_json: bool, out=sys.stdout) -> int:
    if not has_bpf_privileges():
        raise PermissionProblem(
            "status reads bpfkeep's BPF maps: run it as root (or with CAP_BPF, CAP_PERFMON and "
            "CAP_NET_ADMIN); bpfkeep audit shows sockets' keepalive without privileges"
        )
    runner.reap_stale_runs()  # what killed `bpfkeep run`s left behind
    atts = enf.attachments()
    if as_json:
        json.dump([a.as_dict() for a in atts], out, indent=2)
        out.write("\n")
        return 0
    if not atts:
        print("no cgroup has a bpfkeep policy", file=out)
        return 0
    for a in atts:
        name = a.cgroup.display if a.cgroup else f"(removed cgroup {a.cgroup_id})"
        mode = a.policy.mode if a.policy else "?"
        print(f"{name}  id={a.cgroup_id}  mode={mode}", file=out)
        if a.policy:
            print(f"  policy:    {_fmt_policy(a.policy)}", file=out)
            for p in a.policy.peers:
                print(f"  peer:      {_fmt_peer(p)}", file=out)
        for peer, ls in sorted(a.losses.items()):
            reasons = " ".join(f"{r}={n}" for r, n in ls.lost.items() if n)
            total = sum(ls.lost.values())
            mean = ls.idle_seconds / total if total else 0.0
            print(
                f"  lost:      {peer}: {reasons or '-'} (idle before the loss: "
                f"{mean:.0f} s on average)",
                file=out,
            )
        for peer, got in sorted(a.learned.items()):
            print(f"  learned:   {peer}: {_fmt_learned(got)}", file=out)
        c = a.counters
        if c:
            seen = " ".join(f"{k}={v}" for k, v in c.seen.items())
            print(
                f"  sockets:   {seen} (accepted with keepalive inherited: {c.inherited})", file=out
            )
            applied = " ".join(f"{k}={v}" for k, v in c.applied.items() if v)
            print(f"  applied:   {applied or '-'}", file=out)
            failed = " ".join(f"{o}/{e}={n}" for (o, e), n in c.failed.items())
            print(f"  failed:    {failed or '-'}", file=out)
            rewritten = " ".join(f"{k}={v}" for k, v in c.rewritten.items() if v)
            print(f"  rewritten: {rewritten or '-'}", file=out)
            if c.enforce and (mode == "enforce" or any(c.enforce.repaired.values())):
                past = " ".join(f"{k}={v}" for k, v in c.enforce.bypassed.items() if v)
                back = " ".join(f"{k}={v}" for k, v in c.enforce.repaired.items() if v)
                print(f"  past hook: {past or '-'} repaired: {back or '-'}", file=out)
            if c.sweep:
                s = c.sweep
                sw_applied = " ".join(f"{k}={v}" for k, v in s.applied.items() if v)
                sw_failed = " ".join(f"{o}/{e}={n}" for (o, e), n in s.failed.items())
                print(
                    f"  existing:  swept={s.swept} kept_program_values={s.app_own} "
                    f"applied: {sw_applied or '-'} failed: {sw_failed or '-'}",
                    file=out,
                )
    return 0


def _current_policy(enf, cg) -> Policy | None:
    if not has_bpf_privileges():
        return None  # attach will say so
    return next((a.policy for a in enf.attachments({cg.id: cg}) if a.cgroup_id == cg.id), None)


def _reset_by_default(before: Policy | None, after: Policy, args: argparse.Namespace) -> str:
    """Options an update changed only because the command line left them out."""
    if before is None:
        return ""
    changed = []
    if args.mode is None and before.mode != after.mode:
        changed.append(f"mode={after.mode} (was {before.mode})")
    for opt in TUNABLE:
        if not opt.bpf or getattr(args, opt.key, None) is not None:
            continue
        old, new = getattr(before, opt.key), getattr(after, opt.key)
        if old != new:
            changed.append(f"{opt.key}={new} (was {old})")
    return ", ".join(changed)


def _sweep(enf, cg) -> int:
    """Bring the sockets that exist already to the policy just attached."""
    try:
        report = enf.sweep([cg])
    except SweepUnavailable as e:
        print(f"bpfkeep: notice: {e}", file=sys.stderr)
        return 0
    except OSError as e:
        print(
            f"bpfkeep: the policy is attached, but the sockets that already exist were not "
            f"swept ({e}); bpfkeep audit lists them",
            file=sys.stderr,
        )
        return 1
    print(f"  {report.summary()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return dispatch(args)
    except BpfkeepError as e:
        print(f"bpfkeep: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `bpfkeep status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "preload-path":
        print(library_path())
        return 0
    if args.command == "exec":
        return runner.exec_preload(policy_from_args(args), _command(args), hook=args.hook)
    if args.command == "run":
        policy = _resolved(policy_from_args(args))
        return runner.run(policy, _command(args), via=args.via, pin_dir=args.pin_dir)

    if args.command == "daemon":
        if args.check:
            cfg = config.load(args.config)
            print(f"{args.config}: ok, {len(cfg.rules) + len(cfg.workload_rules)} policy rule(s)")
            return 0
        return daemon.main(args.config, args.pin_dir, args.detach_on_exit)

    if args.command == "audit":
        return audit.run(args)
    if args.command == "doctor":
        return doctor.run(args)

    enf = Enforcer(args.pin_dir)
    if args.command == "status":
        return cmd_status(enf, args.json)
    if args.command == "detach" and args.all:
        require_privileges()
        n = len(enf.pinned_ids())
        enf.destroy()
        print(f"detached {n} cgroup(s); removed {enf.pin_dir}")
        return 0
    cg = cgroups.resolve(_workload_cgroup(args), force_root=args.force)
    if args.command == "attach":
        policy = _resolved(policy_from_args(args))
        before = _current_policy(enf, cg)
        what = enf.attach(cg, policy)
        print(f"{what} {cg.display}: {_fmt_policy(policy)} mode={policy.mode}")
        if policy.learns:
            print(
                "  keepidle auto: starts at keepidle_max and is learned while bpfkeep daemon "
                "runs with a config that gives this cgroup its policy"
            )
        reset = _reset_by_default(before, policy, args)
        if reset:
            # attach sets the whole policy: say what the update changed
            # although the command line did not name it.
            print(f"  not given, back to the default: {reset}")
        return 0 if args.no_existing else _sweep(enf, cg)
    if args.command == "detach":
        if enf.detach(cg, existing=not args.no_existing):
            print(f"detached {cg.display}")
        else:
            print(f"{cg.display} had no bpfkeep policy")
        return 0
    raise UsageError(f"unknown command {args.command}")


def entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
