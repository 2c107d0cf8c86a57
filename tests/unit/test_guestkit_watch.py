"""The replug proof of the PCI-watching guest (guestkit/watch_guest.py): the kernel's enumeration lines
counted per slot, and the verdict on a replug. Pure: console text in, facts out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpqemu_mgmt.guestkit.watch_guest import (
    EDU,
    LSI,
    Enumerated,
    SlotView,
    parse_enumerations,
    reenumerated,
    short_name,
    slot_of,
    slot_view,
)

# What a Debian 12 guest (6.1) prints at boot without ``quiet``, then on an ACPI hot-add of the edu
# in slot 3 (replug); PCISET lines come from scripts/pci_watch.sh.
BOOT = (
    "[    0.412345] pci 0000:00:00.0: [8086:1237] type 00 class 0x060000\r\n"
    "[    0.413000] pci 0000:00:03.0: [1234:11e8] type 00 class 0x00ff00\r\n"
    "[    0.413100] pci 0000:00:03.0: reg 0x10: [mem 0xfea00000-0xfeafffff]\r\n"
    "[    0.414000] pci 0000:00:04.0: [1000:0012] type 00 class 0x010000\r\n"
    "DEMO-READY\r\n"
    "PCISET 0000:00:00.0=0x8086:0x1237 0000:00:03.0=0x1234:0x11e8 0000:00:04.0=0x1000:0x0012\r\n"
)
REPLUG = (
    "[   12.000001] pci 0000:00:03.0: [1234:11e8] type 00 class 0x00ff00\r\n"
    "[   12.000200] pci 0000:00:03.0: BAR 0: assigned [mem 0xfea00000-0xfeafffff]\r\n"
)


def test_parse_enumerations_spells_ids_like_the_listing() -> None:
    assert parse_enumerations(BOOT) == [
        Enumerated("0000:00:00.0", "0x8086:0x1237"),
        Enumerated("0000:00:03.0", EDU),
        Enumerated("0000:00:04.0", LSI),
    ]
    # newer kernels append the device type; a line without the type field is not an enumeration
    assert parse_enumerations("pci 0000:00:05.0: [1b36:0005] type 00 class 0x00ff00 conventional PCI "
                              "endpoint\npci 0000:00:03.0: [1234:11e8] BAR\nnothing") == [
        Enumerated("0000:00:05.0", "0x1b36:0x0005")]


@pytest.mark.parametrize(("text", "ids", "bdf", "count", "listed"), [
    (BOOT, EDU, "0000:00:03.0", 1, True),
    (BOOT + REPLUG, EDU, "0000:00:03.0", 2, True),
    (BOOT + REPLUG + REPLUG, EDU, "0000:00:03.0", 3, True),
    (BOOT + REPLUG, LSI, "0000:00:04.0", 1, True),
    (BOOT + REPLUG, EDU, "0000:00:04.0", 0, False),  # another slot: not this device's
    (BOOT + "PCISET 0000:00:04.0=0x1000:0x0012\n", EDU, "0000:00:03.0", 1, False),  # listed gone
    ("", EDU, "0000:00:03.0", 0, False),
])
def test_slot_view(text: str, ids: str, bdf: str, count: int, listed: bool) -> None:
    assert slot_view(text, ids, bdf) == SlotView(bdf, ids, count, listed)


def test_slot_of_and_short_name() -> None:
    assert slot_of(BOOT, EDU) == "0000:00:03.0"
    assert slot_of(BOOT, "0x1b36:0x0005") is None
    assert slot_of("no listing", EDU) is None
    assert short_name(EDU, "0000:00:03.0") == "1234:11e8 at 00:03.0"
    assert slot_view(BOOT, LSI, "0000:00:04.0").name == "1000:0012 at 00:04.0"


def test_reenumerated_needs_exactly_the_replugs_and_the_device_listed() -> None:
    before = slot_view(BOOT, EDU, "0000:00:03.0")
    # the replug that did nothing in the guest: the listing still shows the edu, yet it is no proof
    assert reenumerated(before, slot_view(BOOT, EDU, "0000:00:03.0")) == (
        "the guest's kernel enumerated 1234:11e8 at 00:03.0 0 time(s) since, not 1")
    assert reenumerated(before, slot_view(BOOT + REPLUG, EDU, "0000:00:03.0")) is None
    assert reenumerated(before, slot_view(BOOT + REPLUG * 2, EDU, "0000:00:03.0")) is not None
    assert reenumerated(before, slot_view(BOOT + REPLUG * 2, EDU, "0000:00:03.0"), times=2) is None
    assert reenumerated(before, slot_view(BOOT, EDU, "0000:00:03.0"), times=0) is None
    gone = BOOT + REPLUG + "PCISET 0000:00:00.0=0x8086:0x1237\n"
    assert reenumerated(before, slot_view(gone, EDU, "0000:00:03.0")) == (
        "the guest's PCI listing does not show 1234:11e8 at 00:03.0")


@given(st.lists(st.sampled_from(["edu", "lsi", "noise", "set"]), max_size=30))
def test_counts_follow_the_lines(events: list[str]) -> None:
    """Whatever else is on the console, each device's count is its own enumeration lines in its slot."""
    lines = {
        "edu": "[  1.0] pci 0000:00:03.0: [1234:11e8] type 00 class 0x00ff00",
        "lsi": "pci 0000:00:04.0: [1000:0012] type 00 class 0x010000",
        "noise": "[  2.0] pci 0000:00:03.0: reg 0x10: [mem 0xfea00000-0xfeafffff] type",
        "set": "PCISET 0000:00:03.0=0x1234:0x11e8",
    }
    text = "\r\n".join(lines[e] for e in events)
    assert slot_view(text, EDU, "0000:00:03.0").enumerations == events.count("edu")
    assert slot_view(text, LSI, "0000:00:04.0").enumerations == events.count("lsi")
    assert slot_view(text, EDU, "0000:00:03.0").listed == ("set" in events)
