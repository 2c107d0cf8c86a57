"""Test and benchmark helpers that drive real processes: a stock QEMU x-remote launcher
(:mod:`.stock_remote`), a proxy-role client (:mod:`.proxysim`) and the hostile-input campaign
(:mod:`.fuzz_mpqemu`).

Nothing in production code may import this package; it exists so tests, benchmarks and other
engineers' integration tests share one way of starting and speaking to a remote.
"""
