#!/usr/bin/env bash
# test-vm-nbd-client.sh ("make check-vm"): a Linux guest under QEMU
# attaches a qnbd export with its kernel NBD client (nbd-client over TLS,
# x509, with one connection and then with two), makes an ext4 on it,
# writes and reads back files, checks it with e2fsck and detaches
# (tests/vm/guest-nbd-client.sh).  The guest reaches qnbd, which listens
# on 127.0.0.1 only, through QEMU's user network (10.0.2.2 in the guest).
# Then the host checks the image: qemu-img check, e2fsck, and the files'
# bytes read with debugfs.

source "${srcdir:-.}/functions.sh"
source "$srcdir/vm/vm-functions.sh"
set -e
set -x

vm_requires
vm_needs certtool nbd-client mkfs.ext4 e2fsck debugfs qemu-img "$PYTHON"

pki=$tmpdir/pki
make_ca "$pki/ca"
make_cert "$pki/ca" "$pki/server" server
make_cert "$pki/ca" "$pki/client" client

size=$((256 << 20))
img=$tmpdir/disk.qcow2
qemu-img create -f qcow2 "$img" "$size"
head -c $((4 << 20)) /dev/urandom > "$tmpdir/pattern"

port=$(vm_free_port)
cat > "$tmpdir/vmtest.env" <<EOT
VM_NET=1
VM_PORT=$port
VM_EXPORT=vmdisk
VM_SIZE=$size
EOT
vm_initramfs "$tmpdir/initrd.gz" "$srcdir/vm/guest-nbd-client.sh" \
    -m nbd -m ext4 -m crc32c_generic -m virtio_pci -m virtio_net \
    -m virtio_rng \
    -p nbd-client -p mke2fs -p mkfs.ext4 -p e2fsck \
    -f "$tmpdir/vmtest.env:/etc/vmtest.env" \
    -f /etc/mke2fs.conf:/etc/mke2fs.conf \
    -f "$pki/client/client-cert.pem:/certs/client-cert.pem" \
    -f "$pki/client/client-key.pem:/certs/client-key.pem" \
    -f "$pki/client/ca-cert.pem:/certs/ca-cert.pem" \
    -f "$tmpdir/pattern:/data/pattern"

start_qnbd_tcp "$port" -v -x vmdisk --tls=require \
    --tls-certificates="$pki/server" "$img"
errfile=${_qnbd_errfile[$qnbd_pid]}

vm_boot nbd-client "$tmpdir/initrd.gz" \
    -netdev user,id=net0 -device virtio-net-pci,netdev=net0

stop_qnbd
# Three connections (one, then two), each over TLS, to the export.
test "$(grep -c 'TLS session' "$errfile")" -ge 3
test "$(grep -c "export 'vmdisk'" "$errfile")" -ge 3

check_image "$img"
qemu-img convert -f qcow2 -O raw "$img" "$tmpdir/disk.raw"
e2fsck -fn "$tmpdir/disk.raw"
debugfs -R 'cat /pattern' "$tmpdir/disk.raw" > "$tmpdir/pattern.back"
cmp "$tmpdir/pattern" "$tmpdir/pattern.back"
for f in random1 random2; do
    want=$(vm_console_value nbd-client "QNBD-VM-MD5 $f")
    test -n "$want"
    got=$(debugfs -R "cat /$f" "$tmpdir/disk.raw" | md5sum | cut -d' ' -f1)
    test "$got" = "$want"
done
test "$(debugfs -R 'cat /dir/f32' "$tmpdir/disk.raw")" = "small file 32"
# The files deleted under -o discard are gone.
debugfs -R 'ls /dir' "$tmpdir/disk.raw" > "$tmpdir/dir.list"
grep -qw f32 "$tmpdir/dir.list"
if grep -qw f15 "$tmpdir/dir.list"; then
    echo "$0: /dir/f15 was deleted in the guest but is still there" >&2
    exit 1
fi
