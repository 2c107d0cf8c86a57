"""Live golden check: relay a stock x-pci-proxy-dev (pc, TCG, memfd RAM, SeaBIOS) to a stock
x-remote pci-testdev now, and replay what was recorded through the codec byte for byte.

This keeps the committed vectors honest: if the installed QEMU spoke differently, this fails even
though the committed JSON still passes tests/unit/test_protocol_golden.py.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.unit.test_protocol_golden import replay

pytestmark = pytest.mark.timeout(90)

RECORDER = Path(__file__).resolve().parents[1] / "data" / "golden_mpqemu" / "record.py"


def test_live_stock_traffic_round_trips(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 (7.2) is not installed")
    spec = importlib.util.spec_from_file_location("golden_record", RECORDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    frames = module.record(2.0, tmp_path)
    cmds = {int.from_bytes(bytes.fromhex(f["hex"][:8]), "little") for f in frames if f["dir"] == "to_remote"}
    assert cmds == {0, 2, 3, 4, 5, 6, 7}, "the boot did not produce every proxy command"
    counts = replay(frames)
    assert counts["to_proxy"] > 50
