"""Where the service keeps things: one state directory (records, logs) and one runtime directory
(sockets). Pure path arithmetic: must not create or read anything.

``--state-dir DIR`` (env ``MPQEMU_MGMT_STATE_DIR``) puts both in DIR; otherwise root uses
/var/lib/mpqemu-mgmt and /run/mpqemu-mgmt (DESIGN.md Contract 2), others their XDG directories.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_STATE_DIR = "MPQEMU_MGMT_STATE_DIR"


class StatePaths:
    # A plain class, not a dataclass: the libvirt hook imports this and must start fast
    # (dataclasses pulls in inspect, ~20 ms on a loaded host).
    __slots__ = ("run", "state")

    def __init__(self, state: Path, run: Path) -> None:
        self.state = Path(state)
        self.run = Path(run)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StatePaths) and (self.state, self.run) == (other.state, other.run)

    def __hash__(self) -> int:
        return hash((self.state, self.run))

    def __repr__(self) -> str:
        return f"StatePaths(state={self.state!r}, run={self.run!r})"

    @classmethod
    def resolve(cls, state_dir: str | None, env: dict[str, str] | None = None, uid: int | None = None
                ) -> StatePaths:
        env = dict(os.environ) if env is None else env
        chosen = state_dir or env.get(ENV_STATE_DIR)
        if chosen:
            p = Path(chosen).absolute()
            return cls(state=p, run=p)
        if (os.geteuid() if uid is None else uid) == 0:
            return cls(state=Path("/var/lib/mpqemu-mgmt"), run=Path("/run/mpqemu-mgmt"))
        home = Path(env.get("HOME", "/tmp"))
        state = Path(env.get("XDG_STATE_HOME", home / ".local/state")) / "mpqemu-mgmt"
        run = Path(env["XDG_RUNTIME_DIR"]) / "mpqemu-mgmt" if env.get("XDG_RUNTIME_DIR") else state
        return cls(state=state, run=run)

    @property
    def guests(self) -> Path:
        return self.state / "guests"

    def guest_dir(self, name: str) -> Path:
        return self.guests / name

    def record(self, name: str) -> Path:
        return self.guest_dir(name) / "guest.json"

    @property
    def events(self) -> Path:
        return self.state / "events.jsonl"

    @property
    def audit(self) -> Path:
        return self.state / "audit.jsonl"

    @property
    def control(self) -> Path:
        return self.run / "control.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "service.pid"

    @property
    def starting(self) -> Path:
        """Start tokens: ``<name>.starting`` while our service starts a guest (the hook checks)."""
        return self.run / "starting"

    @property
    def metrics(self) -> Path:
        return self.state / "metrics.prom"
