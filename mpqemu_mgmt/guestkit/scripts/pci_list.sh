#!/bin/sh
# Print every PCI function the guest sees, as read from its sysfs (parsed on the host by
# mpqemu_mgmt.guestkit.pcilist):
#   PCI <bdf> <vendor> <device> <class>
#   RES <bdf> <bar> <start> <end> <flags>      one line per implemented BAR 0..5 (resource file)
for d in /sys/bus/pci/devices/*; do
  b=${d##*/}
  echo "PCI $b $(cat "$d/vendor") $(cat "$d/device") $(cat "$d/class")"
  i=0
  while read -r start end flags; do
    [ "$i" -le 5 ] && [ "$((end))" -ne 0 ] && echo "RES $b $i $start $end $flags"
    i=$((i + 1))
  done < "$d/resource"
done
