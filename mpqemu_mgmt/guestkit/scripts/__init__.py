"""Guest shell scripts (busybox sh) shipped as package data, and a loader for them.

Each ``*.sh`` here runs inside the test guest as ``/guest/<name>``; its exit status comes back as
:attr:`mpqemu_mgmt.guestkit.boot.BootResult.status`. A line ``. ./<snippet>.sh`` in a script stands
for a shared snippet (``edu_find.sh``: how the edu scripts find their device): :func:`script_text`
inlines it, so the guest always gets one self-contained file, whoever ships it. The scripts report
one ``ok <check> ...`` or ``FAIL <check> ...`` line per check; :func:`verdicts` reads them back from
a console transcript. This module only reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources

from mpqemu_mgmt.errors import GuestKitError
from mpqemu_mgmt.guestkit.initramfs import GuestScript

# edu_check.sh / edu_irq_uio.sh: a 1 MiB window of guest RAM reserved from the kernel (memmap=…$…,
# so STRICT_DEVMEM lets /dev/mem reach it) for DMA buffers, below edu's default 28-bit dma_mask
# (hw/misc/edu.c edu_instance_init) and inside the default 256 MiB guest; iomem=relaxed lets
# devmem touch a BAR even while a driver (uio_pci_generic) holds it.
EDU_DMA_BASE = 0x7000000
EDU_APPEND: tuple[str, ...] = ("iomem=relaxed", f"memmap=1M${EDU_DMA_BASE:#x}")
EDU_ENV: dict[str, str] = {"EDU_DMA_BASE": f"{EDU_DMA_BASE:#x}"}


_SNIPPET = re.compile(r"^\. \./([A-Za-z0-9_][A-Za-z0-9_.-]*\.sh)$", re.MULTILINE)


def _shipped(name: str) -> str:
    try:
        return resources.files(__name__).joinpath(name).read_text()
    except (FileNotFoundError, OSError) as exc:
        raise GuestKitError("no such guest script", script=name) from exc


def script_text(name: str) -> str:
    """The text of the shipped script ``name`` (e.g. ``"edu_check.sh"``), snippets inlined."""
    return _SNIPPET.sub(lambda m: _shipped(m.group(1)).rstrip("\n"), _shipped(name))


def guest_script(name: str, env: Mapping[str, str] | None = None) -> GuestScript:
    """The shipped script ``name`` as a :class:`GuestScript` with ``env`` exported."""
    return GuestScript(script_text(name), name=name, env=dict(env or {}))


def verdicts(transcript: str) -> tuple[set[str], list[str]]:
    """``(passed, failed)``: the names of the checks reported ``ok``, and every ``FAIL`` line. Pure."""
    passed = set(re.findall(r"^ok\s+(\S+)", transcript, re.MULTILINE))
    failed = re.findall(r"^FAIL.*$", transcript, re.MULTILINE)
    return passed, failed
