"""Confinement of remote device processes (issue 6; design in reference/confinement.md §8).

Pure: ``profile`` (what to apply), ``policy`` (seccomp policy files), ``namespaces`` (bwrap argv).
IO shell: ``seccomp_loader`` (the only libseccomp import), ``lockdown`` (inside the remote),
``credentials`` (uid/gid, rlimits), ``launcher`` (spawns one confined remote), ``violations``
(reads the kernel audit log).
"""
