# edu_find.sh: the start of every edu guest script (inlined where a script has the line
# ". ./edu_find.sh", by mpqemu_mgmt.guestkit.scripts.script_text). Defines the ok/bad reporters
# (bad counts into $fail) and sets $dev to the sysfs directory of the edu (1234:11e8) under test:
# the first one, or the one named by EDU_BDF. Without one it reports "FAIL find" and exits 1.
fail=0
ok() { echo "ok $*"; }
bad() { echo "FAIL $*"; fail=$((fail + 1)); }

dev=
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ] || continue
  [ -n "$EDU_BDF" ] && [ "${d##*/}" != "$EDU_BDF" ] && continue
  dev=$d
  break
done
if [ -z "$dev" ]; then
  bad find "no 1234:11e8 in /sys/bus/pci/devices"
  exit 1
fi
ok find "${dev##*/}"
