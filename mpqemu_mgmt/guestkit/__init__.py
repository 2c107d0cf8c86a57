"""The test-guest kit: a Debian cloud kernel, a busybox initramfs built in pure Python, and a
one-call QEMU boot that returns the guest script's exit status (used by tests, benchmarks, demo).

Modules, one job each: :mod:`.cache` (cache dir, build-once under flock), :mod:`.kernel` (apt
download, module lookup), :mod:`.modinfo` (pure module metadata), :mod:`.cpio` (pure newc),
:mod:`.initramfs` (image layout, /init), :mod:`.qemu_argv` (pure argv and verdict parsing),
:mod:`.boot` (runs QEMU), :mod:`.kvm` (can KVM boot Linux here?), :mod:`.qemu11` (QEMU 11.1 from a
debootstrapped sid root through bwrap), :mod:`.scripts` (guest shell scripts shipped as data),
:mod:`.watch_guest` (the guest that prints its PCI functions on the console whenever they change).
Nothing here is imported by production code paths other than the demo.
"""
