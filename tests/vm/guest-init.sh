#!/bin/sh
# tests/vm/guest-init.sh: /init of the VM tests' guest (busybox sh, no
# systemd).  It mounts the pseudo file systems, loads the modules of
# /etc/modules.order, brings up the network when /etc/vmtest.env sets
# VM_NET=1 (QEMU user networking: the guest is 10.0.2.15, the host
# 10.0.2.2), runs /test.sh with "sh -e -x", prints one line
#
#   QNBD-VM-RESULT: PASS        or        QNBD-VM-RESULT: FAIL <why>
#
# on the console, and powers off.  The host's test reads that line.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# result TEXT: the marker, then power off (an /init that returns would
# panic the kernel instead).
result ()
{
    sync
    echo
    echo "QNBD-VM-RESULT: $*"
    poweroff -f
    sleep 60
}

. /etc/vmtest.env

for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m" || result "FAIL insmod $m"
done

if [ "${VM_NET:-0}" = 1 ]; then
    ip link set lo up || result "FAIL lo"
    ip link set eth0 up || result "FAIL eth0 up"
    ip addr add 10.0.2.15/24 dev eth0 || result "FAIL eth0 address"
    ip route add default via 10.0.2.2 || result "FAIL route"
fi

echo "guest: kernel $(uname -r), $(date -u), running /test.sh"
# The trace shows seconds since boot.
export PS4='+ [$(cut -d" " -f1 /proc/uptime)] '
if sh -e -x /test.sh; then
    result PASS
else
    result "FAIL /test.sh exited with status $?"
fi
