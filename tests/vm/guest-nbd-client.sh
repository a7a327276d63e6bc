# tests/vm/guest-nbd-client.sh: the guest's half of test-vm-nbd-client.sh
# (/test.sh, run by guest-init.sh with sh -e -x).  The kernel's NBD client,
# attached by nbd-client over TLS to qnbd on the host (10.0.2.2 through
# QEMU's user network), first with one connection, then with two.
#
# /etc/vmtest.env: VM_PORT, VM_EXPORT, VM_SIZE (bytes).  /certs: the
# client's certificate, key and CA.  /data/pattern: bytes the host made,
# which it reads back from the image afterwards.

. /etc/vmtest.env
dev=/dev/nbd0

# attach [ARGS]: nbd-client over TLS; the host name checked against the
# server's certificate is the one in it, localhost.
attach ()
{
    nbd-client 10.0.2.2 "$VM_PORT" "$dev" -N "$VM_EXPORT" \
        -certfile /certs/client-cert.pem -keyfile /certs/client-key.pem \
        -cacertfile /certs/ca-cert.pem -tlshostname localhost "$@"
    test "$(blockdev --getsize64 "$dev")" = "$VM_SIZE"
}

# detach: nbd-client -d, then wait (bounded) until the kernel has let the
# device go.
detach ()
{
    nbd-client -d "$dev"
    i=0
    while [ -e /sys/block/nbd0/pid ]; do
        i=$((i + 1))
        test "$i" -lt 100
        sleep 0.1
    done
}

# --- One connection: a new ext4, files written, checked. -------------
attach
mkfs.ext4 -q -F -E lazy_itable_init=1 "$dev"
mount -t ext4 "$dev" /mnt
cp /data/pattern /mnt/pattern
dd if=/dev/urandom of=/mnt/random1 bs=1M count=8
mkdir /mnt/dir
set +x
i=0
while [ "$i" -lt 40 ]; do
    echo "small file $i" > "/mnt/dir/f$i"
    i=$((i + 1))
done
set -x
md5sum /mnt/random1 > /tmp/random1.md5
umount /mnt
e2fsck -fn "$dev"
detach

# --- Two connections: the same bytes come back (from the server: the
# device was detached, its caches are gone), more are written, and
# deletions are discarded. ---------------------------------------------
attach -C 2
e2fsck -fn "$dev"
mount -t ext4 -o discard "$dev" /mnt
cmp /data/pattern /mnt/pattern
md5sum -c /tmp/random1.md5
set +x
i=0
while [ "$i" -lt 40 ]; do
    test "$(cat "/mnt/dir/f$i")" = "small file $i"
    i=$((i + 1))
done
set -x
dd if=/dev/urandom of=/mnt/random2 bs=1M count=8
dd if=/dev/urandom of=/mnt/gone bs=1M count=4
sync
rm /mnt/gone /mnt/dir/f1*
# (md5sum is slow under TCG: each file is summed once, and random1 was
# checked above.)
md5sum /mnt/random2 > /tmp/random2.md5
set +x
echo "QNBD-VM-MD5 random1 $(cut -d' ' -f1 /tmp/random1.md5)"
echo "QNBD-VM-MD5 random2 $(cut -d' ' -f1 /tmp/random2.md5)"
set -x
umount /mnt
e2fsck -fn "$dev"
detach
