# tests/vm/guest-blockdev.sh: the guest's half of test-vm-blockdev.sh
# (/test.sh, run by guest-init.sh with sh -e -x).  /dev/vda is a qnbd
# export that QEMU reaches over TLS as its NBD client; the guest makes an
# ext4 on it, writes files, reads them back from the disk and prints
# their checksums for the host, which reads the image after power-off.
#
# /etc/vmtest.env: VM_SIZE (bytes).  /data/pattern: bytes the host made.

. /etc/vmtest.env
dev=/dev/vda

test "$(blockdev --getsize64 "$dev")" = "$VM_SIZE"
mkfs.ext4 -q -F -E lazy_itable_init=1 "$dev"
mount -t ext4 "$dev" /mnt
cp /data/pattern /mnt/pattern
dd if=/dev/urandom of=/mnt/random bs=1M count=8
mkdir /mnt/dir
set +x
i=0
while [ "$i" -lt 40 ]; do
    echo "small file $i" > "/mnt/dir/f$i"
    i=$((i + 1))
done
set -x
dd if=/dev/urandom of=/mnt/gone bs=1M count=4
sync
rm /mnt/gone
md5sum /mnt/random > /tmp/random.md5
umount /mnt
# What the disk holds now, not what the page cache remembers.
echo 3 > /proc/sys/vm/drop_caches
e2fsck -fn "$dev"
mount -t ext4 -o ro "$dev" /mnt
cmp /data/pattern /mnt/pattern
md5sum -c /tmp/random.md5
test "$(cat /mnt/dir/f39)" = "small file 39"
set +x
echo "QNBD-VM-MD5 random $(cut -d' ' -f1 /tmp/random.md5)"
set -x
umount /mnt
