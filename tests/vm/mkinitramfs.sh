#!/usr/bin/env bash
# tests/vm/mkinitramfs.sh: build the small initramfs of the VM tests, at
# test time, from what the host has installed (nothing binary is kept in
# the source tree).
#
#   mkinitramfs.sh -k KVER -i INIT [-m MODULE]... [-p PROGRAM]...
#                  [-f SRC:DEST]... OUTPUT
#
#   -k KVER     the kernel release whose modules are copied
#               (/lib/modules/KVER)
#   -i INIT     the script that becomes /init (tests/vm/guest-init.sh)
#   -m MODULE   a kernel module by name (nbd, ext4...); its dependencies
#               are found in modules.dep and /etc/modules.order lists
#               them all in an order insmod accepts (dependencies first)
#   -p PROGRAM  a host program (by name on PATH or by path), copied to
#               /bin with the shared libraries ldd names
#   -f SRC:DEST a file copied to DEST
#
# The shell is the host's static busybox (busybox-static): /bin/busybox,
# whose applets /init installs as links at boot.  OUTPUT is a gzip'ed
# newc cpio archive, for QEMU's -initrd.

set -euo pipefail

kver=
init=
modules=()
programs=()
files=()
while getopts 'k:i:m:p:f:' opt; do
    case $opt in
        k) kver=$OPTARG ;;
        i) init=$OPTARG ;;
        m) modules+=("$OPTARG") ;;
        p) programs+=("$OPTARG") ;;
        f) files+=("$OPTARG") ;;
        *) echo "usage: $0 -k KVER -i INIT [-m MOD]... [-p PROG]... [-f SRC:DEST]... OUTPUT" >&2
           exit 2 ;;
    esac
done
shift $(( OPTIND - 1 ))
if [ $# -ne 1 ] || [ -z "$kver" ] || [ -z "$init" ]; then
    echo "usage: $0 -k KVER -i INIT [-m MOD]... [-p PROG]... [-f SRC:DEST]... OUTPUT" >&2
    exit 2
fi
out=$1
moddir=/lib/modules/$kver

busybox=
for b in /bin/busybox /usr/bin/busybox; do
    # Only a static busybox runs without the libraries of its build.
    if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then
        busybox=$b
        break
    fi
done
if [ -z "$busybox" ]; then
    echo "$0: no static busybox (apt-get install busybox-static)" >&2
    exit 1
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/initramfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,mnt,etc,lib/modules}
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 755 "$init" "$root/init"

# copy_file SRC: SRC at the same path in the image (libraries, the
# dynamic loader), following symlinks.
copy_file ()
{
    local dest=$root$1
    [ -e "$dest" ] && return 0
    mkdir -p "$(dirname "$dest")"
    cp -L "$1" "$dest"
}

for p in "${programs[@]}"; do
    path=$p
    if [[ $p != */* ]]; then
        path=$(PATH=$PATH:/usr/sbin:/sbin command -v "$p") || {
            echo "$0: program '$p' not found" >&2
            exit 1
        }
    fi
    cp -L "$path" "$root/bin/$(basename "$path")"
    # ldd prints "name => /path (addr)" for libraries and "/path (addr)"
    # for the loader; vdso has no file.
    while read -r lib; do
        copy_file "$lib"
    done < <(ldd "$path" | sed -n -e 's/.*=> \(\/[^ ]*\).*/\1/p' \
                                  -e 's/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p')
done

# Modules: depth first through modules.dep, so that each is listed after
# what it needs.  modules.dep names paths relative to $moddir.
# (Only the wanted names are looked up: a loop over all of modules.dep in
# the shell takes minutes on a busy machine.)
declare -A listed=()
order=()

# add_module PATH: its dependencies, then PATH itself.
add_module ()
{
    local path=$1 deps dep
    [ -n "${listed[$path]+set}" ] && return 0
    listed[$path]=1
    deps=$(sed -n "s|^$path:[[:space:]]*||p" "$moddir/modules.dep")
    for dep in $deps; do
        add_module "$dep"
    done
    order+=("$path")
}

for m in "${modules[@]}"; do
    # "-" and "_" are the same in module names.
    path=$(awk -F: -v m="${m//-/_}" '{ n = $1; sub(/.*\//, "", n);
        sub(/\.ko.*/, "", n); gsub(/-/, "_", n); if (n == m) { print $1; exit } }' \
        "$moddir/modules.dep")
    if [ -z "$path" ]; then
        # Built into the kernel: nothing to load.
        if grep -qE "/${m//[-_]/[-_]}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
            continue
        fi
        echo "$0: module '$m' not found in $moddir/modules.dep" >&2
        exit 1
    fi
    add_module "$path"
done
: > "$root/etc/modules.order"
for path in "${order[@]}"; do
    case $path in
        *.ko) cp "$moddir/$path" "$root/lib/modules/" ;;
        *.ko.xz) xz -dc "$moddir/$path" > "$root/lib/modules/$(basename "$path" .xz)" ;;
        *.ko.zst) zstd -qdc "$moddir/$path" > "$root/lib/modules/$(basename "$path" .zst)" ;;
        *.ko.gz) gzip -dc "$moddir/$path" > "$root/lib/modules/$(basename "$path" .gz)" ;;
        *) echo "$0: unknown module file $path" >&2; exit 1 ;;
    esac
    b=$(basename "$path")
    echo "${b%.ko*}.ko" >> "$root/etc/modules.order"
done

for f in "${files[@]}"; do
    src=${f%%:*}
    dest=${f#*:}
    mkdir -p "$root/$(dirname "$dest")"
    cp -L "$src" "$root/$dest"
done

(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$out"
