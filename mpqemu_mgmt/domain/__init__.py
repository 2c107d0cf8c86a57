"""Guest definition: the TOML spec (spec), the domain XML model (model, the only lxml user), the
policy that turns one into the other (designer), the PCI placement both drivers share (topology),
and the libvirt connection owner (libvirt_host, the only ``import libvirt``).

Everything here except ``libvirt_host`` and ``spec.load_spec`` is pure.
"""
