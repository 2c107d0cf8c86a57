"""Orchestration: plans (pure data), monitor channels (qemu.qmp / libvirt), the runner that executes a
plan with rollback, the main QEMU's command line, and the drivers the service calls (driver.py).
heartbeat.py (supervision) belongs to the supervisor, not to this package's drivers.
"""
