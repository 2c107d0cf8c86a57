"""The long-running management service (``mpqemu-mgmt serve``) and the files it keeps.

Modules, one job each: ``records`` (pure guest/device records and their JSON form), ``store``
(atomic per-guest state files), ``events`` and ``audit`` (JSON-lines logs), ``metrics`` (Prometheus
text), ``control`` (the UNIX-socket control API: codec, server, client), ``supervisor`` (pidfd and
QMP watches feeding the HealthPolicy, executing its actions) and ``daemon`` (the request handlers).
The service must not speak the mpqemu or vfio-user protocol itself, nor import libvirt: guests are
driven through :mod:`mpqemu_mgmt.orchestrate`, which owns those channels.
"""
