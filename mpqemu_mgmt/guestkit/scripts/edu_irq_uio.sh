#!/bin/sh
# edu_irq_uio.sh: an edu's INTx must reach the guest kernel. Binds the edu (1234:11e8) to
# uio_pci_generic, which masks INTx with the Interrupt Disable bit in its handler
# (drivers/uio/uio_pci_generic.c irqhandler, pci_check_and_mask_intx) and counts events in
# /dev/uioN. It has no irqcontrol: user space unmasks by clearing Interrupt Disable (command bit 10)
# in config space itself (Documentation/driver-api/uio-howto.rst). Twice: unmask, raise via edu
# register 0x60, wait for the event, ack via 0x64. Then the uio_pci_generic line of /proc/interrupts must have grown by >= 2.
# Needs modules uio and uio_pci_generic; kernel arg iomem=relaxed (devmem on the BAR while uio
# holds it). Prints ok/FAIL lines; exit status = number of failed checks.

. ./edu_find.sh
read -r bar0 _end _flags < "$dev/resource"
bar0=$((bar0))

echo "1234 11e8" > /sys/bus/pci/drivers/uio_pci_generic/new_id 2>/dev/null
tries=0
while [ ! -d "$dev/uio" ] && [ $tries -lt 100 ]; do usleep 20000; tries=$((tries + 1)); done
if [ ! -d "$dev/uio" ]; then
  bad bind "uio_pci_generic did not bind (INTx masking unsupported or no IRQ?)"
  dmesg | tail -5
  exit $fail
fi
uio=/dev/$(ls "$dev/uio")
ok bind "$uio irq $(cat "$dev/irq")"

irq_count() { # events on the uio_pci_generic line of /proc/interrupts, all CPUs
  awk '/uio_pci_generic/ { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s; exit }' \
    /proc/interrupts
}
before=$(irq_count); before=${before:-0}

# uio counts events per open file: a read returns once the count moved past what it was at open
# (drivers/uio/uio.c uio_open/uio_read), so open before raising.
exec 3<"$uio"
unmask() { # clear PCI_COMMAND_INTX_DISABLE: bit 2 of the command register's high byte (offset 5)
  local hi
  hi=$(dd if="$dev/config" bs=1 skip=5 count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
  printf "\\$(printf %03o $((hi & ~4 & 255)))" | dd of="$dev/config" bs=1 seek=5 count=1 conv=notrunc 2>/dev/null
}
round=1
while [ $round -le 2 ]; do
  unmask
  devmem $((bar0 + 0x60)) 32 1                          # edu: raise
  events=$(timeout 5 dd bs=4 count=1 <&3 2>/dev/null | od -An -tu4 | tr -d ' ')
  devmem $((bar0 + 0x64)) 32 1                          # edu: ack, line goes low
  if [ -n "$events" ] && [ "$events" -ge $round ]; then
    ok "event$round" "uio count $events"
  else
    bad "event$round" "no interrupt within 5 s (uio count '${events}')"
  fi
  round=$((round + 1))
done
exec 3<&-

after=$(irq_count); after=${after:-0}
[ $((after - before)) -ge 2 ] && ok proc_interrupts "$before -> $after" \
  || bad proc_interrupts "$before -> $after"
grep uio_pci_generic /proc/interrupts
echo "edu_irq_uio: $fail failed"
exit $fail
