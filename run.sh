#!/usr/bin/env bash
# The two set-up commands of the README, on a fresh Debian 12 machine as root:
#   ./run.sh demo    install what is missing, then run the demo
#   ./run.sh test    install what is missing, then run the whole test suite (mypy, ruff, pytest)
# Idempotent: apt packages are installed only when missing, the venv is rebuilt only when
# pyproject.toml changed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

APT_PACKAGES=(
  qemu-system-x86 qemu-utils bubblewrap busybox-static debootstrap dpkg-dev
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev libseccomp-dev
  pkg-config gcc python3 python3-venv python3-dev procps kmod xz-utils
)

log() { printf '[run.sh] %s\n' "$*" >&2; }

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
}

install_venv() {
  local py=/usr/bin/python3
  [ -x "$py" ] || py="$(command -v python3)"
  local stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $py"
    "$py" -m venv .venv
    .venv/bin/pip install -q --upgrade pip >&2
  fi
  if [ ! -f "$stamp" ]; then
    log "installing the package and its test extra into .venv"
    .venv/bin/pip install -q -e '.[test]' >&2
    rm -f .venv/.installed-*
    touch "$stamp"
  fi
}

start_libvirt() {
  # libvirtd is not started by systemd in CI containers; the tests need it (issue 7).
  pgrep -x virtlogd >/dev/null || virtlogd -d || true
  pgrep -x libvirtd >/dev/null || libvirtd -d || true
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo)
    install_apt; install_venv; start_libvirt
    exec .venv/bin/mpqemu-mgmt demo "$@"
    ;;
  test)
    install_apt; install_venv; start_libvirt
    log "mypy --strict"
    .venv/bin/mypy
    log "ruff check"
    .venv/bin/ruff check .
    log "pytest"
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh demo|test [pytest args]" >&2
    exit 2
    ;;
esac
