"""The long-running management service (``mpqemu-mgmt serve``) and the files it keeps.

Modules, one job each: ``records`` (pure guest/device records and their JSON form), ``store``
(atomic per-guest state files), ``events`` and ``audit`` (JSON-lines logs), ``metrics`` (Prometheus
text), ``control`` (the UNIX-socket control API: codec, server, client), ``supervisor`` (pidfd and
QMP watches feeding the HealthPolicy, executing its actions) and ``daemon`` (the request handlers).
"""
