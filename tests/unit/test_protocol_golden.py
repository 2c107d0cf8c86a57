"""Golden vectors: stock QEMU 7.2 proxy <-> stock x-remote traffic, decoded and re-encoded exactly.

The JSON was recorded by tests/data/golden_mpqemu/record.py (a relay between the two stock
processes while SeaBIOS boots). Each frame must decode through the endpoint of the receiving role
and re-encode, through the endpoint of the sending role, to the identical bytes and fd count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpqemu_mgmt.protocol import (
    Cmd,
    MessageReceived,
    OwnedFd,
    ProxyEndpoint,
    RemoteEndpoint,
    ReplyReceived,
    State,
    close_message,
    encode,
)
from mpqemu_mgmt.protocol.messages import message_fds

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_mpqemu" / "pci-testdev-boot.json"


class FakeFds:
    """Fd numbers that are never real; the closer records what the codec closes."""

    def __init__(self) -> None:
        self.next = 10_000
        self.closed: list[int] = []

    def make(self, n: int) -> list[OwnedFd]:
        out = [OwnedFd(self.next + i, self.closed.append) for i in range(n)]
        self.next += n
        return out


def frames() -> list[dict[str, object]]:
    return list(json.loads(GOLDEN.read_text())["frames"])


def test_golden_file_covers_every_command() -> None:
    seen = {(f["dir"], int.from_bytes(bytes.fromhex(str(f["hex"])[:8]), "little")) for f in frames()}
    to_remote = {c for d, c in seen if d == "to_remote"}
    assert to_remote == {int(c) for c in Cmd if c is not Cmd.RET}
    assert {c for d, c in seen if d == "to_proxy"} == {int(Cmd.RET)}


def test_every_frame_decodes_and_reencodes_identically() -> None:
    counts = replay(frames())
    assert counts["to_remote"] > 100 and counts["to_proxy"] > 50


def replay(recorded: list[dict[str, object]]) -> dict[str, int]:
    """Decode every frame with the receiving role, re-encode with the sending role, compare bytes."""
    fake = FakeFds()
    remote, proxy = RemoteEndpoint(), ProxyEndpoint()
    counts = {"to_remote": 0, "to_proxy": 0}
    for frame in recorded:
        data = bytes.fromhex(str(frame["hex"]))
        nfds = int(str(frame["nfds"]))
        if frame["dir"] == "to_remote":
            events = remote.receive_data(data, fake.make(nfds))
            assert len(events) == 1 and isinstance(events[0], MessageReceived), frame
            msg = events[0].message
            assert len(message_fds(msg)) == nfds
            # The proxy role, sending the same message, produces the same bytes and fd count.
            sent, sent_fds = proxy.send(msg)
            assert sent == data
            assert len(sent_fds) == nfds
            assert encode(msg)[0] == data
            close_message(msg)
        else:
            assert remote.state is State.REPLY_DUE
            reply_events = proxy.receive_data(data)
            assert len(reply_events) == 1 and isinstance(reply_events[0], ReplyReceived)
            ret = reply_events[0].reply
            sent, sent_fds = remote.send(ret)
            assert sent == data and sent_fds == ()
        counts[str(frame["dir"])] += 1
    # Every fd handed in was closed exactly once (by close_message), none twice, none leaked.
    assert sorted(fake.closed) == list(range(10_000, fake.next))
    return counts


@pytest.mark.parametrize("cmd", [Cmd.DEVICE_RESET])
def test_stock_reset_reply_has_no_payload(cmd: Cmd) -> None:
    # protocol.md §2.2: the stock remote answers DEVICE_RESET with a size-0 RET.
    all_frames = frames()
    for i, f in enumerate(all_frames):
        if f["dir"] == "to_remote" and int.from_bytes(bytes.fromhex(str(f["hex"])[:8]), "little") == cmd:
            assert all_frames[i + 1]["hex"] == "01000000000000000000000000000000"
