"""The exception tree maps to the CLI exit codes of Contracts 2."""

from __future__ import annotations

import pytest

from mpqemu_mgmt import errors


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.MpqemuError, 1),
        (errors.SpecError, 2),
        (errors.OneDevicePerProcess, 3),
        (errors.MigrationRefused, 3),
        (errors.SeccompViolation, 4),
        (errors.HeartbeatTimeout, 4),
        (errors.StepTimeout, 1),
    ],
)
def test_exit_codes(cls: type[errors.MpqemuError], code: int) -> None:
    assert cls("x").exit_code == code


def test_every_error_class_is_drawn_in_the_tree() -> None:
    doc = errors.__doc__ or ""
    classes = [
        obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, errors.MpqemuError)
    ]
    assert len(classes) > 10
    for cls in classes:
        assert cls.__name__ in doc, cls.__name__


def test_to_dict_carries_details() -> None:
    exc = errors.SpecError("memory must be a size", file="g.toml", key="memory")
    assert exc.to_dict() == {
        "error": "SpecError",
        "message": "memory must be a size",
        "file": "g.toml",
        "key": "memory",
    }
