"""The ``mpqemu-mgmt`` command line (DESIGN.md Contracts 2 and 3).

:mod:`.app` is the shell (argument parsing, streams, ``--debug``, exit codes), :mod:`.commands`
the commands, :mod:`.formatters` the table and JSON output, :mod:`.demo` the guided tour. It must
not change a guest except through the service (its control API, or the demo's own instance); the
libvirt hook entry hands over to :mod:`mpqemu_mgmt.hook`.
"""
