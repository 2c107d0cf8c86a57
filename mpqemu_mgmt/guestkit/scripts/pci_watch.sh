#!/bin/sh
# Print the guest's PCI functions once, then again whenever they change (parsed on the host by
# mpqemu_mgmt.guestkit.watch_guest.parse_pci_sets), until the guest is stopped:
#   PCISET <bdf>=<vendor>:<device> ...
# PCI_WATCH_READY (environment) is the line printed first, so a console log shows who started it.
# The listing is polled: a replug (~0.15 s) can fall between two polls and leave it unchanged, so
# it shows what is on the bus, never that a device left and came back. That proof is the kernel's
# own enumeration line on the console (boot without quiet), counted by watch_guest.slot_view.
echo "${PCI_WATCH_READY:-WATCH-READY}"
prev=""
while :; do
  cur=""
  for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] && cur="$cur ${d##*/}=$(cat "$d/vendor"):$(cat "$d/device")"
  done
  if [ "$cur" != "$prev" ]; then echo "PCISET$cur"; prev="$cur"; fi
  sleep 0.2
done
