"""A slice of the guest-controlled fuzz campaign (the full one: ``python -m
mpqemu_mgmt.testing.fuzz_devices``, 100,000 accesses per model)."""

from __future__ import annotations

import pytest

from mpqemu_mgmt.devices import catalogue
from mpqemu_mgmt.testing import fuzz_devices
from mpqemu_mgmt.testing.fuzz_devices import FuzzFailure, fuzz_model


@pytest.mark.parametrize("model", catalogue.names())
def test_fuzz_slice(model: str) -> None:
    res = fuzz_model(model, 3000, seed=7)
    assert res.accesses == 3000
    if model == "edu":
        assert res.dma_accesses > 0 and res.status["dma"]["failed"] > 0  # both paths were exercised
        assert res.irq_edges > 0


def test_fuzz_detects_an_escaping_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The campaign must be able to fail: an edu whose DMA lets the memory's refusal escape."""
    from mpqemu_mgmt.devices import edu

    def reckless_dma(self: edu.Edu) -> None:
        self.host.memory.write(0xA0000, b"x" * 16)  # the hole after low RAM: DmaError escapes

    monkeypatch.setattr(edu.Edu, "_dma_timer", reckless_dma)
    with pytest.raises(FuzzFailure, match="device model bug"):
        fuzz_devices.fuzz_model("edu", 3000, seed=7)


def test_fuzz_detects_memory_that_lets_dma_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """...and a guest-memory layer whose bounds check is broken (writes reach the canaries)."""
    from mpqemu_mgmt.remote.memory import MappedGuestMemory

    def no_bounds(self: MappedGuestMemory, gpa: int, length: int) -> list[tuple[object, int, int]]:
        m = self._regions[0] if gpa < 0x100000 else self._regions[1]
        return [(m, gpa - m.gpa, length)]

    def unchecked_write(self: MappedGuestMemory, gpa: int, data: bytes) -> None:
        for m, off, n in no_bounds(self, gpa, len(data)):
            m.map[m.delta + off : m.delta + off + n] = data[: max(0, len(m.map) - m.delta - off)]  # type: ignore[attr-defined]

    monkeypatch.setattr(MappedGuestMemory, "contains", lambda self, gpa, length: True)
    monkeypatch.setattr(MappedGuestMemory, "write", unchecked_write)
    with pytest.raises(FuzzFailure):
        fuzz_devices.fuzz_model("edu", 20000, seed=7)
