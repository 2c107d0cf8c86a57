"""Suite-wide fixtures and the marker rule: a test's folder names its layer."""

from __future__ import annotations

from pathlib import Path

import pytest

_LAYERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for layer in _LAYERS:
            if layer in parts:
                item.add_marker(getattr(pytest.mark, layer))
