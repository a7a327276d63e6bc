#!/usr/bin/env bash
# test-vm-blockdev.sh ("make check-vm"): a Linux guest under QEMU whose
# virtio disk is a qnbd export over TLS, QEMU being the NBD client
# (-blockdev driver=nbd,...,tls-creds=...): the guest makes an ext4 on it
# and writes files (tests/vm/guest-blockdev.sh), and powers off; then the
# host checks the image with qemu-img check and e2fsck and reads the files
# back with debugfs.  qnbd listens on 127.0.0.1 only.

source "${srcdir:-.}/functions.sh"
source "$srcdir/vm/vm-functions.sh"
set -e
set -x

vm_requires
vm_needs certtool mkfs.ext4 e2fsck debugfs qemu-img "$PYTHON"

pki=$tmpdir/pki
make_ca "$pki/ca"
make_cert "$pki/ca" "$pki/server" server
make_cert "$pki/ca" "$pki/client" client

size=$((256 << 20))
img=$tmpdir/disk.qcow2
qemu-img create -f qcow2 "$img" "$size"
head -c $((4 << 20)) /dev/urandom > "$tmpdir/pattern"

cat > "$tmpdir/vmtest.env" <<EOT
VM_NET=0
VM_SIZE=$size
EOT
vm_initramfs "$tmpdir/initrd.gz" "$srcdir/vm/guest-blockdev.sh" \
    -m ext4 -m crc32c_generic -m virtio_pci -m virtio_blk -m virtio_rng \
    -p mke2fs -p mkfs.ext4 -p e2fsck \
    -f "$tmpdir/vmtest.env:/etc/vmtest.env" \
    -f /etc/mke2fs.conf:/etc/mke2fs.conf \
    -f "$tmpdir/pattern:/data/pattern"

port=$(vm_free_port)
start_qnbd_tcp "$port" -v -x vmdisk --tls=require \
    --tls-certificates="$pki/server" "$img"
errfile=${_qnbd_errfile[$qnbd_pid]}

vm_boot blockdev "$tmpdir/initrd.gz" \
    -object "tls-creds-x509,id=tls0,endpoint=client,dir=$pki/client" \
    -blockdev "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$port,export=vmdisk,tls-creds=tls0,node-name=disk0" \
    -device virtio-blk-pci,drive=disk0

stop_qnbd
grep -F 'TLS session' "$errfile"
grep -F "export 'vmdisk'" "$errfile"

check_image "$img"
qemu-img convert -f qcow2 -O raw "$img" "$tmpdir/disk.raw"
e2fsck -fn "$tmpdir/disk.raw"
debugfs -R 'cat /pattern' "$tmpdir/disk.raw" > "$tmpdir/pattern.back"
cmp "$tmpdir/pattern" "$tmpdir/pattern.back"
want=$(vm_console_value blockdev "QNBD-VM-MD5 random")
test -n "$want"
got=$(debugfs -R 'cat /random' "$tmpdir/disk.raw" | md5sum | cut -d' ' -f1)
test "$got" = "$want"
test "$(debugfs -R 'cat /dir/f32' "$tmpdir/disk.raw")" = "small file 32"
