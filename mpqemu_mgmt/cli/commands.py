"""The CLI commands (DESIGN.md Contract 3). Each returns a :class:`Output` (data and the table
layout to show it in) or runs until interrupted (``serve``, ``events --follow``); none prints data
itself except those two streaming commands. Mutations and live state go through the service's
control API; ``plan``, ``xml``, ``logs``, ``events`` and ``hook`` read files and work without it.
The commands must not talk to QEMU, libvirt or a remote themselves (``hook`` hands over to
:mod:`mpqemu_mgmt.hook`, ``demo`` to :mod:`mpqemu_mgmt.cli.demo`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from mpqemu_mgmt.errors import NotFoundError, ServiceError, UsageError
from mpqemu_mgmt.service.paths import StatePaths


@dataclass
class Context:
    paths: StatePaths
    fmt: str
    stdout: TextIO
    stderr: TextIO
    progress: Callable[[str], None]
    timeout: float = 300.0


@dataclass
class Output:
    data: Any
    kind: str = ""
    text: str | None = None  # a preformatted table form (logs, xml, plan)


def _call(ctx: Context, command: str, args: dict[str, Any] | None = None) -> Any:
    from mpqemu_mgmt.service.control import call

    return call(ctx.paths.control, command, args or {}, timeout=ctx.timeout, on_progress=ctx.progress)


def cmd_serve(ctx: Context, a: Any) -> int:
    from mpqemu_mgmt.orchestrate.heartbeat import Settings
    from mpqemu_mgmt.service.daemon import serve

    settings = Settings(interval=a.interval, timeout=a.timeout, max_restarts=a.max_restarts)
    metrics = Path(a.metrics_file) if a.metrics_file else None

    def ready(daemon: Any) -> None:
        print(f"mpqemu-mgmt: serving on {ctx.paths.control} (state {ctx.paths.state})", file=ctx.stderr,
              flush=True)

    asyncio.run(serve(ctx.paths, settings, metrics, ready, metrics_listen=a.metrics_listen))
    return 0


def cmd_define(ctx: Context, a: Any) -> Output:
    from mpqemu_mgmt.domain.spec import load_spec

    spec = load_spec(a.spec)  # bad specs fail here, with exit 2, before the service is asked
    return Output(_call(ctx, "define", {"spec": spec.to_dict(), "source": str(a.spec)}))


def cmd_undefine(ctx: Context, a: Any) -> Output:
    return Output(_call(ctx, "undefine", {"name": a.name}))


def cmd_start(ctx: Context, a: Any) -> Output:
    return Output(_call(ctx, "start", {"name": a.name}))


def cmd_stop(ctx: Context, a: Any) -> Output:
    return Output(_call(ctx, "stop", {"name": a.name, "force": a.force}))


def _recorded(ctx: Context, exc: ServiceError) -> Any:
    """When the service is down, read-only commands show the state as last recorded, flagged."""
    from mpqemu_mgmt.service.store import StateStore

    if not service_required(exc) or not ctx.paths.guests.is_dir():
        raise exc
    print(f"mpqemu-mgmt: the service is not running; showing the state last recorded in {ctx.paths.state}",
          file=ctx.stderr)
    return StateStore(ctx.paths)


def cmd_list(ctx: Context, a: Any) -> Output:
    try:
        return Output(_call(ctx, "list"), kind="list")
    except ServiceError as exc:
        store = _recorded(ctx, exc)
        return Output([{**r.summary(), "stale": True} for r in store.load_all()], kind="list")


def cmd_status(ctx: Context, a: Any) -> Output:
    try:
        return Output(_call(ctx, "status", {"name": a.name}), kind="status")
    except ServiceError as exc:
        store = _recorded(ctx, exc)
        return Output({**store.load(a.name).status(), "stale": True}, kind="status")


def cmd_attach(ctx: Context, a: Any) -> Output:
    from mpqemu_mgmt.domain.spec import device_from_pairs

    dev = device_from_pairs(list(a.pairs))  # bad pairs fail here with exit 2
    return Output(_call(ctx, "attach", {"name": a.name, "device": dev.to_dict()}))


def cmd_detach(ctx: Context, a: Any) -> Output:
    return Output(_call(ctx, "detach", {"name": a.name, "id": a.id}))


def cmd_reset(ctx: Context, a: Any) -> Output:
    return Output(_call(ctx, "reset", {"name": a.name, "id": a.id}))


def _record(ctx: Context, name: str) -> Any:
    from mpqemu_mgmt.service.store import StateStore

    return StateStore(ctx.paths).load(name)


def cmd_logs(ctx: Context, a: Any) -> Output:
    rec = _record(ctx, a.name)
    data = rec.driver_data or {}
    if a.id is None:
        path = data.get("console_log") or (rec.main.log if rec.main else None) or \
            str(ctx.paths.guest_dir(a.name) / "console.log")
    else:
        remote = (data.get("remotes") or {}).get(a.id) or {}
        dev = rec.device(a.id)
        if dev is None and not remote:
            raise NotFoundError(f"guest {a.name!r} has no device {a.id!r}", guest=a.name, device=a.id)
        path = remote.get("log_path") or (dev.proc.log if dev and dev.proc else None) or \
            str(ctx.paths.guest_dir(a.name) / f"remote-{a.id}.log")
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError as exc:
        raise NotFoundError(f"no log yet at {path}", path=path) from exc
    lines = text.splitlines()[-a.lines:] if a.lines else text.splitlines()
    from mpqemu_mgmt.cli.formatters import escape

    shown = "".join(escape(line).replace("\\t", "\t") + "\n" for line in lines)
    return Output({"path": path, "lines": lines}, text=shown)


def _spec_of(ctx: Context, name_or_path: str) -> Any:
    from mpqemu_mgmt.domain.spec import load_spec, spec_from_dict

    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return load_spec(name_or_path)
    rec = _record(ctx, name_or_path)
    return spec_from_dict(rec.spec, f"state:{name_or_path}")


def cmd_xml(ctx: Context, a: Any) -> Output:
    from mpqemu_mgmt.domain.designer import design

    spec = _spec_of(ctx, a.name)
    xml = design(spec, state_dir=str(ctx.paths.guest_dir(spec.name))).to_xml()
    return Output({"name": spec.name, "xml": xml}, text=xml if xml.endswith("\n") else xml + "\n")


def cmd_plan(ctx: Context, a: Any) -> Output:
    from mpqemu_mgmt.domain.spec import device_from_pairs
    from mpqemu_mgmt.orchestrate import plans

    spec = _spec_of(ctx, a.name)
    action, rest = a.action[0], list(a.action[1:])
    kw: dict[str, Any] = {"state_dir": str(ctx.paths.guest_dir(spec.name))}
    if action == "attach":
        kw["device"] = device_from_pairs(rest)
    elif action in ("detach", "reset", "hard-reset"):
        if rest:
            kw["device_id"] = rest[0]
        elif action != "reset":
            raise UsageError(f"plan {action} needs a device id")
    elif action == "stop":
        kw["force"] = "--force" in rest
    from mpqemu_mgmt.service.daemon import service_remote_command

    # the remote argv the service's launcher would execute (fd numbers as {fd:NAME} placeholders)
    plan = plans.plan_for(spec, action, remote_command=service_remote_command(), **kw)
    data = plan.to_dict()
    rows = [{"n": i + 1, **_step_row(s)} for i, s in enumerate(data.get("steps", []))]
    from mpqemu_mgmt.cli.formatters import table

    return Output(data, text=table(rows, ["n", "op", "command", "detail"]))


def _step_row(step: Any) -> dict[str, Any]:
    if not isinstance(step, dict):
        return {"op": str(step), "command": "", "detail": ""}
    detail = {k: v for k, v in step.items() if k not in ("op", "command") and v not in (None, "", [], {})}
    return {"op": step.get("op", ""), "command": step.get("command", ""),
            "detail": json.dumps(detail, sort_keys=True)[:160]}


def cmd_events(ctx: Context, a: Any) -> Output | int:
    """Events as JSON lines (``--format json``, one object per line, as in the events file) or
    one table row per event; ``--follow`` keeps printing new ones until interrupted."""
    from mpqemu_mgmt.cli.formatters import cell
    from mpqemu_mgmt.service.events import follow_events, read_events

    def show(d: dict[str, Any]) -> None:
        if ctx.fmt == "json":
            ctx.stdout.write(json.dumps(d, sort_keys=True) + "\n")
        else:
            ctx.stdout.write(_event_line(d, cell) + "\n")

    if not a.follow:
        for ev in read_events(ctx.paths.events, a.name):
            show(ev.to_dict())
        return 0
    for ev in follow_events(ctx.paths.events, a.name):
        show(ev.to_dict())
        ctx.stdout.flush()
    return 0


def _event_line(d: dict[str, Any], cell: Callable[[Any], str]) -> str:
    import time as _time

    when = _time.strftime("%H:%M:%S", _time.localtime(float(d.get("time", 0))))
    ms = int((float(d.get("time", 0)) % 1) * 1000)
    return f"{when}.{ms:03d}  {cell(d.get('guest')):<12} {cell(d.get('device')):<8} " \
           f"{cell(d.get('kind')):<16} {cell(d.get('detail'))}"


def cmd_hook(ctx: Context, a: Any) -> Output | int:
    from mpqemu_mgmt import hook

    args = list(a.args)
    if args and args[0] == "install":
        hooks_dir = Path(args[args.index("--dir") + 1]) if "--dir" in args else hook.DEFAULT_HOOKS_DIR
        state = str(ctx.paths.state) if ctx.paths.state != StatePaths.resolve(None).state else None
        path = hook.install(hooks_dir, sys.executable, state)
        print("mpqemu-mgmt: restart libvirtd so it reads the new hook (hooks are read at its start)",
              file=ctx.stderr)
        return Output({"installed": str(path), "changed": True})
    if len(args) < 2:
        raise UsageError("usage: mpqemu-mgmt hook GUEST OP SUB-OP EXTRA (libvirt's call) "
                         "| hook install [--dir D]")
    stdin_text = "" if sys.stdin.isatty() else sys.stdin.read()
    return hook.run(args, stdin_text, ctx.paths)


def cmd_demo(ctx: Context, a: Any) -> int:
    from mpqemu_mgmt.cli.demo import run_demo

    return run_demo(ctx, keep=a.keep)


def service_required(exc: ServiceError) -> bool:
    return "not running" in exc.message
