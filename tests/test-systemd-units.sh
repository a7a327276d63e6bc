#!/usr/bin/env bash
# test-systemd-units.sh: what "make install" puts in place for systemd
# holds together.
#
# 1. "make install prefix=/usr DESTDIR=ROOT" (prefix /usr, so that the
#    installed units must name /usr/bin/qnbd, not the /usr/local/bin/qnbd
#    of the source files), then "systemd-analyze verify --root=ROOT" on
#    every unit installed (the templates as instances): each command they
#    run must exist and be executable under ROOT, each man page they name
#    must be installed, and any message about our units fails the test.
#    ROOT also gets the host's own units (sysinit.target and the like,
#    which every service depends on) and the host commands the units name
#    outside qnbd (/bin/kill).
# 2. The installed sample configuration, its paths pointed into the
#    temporary directory (images made here, a Unix socket, certificates
#    made with certtool, no TCP), is read by qnbd -C, which serves its
#    three exports: nbdinfo --list names them.
#
# Skips when systemd-analyze is not installed, saying so.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires systemd-analyze qemu-img nbdinfo certtool
: "${abs_top_builddir:=$(cd "$PWD/.." && pwd)}"

root=$tmpdir/root
# Not the harness's make flags (-j, its jobserver): a make of its own.
env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL \
    "${MAKE:-make}" -s -C "$abs_top_builddir" install prefix=/usr \
    DESTDIR="$root" > "$tmpdir/install.log" 2>&1 || {
    cat "$tmpdir/install.log"
    exit 1
}

unitdir=$root/usr/lib/systemd/system
if ! [ -f "$unitdir/qnbd.service" ]; then
    echo "$0: SKIP: no units installed (configure --with-systemdsystemunitdir=no?)"
    exit 77
fi

# The installed units name the installed qnbd, not the source's default.
grep -q '^ExecStart=/usr/bin/qnbd ' "$unitdir/qnbd.service"
grep -q '^ExecStart=/usr/bin/qnbd ' "$unitdir/qnbd@.service"
if grep -n /usr/local "$unitdir"/qnbd*; then
    echo "$0: an installed unit still names /usr/local" >&2
    exit 1
fi

# The host's units below ours (ours win where names collide: -n).
mkdir -p "$root/usr/lib/systemd"
cp -an /usr/lib/systemd/system/. "$unitdir/"

# Commands the units run that are not ours: from the host, when it has
# them (else verify reports them missing, as it should).
units=()
for f in "$unitdir"/qnbd*; do
    units+=("$(basename "$f")")
done
for f in "${units[@]}"; do
    sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\([^ ]*\).*/\1/p' "$unitdir/$f"
done | sort -u | while read -r cmd; do
    if ! [ -e "$root$cmd" ] && [ -x "$cmd" ]; then
        mkdir -p "$root$(dirname "$cmd")"
        cp "$cmd" "$root$cmd"
    fi
done

# Man pages: where pod2man was missing none are installed; then only the
# rest is checked.
man=(--man=yes)
mandir=$root/usr/share/man
if ! [ -f "$mandir/man8/qnbd.8" ]; then
    echo "$0: no man pages installed (no pod2man): not checking Documentation="
    man=(--man=no)
fi

failed=0
for u in "${units[@]}"; do
    # A template is checked as an instance.
    name=${u/@./@disk1.}
    out=$(MANPATH=$mandir systemd-analyze verify "${man[@]}" --root="$root" \
              "$name" 2>&1) || true
    if [ -n "$out" ]; then
        echo "$0: systemd-analyze verify $name:" >&2
        echo "$out" >&2
        failed=1
    else
        echo "$name: verified"
    fi
done
[ "$failed" = 0 ]
# Four units, all of them checked.
[ "${#units[@]}" = 4 ]

# --- 2. The sample configuration. ------------------------------------
example=$root/usr/share/doc/qnbd/qnbd.conf.example
test -f "$example"
mkdir -p "$tmpdir/images"
for name in $(sed -n 's|^file = /var/lib/qnbd/||p' "$example"); do
    qemu-img create -f qcow2 "$tmpdir/images/$name" 16M
done
sock=$tmpdir/qnbd.sock
pidfile=$tmpdir/qnbd.pid
tls_dir=$tmpdir/tls
# The TLS-only export admits the test's own client, on the Unix socket.
sed -e "s|/var/lib/qnbd/|$tmpdir/images/|" \
    -e "s|^socket = .*|socket = $sock\\npid-file = $pidfile|" \
    -e "s|/etc/qnbd/tls|$tls_dir|" \
    -e '/^bind = /d' -e '/^port = /d' \
    -e 's|^allow-address = .*|allow-address = unix|' \
    -e 's|^allow-tls-dn = .*|allow-tls-dn = O=qnbd test,CN=localhost|' \
    < "$example" > "$tmpdir/qnbd.conf"
grep -q '^tls-certificates' "$tmpdir/qnbd.conf"
make_ca "$tmpdir/ca"
make_cert "$tmpdir/ca" "$tls_dir" server
make_cert "$tmpdir/ca" "$tmpdir/client" client
cat "$tmpdir/qnbd.conf"
aio=()
if [ -n "$QNBD_TEST_AIO" ]; then
    aio=("--aio=$QNBD_TEST_AIO")
fi
"$QNBD" -C "$tmpdir/qnbd.conf" "${aio[@]}" </dev/null \
        2> "$tmpdir/qnbd.err" &
qnbd_pid=$!
_qnbd_errfile[$qnbd_pid]=$tmpdir/qnbd.err
cleanup_fn _qnbd_cleanup "$qnbd_pid"
for (( i = 0; i < QNBD_START_TIMEOUT; i++ )); do
    if [ -s "$pidfile" ] || ! _qnbd_alive "$qnbd_pid"; then
        break
    fi
    sleep 0.1
done
test -s "$pidfile"
nbdinfo --list "nbds+unix:///?socket=$sock&tls-certificates=$tmpdir/client" \
        > "$tmpdir/list"
cat "$tmpdir/list"
for name in $(sed -n 's/^\[export \(.*\)\]$/\1/p' "$example"); do
    grep -q "^export=\"$name\":" "$tmpdir/list"
done
[ "$(grep -c '^export=' "$tmpdir/list")" = 3 ]
# In plaintext the TLS-only export is not even listed.
nbdinfo --list "nbd+unix:///?socket=$sock" > "$tmpdir/plain"
[ "$(grep -c '^export=' "$tmpdir/plain")" = 2 ]
if grep -q '^export="vm1":' "$tmpdir/plain"; then
    echo "$0: the TLS-only export was listed in plaintext" >&2
    exit 1
fi
stop_qnbd "$qnbd_pid"
