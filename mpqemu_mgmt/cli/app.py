"""The ``mpqemu-mgmt`` command: argument parsing, streams, exit codes (Contracts 2-4).

Data goes to stdout, diagnostics (and progress, on a TTY) to stderr; an
:class:`~mpqemu_mgmt.errors.MpqemuError` becomes one clear line and its exit code (0 ok, 1 failed,
2 usage, 3 refused, 4 process failed, 130 interrupted); ``--debug`` shows the traceback. This
module only parses and dispatches; the commands live in :mod:`mpqemu_mgmt.cli.commands`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from mpqemu_mgmt import __version__
from mpqemu_mgmt.errors import EXIT_INTERRUPTED, EXIT_USAGE, MpqemuError

EPILOG = """\
examples:
  mpqemu-mgmt serve &                                   # the service (one per host)
  mpqemu-mgmt define examples/demo.toml                 # register a guest spec
  mpqemu-mgmt start demo                                # start it with its remote devices
  mpqemu-mgmt attach demo id=t1 model=pci-testdev backend=builtin
  mpqemu-mgmt --format json status demo                 # pid, health, restarts, confinement
  mpqemu-mgmt events demo --follow                      # every transition, as it happens
  mpqemu-mgmt plan demo attach id=t1 model=pci-testdev  # dry run: QMP commands and remote argv
  mpqemu-mgmt stop demo && mpqemu-mgmt undefine demo
  mpqemu-mgmt demo                                      # the guided tour (own service, < 1 min)

exit codes: 0 ok, 1 operation failed, 2 bad input/usage, 3 refused by precondition,
            4 a remote/QEMU process failed, 130 interrupted
"""

_COMMAND_EXAMPLES = {
    "serve": "mpqemu-mgmt serve --interval 0.5 --timeout 1 --metrics-file /run/mpqemu-mgmt/metrics.prom",
    "define": "mpqemu-mgmt define examples/demo.toml",
    "undefine": "mpqemu-mgmt undefine demo",
    "start": "mpqemu-mgmt start demo   # again: changed=false",
    "stop": "mpqemu-mgmt stop demo --force",
    "list": "mpqemu-mgmt --format json list",
    "status": "mpqemu-mgmt --format json status demo",
    "attach": "mpqemu-mgmt attach demo id=t1 model=pci-testdev backend=builtin on_failure=replug",
    "detach": "mpqemu-mgmt detach demo t1",
    "reset": "mpqemu-mgmt reset demo        # system_reset\n  mpqemu-mgmt reset demo edu0   # hard reset",
    "logs": "mpqemu-mgmt logs demo         # guest console\n"
            "  mpqemu-mgmt logs demo edu0    # the remote's log",
    "xml": "mpqemu-mgmt xml demo",
    "plan": "mpqemu-mgmt plan demo start\n  mpqemu-mgmt plan demo detach edu0",
    "events": "mpqemu-mgmt events demo --follow",
    "hook": "mpqemu-mgmt hook install     # into /etc/libvirt/hooks/qemu.d/, then restart libvirtd",
    "demo": "./run.sh demo",
}


def _common(p: argparse.ArgumentParser, suppress: bool) -> None:
    # The global options are accepted before and after the command (`mpqemu-mgmt status x --format
    # json`); after it they must not reset what was given before it.
    default = argparse.SUPPRESS if suppress else None
    p.add_argument("--format", choices=("table", "json"), default=default if suppress else "table",
                   help="output format (default table)")
    p.add_argument("--state-dir", default=default,
                   help="state directory (env MPQEMU_MGMT_STATE_DIR; as root /var/lib and /run)")
    p.add_argument("--debug", action="store_true", default=default if suppress else False,
                   help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpqemu-mgmt", description="Manage guests whose PCI devices run in confined remote processes "
        "(multi-process QEMU 7.2).", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mpqemu-mgmt {__version__}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example:\n  {_COMMAND_EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p, suppress=True)
        return p

    p = add("serve", "run the management service (control socket, supervisor, re-adoption)")
    p.add_argument("--interval", type=float, default=0.5, help="heartbeat interval, s (default 0.5)")
    p.add_argument("--timeout", type=float, default=1.0, help="query-status timeout, s (default 1.0)")
    p.add_argument("--max-restarts", type=int, default=5, help="replugs before giving up (default 5)")
    p.add_argument("--metrics-file", help="write Prometheus metrics to this file (opt-in)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (opt-in)")
    p = add("define", "register a guest from a TOML spec (idempotent)")
    p.add_argument("spec")
    add("undefine", "forget a stopped guest").add_argument("name")
    add("start", "start a guest: main QEMU paused, remotes plugged, then run").add_argument("name")
    p = add("stop", "stop a guest and reap its remotes")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="no ACPI powerdown: quit/destroy at once")
    add("list", "list guests")
    add("status", "a guest's state and its devices (pid, health, restarts, confinement)").add_argument("name")
    p = add("attach", "hot-plug a device (KEY=VALUE are the keys of a [[device]] table)")
    p.add_argument("name")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    p = add("detach", "hot-unplug a device")
    p.add_argument("name")
    p.add_argument("id")
    p = add("reset", "system_reset a guest, or hard-reset one device")
    p.add_argument("name")
    p.add_argument("id", nargs="?")
    p = add("logs", "show a guest's console log, or a remote's log")
    p.add_argument("name")
    p.add_argument("id", nargs="?")
    p.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines")
    add("xml", "print a guest's libvirt domain XML (NAME or a spec file)").add_argument("name")
    p = add("plan", "dry run: the QMP commands and remote argv of an action; changes nothing")
    p.add_argument("name", help="a defined guest, or a spec file")
    p.add_argument("action", nargs="+", metavar="ACTION",
                   help="start | attach K=V... | detach ID | reset [ID] | stop")
    p = add("events", "show events: a table, or JSON lines (one object per line) with --format json")
    p.add_argument("name", nargs="?")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p = add("hook", "libvirt hook entry (GUEST OP SUB-OP EXTRA), or `hook install`")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = add("demo", "the tour: boot a guest with confined remotes, hot-plug, kill, recover, stop")
    p.add_argument("--keep", action="store_true", help="keep the demo's state directory")
    return parser


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    from mpqemu_mgmt.cli import commands
    from mpqemu_mgmt.cli.formatters import render
    from mpqemu_mgmt.service.paths import StatePaths

    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, bad usage exits 2
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(err)
        return EXIT_USAGE
    tty = hasattr(err, "isatty") and err.isatty()

    def progress(text: str) -> None:
        if tty:
            print(f"… {text}", file=err, flush=True)

    try:
        ctx = commands.Context(paths=StatePaths.resolve(args.state_dir), fmt=args.format, stdout=out,
                               stderr=err, progress=progress)
        result = getattr(commands, f"cmd_{args.command}")(ctx, args)
        if isinstance(result, int):
            return result
        if args.format == "table" and result.text is not None:
            out.write(result.text)
        else:
            out.write(render(result.data, args.format, result.kind))
        out.flush()
        return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except MpqemuError as exc:
        if args.debug:
            raise
        if args.format == "json":
            import json

            print(json.dumps({**exc.to_dict(), "exit_code": exc.exit_code}, default=str), file=out)
        print(f"mpqemu-mgmt: {exc.message}", file=err)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
