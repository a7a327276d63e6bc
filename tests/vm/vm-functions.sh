# tests/vm/vm-functions.sh: helpers of the VM tests ("make check-vm"),
# sourced after ../functions.sh (for $tmpdir, cleanup_fn, the qnbd
# bookkeeping and the certificates).
#
# A VM test boots the host's own distribution kernel under QEMU (KVM when
# /dev/kvm is usable, TCG otherwise) with an initramfs built here by
# mkinitramfs.sh: static busybox, the host programs the guest needs and
# their libraries, the kernel modules, /init = guest-init.sh, /test.sh =
# the guest's half of the test.  The guest prints QNBD-VM-RESULT on its
# serial console, which QEMU writes to a file, and powers off.
#
# Environment:
#   QNBD_VM_KERNEL    the kernel image (default: the newest readable
#                     /boot/vmlinuz-* whose /lib/modules exists)
#   QNBD_VM_TIMEOUT   seconds a guest may run before it is killed (240)
#   QNBD_VM_ACCEL     kvm or tcg (default: kvm when /dev/kvm can be opened,
#                     falling back to tcg)

vmdir=$srcdir/vm
# mkfs.ext4, e2fsck, debugfs and nbd-client live in sbin.
PATH=$PATH:/usr/sbin:/sbin
: "${QNBD_VM_TIMEOUT:=240}"

# The log ends with the test's duration (bash's SECONDS since it began).
_vm_took ()
{
    echo "$0: ran for ${SECONDS}s" >&2
}
cleanup_fn _vm_took

# vm_requires: skip (77) only where this host cannot boot a guest at all:
# no QEMU, or no kernel we may read with its modules.  What else the
# test needs is checked by vm_needs, which fails.  Sets vm_kernel,
# vm_kver, vm_accel.
vm_requires ()
{
    local -
    set +x
    local k
    requires qemu-system-x86_64
    vm_kernel=${QNBD_VM_KERNEL:-}
    if [ -z "$vm_kernel" ]; then
        for k in $(ls /boot/vmlinuz-* 2>/dev/null | sort -rV); do
            if [ -r "$k" ] && [ -d "/lib/modules/${k#/boot/vmlinuz-}" ]; then
                vm_kernel=$k
                break
            fi
        done
    fi
    if [ -z "$vm_kernel" ] || [ ! -r "$vm_kernel" ]; then
        echo "$0: SKIP: no readable kernel with modules (/boot/vmlinuz-*;" \
             "apt-get install linux-image-amd64, or set QNBD_VM_KERNEL)" >&2
        exit 77
    fi
    vm_kver=${vm_kernel##*/vmlinuz-}
    if [ ! -f "/lib/modules/$vm_kver/modules.dep" ]; then
        echo "$0: SKIP: no /lib/modules/$vm_kver/modules.dep for $vm_kernel" >&2
        exit 77
    fi
    vm_accel=${QNBD_VM_ACCEL:-}
    if [ -z "$vm_accel" ]; then
        if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
            # (TCG still, should KVM refuse to start.)
            vm_accel=kvm:tcg
        else
            vm_accel=tcg
        fi
    fi
    echo "guest kernel $vm_kernel, accelerator $vm_accel" >&2
    vm_needs cpio gzip ldd
    if ! { [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; }; then
        echo "$0: FAIL: no static /bin/busybox (apt-get install busybox-static)" >&2
        exit 1
    fi
}

# vm_needs CMD...: fail unless every CMD is on PATH (with /usr/sbin and
# /sbin): the VM tests skip only where QEMU cannot run.
vm_needs ()
{
    local -
    set +x
    local c
    for c in "$@"; do
        if ! PATH=$PATH:/usr/sbin:/sbin command -v "$c" >/dev/null 2>&1; then
            echo "$0: FAIL: required program '$c' not found (.ci/run lists" \
                 "the packages of make check-vm)" >&2
            exit 1
        fi
    done
}

# vm_free_port: a TCP port on 127.0.0.1 that nobody listens on now.
vm_free_port ()
{
    "$PYTHON" -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# start_qnbd_tcp PORT [ARGS...] IMAGE: $QNBD on 127.0.0.1:PORT (only),
# stopped by pid at exit like start_qnbd's; waits for its pid file.
# Sets qnbd_pid.
start_qnbd_tcp ()
{
    local -
    set +x
    local port=$1 n pidfile errfile i aio=()
    shift
    _qnbd_count=$(( _qnbd_count + 1 ))
    n=$_qnbd_count
    pidfile=$tmpdir/qnbd$n.pid
    errfile=$tmpdir/qnbd$n.err
    if [ -n "$QNBD_TEST_AIO" ]; then
        aio=("--aio=$QNBD_TEST_AIO")
    fi
    echo "+ $QNBD -b 127.0.0.1 -p $port --pid-file $pidfile ${aio[*]} $*" >&2
    "$QNBD" -b 127.0.0.1 -p "$port" --pid-file "$pidfile" "${aio[@]}" "$@" \
        </dev/null >"$tmpdir/qnbd$n.out" 2>"$errfile" &
    qnbd_pid=$!
    _qnbd_errfile[$qnbd_pid]=$errfile
    cleanup_fn _qnbd_cleanup "$qnbd_pid"
    for (( i = 0; i < QNBD_START_TIMEOUT; i++ )); do
        [ -s "$pidfile" ] && break
        if ! _qnbd_alive "$qnbd_pid"; then
            _qnbd_reap "$qnbd_pid"
            echo "$0: qnbd exited with status ${_qnbd_status[$qnbd_pid]} before it was ready" >&2
            _qnbd_show_stderr "$qnbd_pid"
            return 1
        fi
        sleep 0.1
    done
    if [ ! -s "$pidfile" ]; then
        echo "$0: qnbd (pid $qnbd_pid) not listening after $(( QNBD_START_TIMEOUT / 10 ))s" >&2
        _qnbd_show_stderr "$qnbd_pid"
        return 1
    fi
    echo "qnbd (pid $qnbd_pid) listening on 127.0.0.1:$port" >&2
}

# vm_initramfs OUTPUT GUEST-TEST [mkinitramfs.sh options...]: the
# initramfs with guest-init.sh as /init and GUEST-TEST as /test.sh.
vm_initramfs ()
{
    local out=$1 test=$2
    shift 2
    bash "$vmdir/mkinitramfs.sh" -k "$vm_kver" -i "$vmdir/guest-init.sh" \
         -f "$test:/test.sh" "$@" "$out"
}

# vm_boot NAME INITRAMFS [QEMU ARGS...]: boot the guest (512 MiB, one
# CPU, no display, no default devices, console on the first serial port
# written to $tmpdir/NAME.console), wait at most QNBD_VM_TIMEOUT seconds,
# copy the console into the test log and succeed only if the guest
# printed "QNBD-VM-RESULT: PASS".
vm_boot ()
{
    local name=$1 initrd=$2 console st=0 t0
    shift 2
    console=$tmpdir/$name.console
    t0=$(date +%s)
    timeout -k 10 "$QNBD_VM_TIMEOUT" \
        qemu-system-x86_64 -nodefaults -no-user-config -display none \
        -machine q35,accel="$vm_accel" -cpu max -smp 1 -m 512 \
        -kernel "$vm_kernel" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 loglevel=4 rdinit=/init" \
        -serial "file:$console" -monitor none -no-reboot \
        -device virtio-rng-pci \
        "$@" </dev/null || st=$?
    echo "--- console of guest $name ($(( $(date +%s) - t0 ))s, qemu status $st) ---" >&2
    tr -d '\r' < "$console" >&2 || true
    echo "--- end of console of guest $name ---" >&2
    if [ "$st" -eq 124 ] || [ "$st" -eq 137 ]; then
        echo "$0: guest $name still running after ${QNBD_VM_TIMEOUT}s: killed" >&2
        return 1
    fi
    if [ "$st" -ne 0 ]; then
        echo "$0: qemu-system-x86_64 (guest $name) exited with status $st" >&2
        return 1
    fi
    if ! tr -d '\r' < "$console" | grep -qx 'QNBD-VM-RESULT: PASS'; then
        echo "$0: guest $name did not report PASS:" \
             "$(tr -d '\r' < "$console" | grep '^QNBD-VM-RESULT:' || echo 'no result line')" >&2
        return 1
    fi
}

# vm_console_value NAME KEY: the value the guest printed as "KEY VALUE" on
# a line of its console.
vm_console_value ()
{
    tr -d '\r' < "$tmpdir/$1.console" | sed -n "s/^$2 //p" | tail -n 1
}
