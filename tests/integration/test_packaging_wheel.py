"""The wheel carries the data folders: an installed (not editable) package finds xml/, qmp/, policies/."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_data_folders_and_an_installed_package_finds_them(tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="hatchling (test extra) builds the wheel without network")
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=120,
    )
    (wheel,) = out.glob("mpqemu_mgmt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ("xml", "qmp", "policies"):
        tracked = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()}
        prefix = f"mpqemu_mgmt/_data/{folder}/"
        shipped = {n.removeprefix("mpqemu_mgmt/_data/") for n in names if n.startswith(prefix)}
        assert tracked <= shipped, sorted(tracked - shipped)
    # top-level xml/ in a wheel would shadow the standard library's xml package
    assert not any(n.startswith(("xml/", "qmp/", "policies/")) for n in names)

    # Unpacked on its own (no checkout next to it), the package resolves its data from _data.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "from mpqemu_mgmt.resources import data_dir, repo_root;"
        "print(data_dir('policies')); print(data_dir('xml')); print(repo_root())"
    )
    res = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=30, check=True)
    policies, xml, root = res.stdout.split()
    assert policies == str(site / "mpqemu_mgmt" / "_data" / "policies")
    assert xml == str(site / "mpqemu_mgmt" / "_data" / "xml")
    assert root == "None"
