"""The CLI shell without a service: usage errors, help, version, exit codes, JSON errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from mpqemu_mgmt import __version__
from mpqemu_mgmt.cli.app import build_parser, main
from mpqemu_mgmt.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE

COMMANDS = ("serve", "define", "undefine", "start", "stop", "list", "status", "attach", "detach", "reset",
            "logs", "xml", "plan", "events", "hook", "demo")


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_every_contract_command_exists_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)  # type: ignore[arg-type]
    for name in COMMANDS:
        with pytest.raises(SystemExit) as ei:
            parser.parse_args([name, "--help"])
        assert ei.value.code == 0
        assert "example:" in capsys.readouterr().out


def test_top_level_help_has_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--help")[0] == EXIT_OK
    text = capsys.readouterr().out
    assert "examples:" in text and "exit codes" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--version")[0] == EXIT_OK
    assert __version__ in capsys.readouterr().out


def test_no_command_and_bad_usage_exit_2() -> None:
    assert run()[0] == EXIT_USAGE
    assert run("stop")[0] == EXIT_USAGE  # missing NAME
    assert run("--format", "yaml", "list")[0] == EXIT_USAGE


def test_bad_spec_is_usage_error_before_any_service(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "x"\nmemory = "lots"\n')
    code, out, err = run("--state-dir", str(tmp_path / "st"), "define", str(spec))
    assert code == EXIT_USAGE and "memory" in err and out == ""


def test_bad_attach_pairs_are_usage_errors(tmp_path: Path) -> None:
    code, _, err = run("--state-dir", str(tmp_path), "attach", "g", "id=t1", "model=nosuch")
    assert code == EXIT_USAGE and "model" in err


def test_service_down_is_a_clear_error_and_json_error_object(tmp_path: Path) -> None:
    code, out, err = run("--state-dir", str(tmp_path), "start", "g")
    assert code == EXIT_FAILED and "not running" in err and "mpqemu-mgmt serve" in err
    code, out, _ = run("start", "g", "--format", "json", "--state-dir", str(tmp_path))
    obj = json.loads(out)
    assert code == EXIT_FAILED and obj["error"] == "ServiceError" and obj["exit_code"] == EXIT_FAILED


def test_status_and_list_fall_back_to_recorded_state_flagged_stale(tmp_path: Path) -> None:
    from mpqemu_mgmt.service.paths import StatePaths
    from mpqemu_mgmt.service.records import DeviceRecord, GuestRecord
    from mpqemu_mgmt.service.store import StateStore

    assert run("--state-dir", str(tmp_path), "status", "g")[0] == EXIT_FAILED  # nothing recorded
    StateStore(StatePaths(tmp_path, tmp_path)).save(
        GuestRecord("g", {}, state="running", devices=(DeviceRecord("edu0", "edu"),)))
    code, out, err = run("--state-dir", str(tmp_path), "--format", "json", "status", "g")
    st = json.loads(out)
    assert code == EXIT_OK and st["stale"] is True and st["state"] == "running" and "not running" in err
    code, out, _ = run("--state-dir", str(tmp_path), "--format", "json", "list")
    assert code == EXIT_OK and json.loads(out)[0]["name"] == "g"
    code, _, err = run("--state-dir", str(tmp_path), "status", "nosuch")
    assert code == EXIT_FAILED and "no guest" in err


def test_global_options_after_the_command(tmp_path: Path) -> None:
    code, out, _ = run("events", "--format", "json", "--state-dir", str(tmp_path))
    assert code == EXIT_OK and out == ""  # JSON lines: no event, no line


def test_state_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPQEMU_MGMT_STATE_DIR", str(tmp_path))
    (tmp_path / "events.jsonl").write_text(json.dumps({"kind": "defined", "guest": "g", "time": 1.0}) + "\n")
    code, out, _ = run("--format", "json", "events")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == EXIT_OK and [e["kind"] for e in lines] == ["defined"]
    code, out, _ = run("events")
    assert code == EXIT_OK and "defined" in out and "{" not in out


def test_plan_works_without_service_and_changes_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "g.toml"
    spec.write_text('name = "g"\n[[device]]\nid = "edu0"\nmodel = "edu"\n')
    code, out, err = run("--state-dir", str(tmp_path / "st"), "--format", "json", "plan", str(spec), "start")
    assert code == EXIT_OK, err
    plan = json.loads(out)
    assert plan["action"] == "start" and any(s.get("command") == "device_add" for s in plan["steps"])
    assert not (tmp_path / "st").exists()
    code, out, _ = run("--state-dir", str(tmp_path / "st"), "plan", str(spec), "migrate")
    assert code == 3  # refused by precondition


def test_hook_install_into_a_directory(tmp_path: Path) -> None:
    code, out, err = run("--state-dir", str(tmp_path / "st"), "--format", "json", "hook", "install", "--dir",
                         str(tmp_path / "qemu.d"))
    assert code == EXIT_OK and "restart libvirtd" in err
    assert Path(json.loads(out)["installed"]).read_text().startswith("#!/bin/sh")
