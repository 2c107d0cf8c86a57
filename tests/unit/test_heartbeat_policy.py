"""Table-driven tests of the pure HealthPolicy (mpqemu_mgmt.orchestrate.heartbeat.decide)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.orchestrate.heartbeat import (
    Emit,
    Exited,
    GuestCrashed,
    Health,
    Kill,
    OnFailure,
    PauseGuest,
    ProbeMissed,
    ProbeOk,
    Replug,
    ReplugFailed,
    Replugged,
    Role,
    Settings,
    State,
    StopGuest,
    backoff,
    decide,
)

S = Settings()
REMOTE = R = Health(role=Role.REMOTE)
MAIN = M = Health(role=Role.MAIN)


def kinds(actions: tuple[object, ...]) -> list[str]:
    return [a.kind if isinstance(a, Emit) else type(a).__name__ for a in actions]


CASES = [
    # (name, health, observation, expected state, expected action kinds)
    ("first ok", REMOTE, ProbeOk(1.0, 0.002), State.HEALTHY, ["healthy"]),
    ("ok again is silent", replace(R, state=State.HEALTHY, healthy_since=0.0), ProbeOk(1.0, 0.002),
     State.HEALTHY, []),
    ("remote miss -> hung, kill", replace(R, state=State.HEALTHY), ProbeMissed(1.0, "timeout"),
     State.HUNG, ["hung", "Kill"]),
    ("hung miss again: no second kill", replace(R, state=State.HUNG, misses=1), ProbeMissed(2.0, "timeout"),
     State.HUNG, []),
    ("main miss -> unresponsive, no kill", replace(M, state=State.HEALTHY), ProbeMissed(1.0, "timeout"),
     State.UNRESPONSIVE, ["unresponsive"]),
    ("main recovers", replace(M, state=State.UNRESPONSIVE), ProbeOk(1.0, 0.01), State.HEALTHY, ["healthy"]),
    ("remote dies -> replug now", replace(R, state=State.HEALTHY), Exited(1.0, "signal 9"),
     State.DEAD, ["dead", "replug_scheduled", "Replug"]),
    ("hung remote killed -> replug", replace(R, state=State.HUNG), Exited(1.0, "signal 9"),
     State.DEAD, ["dead", "replug_scheduled", "Replug"]),
    ("second crash -> backoff", replace(R, state=State.HEALTHY, consecutive=1), Exited(1.0, "signal 9"),
     State.BACKOFF, ["dead", "replug_scheduled", "Replug"]),
    ("max restarts -> give up", replace(R, state=State.HEALTHY, consecutive=5), Exited(1.0, "exit 1"),
     State.FAILED, ["dead", "gave_up"]),
    ("pause policy", replace(R, on_failure=OnFailure.PAUSE, state=State.HEALTHY), Exited(1.0, "signal 9"),
     State.FAILED, ["dead", "PauseGuest"]),
    ("stop policy", replace(R, on_failure=OnFailure.STOP, state=State.HEALTHY), Exited(1.0, "signal 9"),
     State.FAILED, ["dead", "StopGuest"]),
    ("ignore policy", replace(R, on_failure=OnFailure.IGNORE, state=State.HEALTHY), Exited(1.0, "signal 9"),
     State.FAILED, ["dead", "ignored"]),
    ("expected exit", replace(R, state=State.HEALTHY), Exited(1.0, "exit 0", expected=True),
     State.STOPPED, ["stopped"]),
    ("main dies -> guest crashed", replace(M, state=State.HEALTHY), Exited(1.0, "signal 9"),
     State.DEAD, ["dead", "GuestCrashed"]),
    ("main stopped on purpose", replace(M, state=State.HEALTHY), Exited(1.0, "exit 0", expected=True),
     State.STOPPED, ["stopped"]),
    ("late probe after death dropped", replace(R, state=State.DEAD), ProbeOk(1.0, 0.001), State.DEAD, []),
    ("late miss in backoff dropped", replace(R, state=State.BACKOFF), ProbeMissed(1.0, "x"),
     State.BACKOFF, []),
    ("failed stays failed", replace(R, state=State.FAILED), Exited(1.0, "signal 9"), State.FAILED, []),
    ("replugged", replace(R, state=State.DEAD), Replugged(1.0), State.STARTING, ["replugged"]),
    ("replug failed -> retry with backoff", replace(R, state=State.DEAD), ReplugFailed(1.0, "spawn"),
     State.BACKOFF, ["replug_failed", "replug_scheduled", "Replug"]),
    ("replug failed while healthy ignored", replace(R, state=State.HEALTHY), ReplugFailed(1.0, "x"),
     State.HEALTHY, []),
]


@pytest.mark.parametrize(("name", "health", "obs", "state", "expected"), CASES, ids=[c[0] for c in CASES])
def test_policy_table(name: str, health: Health, obs: object, state: State, expected: list[str]) -> None:
    nxt, actions = decide(health, obs, S)  # type: ignore[arg-type]
    assert nxt.state is state
    assert kinds(actions) == expected


def test_misses_threshold_counts_consecutive() -> None:
    s = Settings(misses=3)
    h = replace(R, state=State.HEALTHY)
    for _ in range(2):
        h, actions = decide(h, ProbeMissed(1.0, "timeout"), s)
        assert actions == () and h.state is State.HEALTHY
    h, actions = decide(h, ProbeMissed(1.0, "timeout"), s)
    assert h.state is State.HUNG and any(isinstance(a, Kill) for a in actions)
    # an answer in between resets the count
    h2 = replace(R, state=State.HEALTHY, misses=2)
    h2, _ = decide(h2, ProbeOk(1.0, 0.001), s)
    assert h2.misses == 0


def test_replug_carries_backoff_and_attempt() -> None:
    h = replace(R, state=State.HEALTHY, consecutive=3)
    _, actions = decide(h, Exited(5.0, "signal 9"), S)
    replug = next(a for a in actions if isinstance(a, Replug))
    assert replug.attempt == 4
    assert replug.delay == backoff(S, 3) == 4.0


def test_stable_period_resets_consecutive_but_not_total() -> None:
    h = replace(R, state=State.STARTING, consecutive=3, restarts=3)
    h, _ = decide(h, ProbeOk(100.0, 0.001), S)
    assert h.consecutive == 3
    h, _ = decide(h, ProbeOk(100.0 + S.stable_after, 0.001), S)
    assert h.consecutive == 0 and h.restarts == 3


def test_crash_loop_gives_up_after_max_restarts() -> None:
    h = replace(R, state=State.HEALTHY)
    t = 0.0
    replugs = 0
    while True:
        t += 1
        h, actions = decide(h, Exited(t, "signal 9"), S)
        if h.state is State.FAILED:
            break
        assert any(isinstance(a, Replug) for a in actions)
        replugs += 1
        h, _ = decide(h, Replugged(t), S)
        h, _ = decide(h, ProbeOk(t, 0.001), S)
    assert replugs == S.max_restarts
    assert h.restarts == S.max_restarts


@settings(deadline=None)  # a loaded shared host must not turn slowness into failure
@given(st.integers(min_value=0, max_value=60))
def test_backoff_monotonic_and_capped(n: int) -> None:
    assert backoff(S, n) <= backoff(S, n + 1) <= S.backoff_max


@settings(deadline=None)  # a loaded shared host must not turn slowness into failure
@given(st.lists(st.sampled_from(["ok", "miss", "exit", "replugged"]), max_size=40))
def test_random_sequences_never_kill_main_or_double_kill(seq: list[str]) -> None:
    for role in (Role.MAIN, Role.REMOTE):
        h = Health(role=role)
        kills = 0
        for i, step in enumerate(seq):
            obs = {"ok": ProbeOk(float(i), 0.001), "miss": ProbeMissed(float(i), "timeout"),
                   "exit": Exited(float(i), "signal 9"), "replugged": Replugged(float(i))}[step]
            h, actions = decide(h, obs, S)  # type: ignore[arg-type]
            kills += sum(isinstance(a, Kill) for a in actions)
            if isinstance(obs, Replugged):
                kills = 0
            assert kills <= 1
            if role is Role.MAIN:
                assert not any(isinstance(a, Kill | Replug | PauseGuest | StopGuest) for a in actions)
            else:
                assert not any(isinstance(a, GuestCrashed) for a in actions)
