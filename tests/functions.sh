# tests/functions.sh: helpers for the shell integration tests.
#
# A test script begins:
#
#   source "${srcdir:-.}/functions.sh"
#   set -e
#   set -x
#   requires qemu-img nbdinfo
#
# Sourcing this file makes a fresh temporary directory ($tmpdir, removed on
# exit unless QNBD_TEST_KEEP=1) and installs an EXIT trap that runs the
# cleanups registered with cleanup_fn, newest first.
#
# The helpers below turn off "set -x" inside themselves (local -) and print
# what matters instead, so that test logs stay readable.
#
# Variables from the test harness (tests/Makefile.am), with defaults for
# running a test by hand from the build's tests/ directory:
#   QNBD            the daemon to test
#   PYTHON          a python3 that can "import nbd"
#   QNBD_TEST_AIO   when set, every qnbd started gets --aio=$QNBD_TEST_AIO

: "${srcdir:=$(dirname "${BASH_SOURCE[0]}")}"
: "${QNBD:=$PWD/../server/qnbd}"
: "${PYTHON:=/usr/bin/python3}"
: "${QNBD_TEST_AIO:=}"
export srcdir QNBD PYTHON QNBD_TEST_AIO

# How long start_qnbd waits for the socket, and stop_qnbd (or the cleanup)
# for the daemon to exit after SIGTERM, in tenths of a second.
: "${QNBD_START_TIMEOUT:=200}"
: "${QNBD_STOP_TIMEOUT:=300}"

# When set to 1, the cleanup of a server still running at the end of the
# test fails the test unless SIGTERM makes it exit with status 0.
: "${QNBD_CHECK_EXIT:=0}"

# requires CMD...: skip the test (exit 77) unless every CMD is on PATH.
requires ()
{
    local -
    set +x
    local c
    for c in "$@"; do
        if ! command -v "$c" >/dev/null 2>&1; then
            echo "$0: SKIP: required program '$c' not found" >&2
            exit 77
        fi
    done
}

# requires_python_nbd: skip unless $PYTHON has libnbd's python binding.
requires_python_nbd ()
{
    local -
    set +x
    if ! "$PYTHON" -c 'import nbd' >/dev/null 2>&1; then
        echo "$0: SKIP: $PYTHON cannot import nbd (apt-get install python3-libnbd)" >&2
        exit 77
    fi
}

# kill_if_running PID: SIGTERM to PID if it still runs (a cleanup for a
# process the test may already have stopped).
kill_if_running ()
{
    kill "$1" 2>/dev/null || true
}

# wait_for_path OP PATH [PID]: wait up to 10 s until "test OP PATH" holds
# (-S: a socket is there, -s: a file is not empty); returns 1 if it never
# does, or as soon as process PID (the one that makes PATH) has exited.
wait_for_path ()
{
    local i
    for (( i = 0; i < 100; i++ )); do
        [ "$1" "$2" ] && return 0
        if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then
            echo "$0: process $3 exited before $2 appeared" >&2
            return 1
        fi
        sleep 0.1
    done
    [ "$1" "$2" ] && return 0
    echo "$0: $2 did not appear in 10 s" >&2
    return 1
}

# cleanup_fn CMD [ARGS...]: run CMD ARGS when the test exits, whatever the
# reason.  Cleanups run newest first.  A failing cleanup turns a passing test
# into a failing one.
_cleanups=()
cleanup_fn ()
{
    local cmd
    printf -v cmd '%q ' "$@"
    _cleanups+=("$cmd")
}

_run_cleanups ()
{
    local rc=$? i
    set +e
    for (( i = ${#_cleanups[@]} - 1; i >= 0; i-- )); do
        if ! eval "${_cleanups[i]}"; then
            echo "$0: cleanup failed: ${_cleanups[i]}" >&2
            [ "$rc" -eq 0 ] && rc=1
        fi
    done
    _cleanups=()
    exit "$rc"
}
trap _run_cleanups EXIT
# So that a test killed by the harness's timeout still runs its cleanups.
trap 'exit 143' TERM
trap 'exit 130' INT

tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/qnbd-test.XXXXXX")
if [ "${QNBD_TEST_KEEP:-0}" = 1 ]; then
    echo "$0: keeping $tmpdir" >&2
else
    cleanup_fn rm -rf "$tmpdir"
fi

# _qnbd_alive PID: true while PID runs (a zombie counts as exited).
_qnbd_alive ()
{
    local state
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed -e 's/^.*) \(.\).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# Exit statuses of the servers already reaped, by pid.
declare -A _qnbd_status=()
declare -A _qnbd_errfile=()

# _qnbd_reap PID: wait for PID (our child) and record its exit status.
_qnbd_reap ()
{
    local st=0
    wait "$1" || st=$?
    _qnbd_status[$1]=$st
}

# _qnbd_terminate PID TIMEOUT: SIGTERM, wait up to TIMEOUT tenths of a
# second, then SIGKILL.  Sets _qnbd_timed_out=1 when SIGKILL was needed.
_qnbd_terminate ()
{
    local pid=$1 limit=$2 i
    _qnbd_timed_out=0
    kill -TERM "$pid" 2>/dev/null || true
    for (( i = 0; i < limit; i++ )); do
        _qnbd_alive "$pid" || break
        sleep 0.1
    done
    if _qnbd_alive "$pid"; then
        echo "$0: qnbd (pid $pid) still running $(( limit / 10 ))s after SIGTERM, sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        _qnbd_timed_out=1
    fi
    _qnbd_reap "$pid"
}

# _qnbd_show_stderr PID: copy the server's stderr into the test log.
_qnbd_show_stderr ()
{
    local f=${_qnbd_errfile[$1]:-}
    if [ -n "$f" ] && [ -s "$f" ]; then
        echo "--- stderr of qnbd (pid $1) ---" >&2
        cat "$f" >&2
        echo "--- end of stderr of qnbd (pid $1) ---" >&2
    fi
}

# Cleanup registered by start_qnbd.
_qnbd_cleanup ()
{
    local -
    set +x
    local pid=$1 st
    if [ -z "${_qnbd_status[$pid]+set}" ]; then
        _qnbd_terminate "$pid" "$QNBD_STOP_TIMEOUT"
        _qnbd_show_stderr "$pid"
        st=${_qnbd_status[$pid]}
        if [ "$QNBD_CHECK_EXIT" = 1 ] &&
           { [ "$_qnbd_timed_out" = 1 ] || [ "$st" -ne 0 ]; }; then
            echo "$0: qnbd (pid $pid) exited with status $st after SIGTERM, expected 0" >&2
            return 1
        fi
    fi
    return 0
}

# start_qnbd [ARGS...] IMAGE
#
# Start $QNBD in the background serving IMAGE on a new Unix socket in
# $tmpdir, with --pid-file, and wait (bounded) until it is ready: the socket
# exists and the pid file is written.  If it exits or times out first, print
# its stderr and return 1.  Sets:
#   sock      the socket path
#   uri       nbd+unix:///?socket=$sock
#   qnbd_pid  the server's pid
# A cleanup stops the server by pid (SIGTERM, then SIGKILL) at exit.
_qnbd_count=0
start_qnbd ()
{
    local -
    set +x
    local n pidfile errfile i st aio=()

    if [ ! -x "$QNBD" ]; then
        echo "$0: $QNBD is not built" >&2
        return 1
    fi
    if [ $# -lt 1 ]; then
        echo "$0: start_qnbd: no image given" >&2
        return 1
    fi

    _qnbd_count=$(( _qnbd_count + 1 ))
    n=$_qnbd_count
    sock=$tmpdir/qnbd$n.sock
    pidfile=$tmpdir/qnbd$n.pid
    errfile=$tmpdir/qnbd$n.err
    if [ -n "$QNBD_TEST_AIO" ]; then
        aio=("--aio=$QNBD_TEST_AIO")
    fi

    echo "+ $QNBD -k $sock --pid-file $pidfile ${aio[*]} $*" >&2
    "$QNBD" -k "$sock" --pid-file "$pidfile" "${aio[@]}" "$@" \
        </dev/null >"$tmpdir/qnbd$n.out" 2>"$errfile" &
    qnbd_pid=$!
    _qnbd_errfile[$qnbd_pid]=$errfile
    cleanup_fn _qnbd_cleanup "$qnbd_pid"

    for (( i = 0; i < QNBD_START_TIMEOUT; i++ )); do
        if [ -S "$sock" ] && [ -s "$pidfile" ]; then
            break
        fi
        if ! _qnbd_alive "$qnbd_pid"; then
            _qnbd_reap "$qnbd_pid"
            st=${_qnbd_status[$qnbd_pid]}
            echo "$0: qnbd exited with status $st before it was ready" >&2
            _qnbd_show_stderr "$qnbd_pid"
            return 1
        fi
        sleep 0.1
    done
    if ! [ -S "$sock" ] || ! [ -s "$pidfile" ]; then
        echo "$0: qnbd (pid $qnbd_pid) not ready after $(( QNBD_START_TIMEOUT / 10 ))s" \
             "(socket $sock, pid file $pidfile)" >&2
        _qnbd_show_stderr "$qnbd_pid"
        return 1
    fi
    # The pid file is written completely before it is renamed or closed,
    # but be lenient about a trailing newline arriving late.
    for (( i = 0; i < 20; i++ )); do
        [ "$(tr -d '[:space:]' < "$pidfile")" = "$qnbd_pid" ] && break
        sleep 0.1
    done
    if [ "$(tr -d '[:space:]' < "$pidfile")" != "$qnbd_pid" ]; then
        echo "$0: pid file $pidfile says '$(cat "$pidfile")', expected $qnbd_pid" >&2
        return 1
    fi

    uri="nbd+unix:///?socket=$sock"
    export sock uri qnbd_pid
    echo "qnbd (pid $qnbd_pid) ready at $uri" >&2
}

# stop_qnbd [PID]: send SIGTERM to the server (default $qnbd_pid), wait for
# it (SIGKILL after QNBD_STOP_TIMEOUT) and return its exit status; print its
# stderr into the test log.  Returns 1 if SIGKILL was needed.
stop_qnbd ()
{
    local -
    set +x
    local pid=${1:-$qnbd_pid} st
    if [ -n "${_qnbd_status[$pid]+set}" ]; then
        echo "$0: stop_qnbd: qnbd (pid $pid) has already exited" >&2
        return "${_qnbd_status[$pid]}"
    fi
    _qnbd_terminate "$pid" "$QNBD_STOP_TIMEOUT"
    _qnbd_show_stderr "$pid"
    st=${_qnbd_status[$pid]}
    echo "$0: qnbd (pid $pid) exited with status $st" >&2
    if [ "$_qnbd_timed_out" = 1 ]; then
        return 1
    fi
    return "$st"
}

# check_image IMAGE: "qemu-img check" must find no errors and no leaks.
check_image ()
{
    local -
    set +x
    local out st=0
    echo "+ qemu-img check -f qcow2 $1" >&2
    out=$(qemu-img check -f qcow2 "$1" 2>&1) || st=$?
    printf '%s\n' "$out"
    if [ "$st" -ne 0 ]; then
        echo "$0: qemu-img check $1 exited with status $st" >&2
        return 1
    fi
    if ! grep -qF 'No errors were found on the image.' <<<"$out"; then
        echo "$0: qemu-img check $1 did not report a clean image" >&2
        return 1
    fi
    if grep -qi 'leak' <<<"$out"; then
        echo "$0: qemu-img check $1 reports leaked clusters" >&2
        return 1
    fi
}

# compare_raw RAW IMAGE: the qcow2 IMAGE must hold exactly the data of RAW.
compare_raw ()
{
    local -
    set +x
    local out st=0
    echo "+ qemu-img compare -f raw -F qcow2 $1 $2" >&2
    out=$(qemu-img compare -f raw -F qcow2 "$1" "$2" 2>&1) || st=$?
    printf '%s\n' "$out"
    if [ "$st" -ne 0 ] || ! grep -qF 'Images are identical.' <<<"$out"; then
        echo "$0: qemu-img compare $1 $2 failed (status $st)" >&2
        return 1
    fi
}

# Certificates for the TLS tests, made by certtool (gnutls-bin).

# make_ca DIR: a CA key and self-signed certificate in DIR.
make_ca ()
{
    mkdir -p "$1"
    certtool --generate-privkey > "$1/ca-key.pem"
    cat > "$1/ca.info" <<EOF
cn = qnbd test CA $1
ca
cert_signing_key
expiration_days = 2
EOF
    certtool --generate-self-signed --load-privkey "$1/ca-key.pem" \
             --template "$1/ca.info" --outfile "$1/ca-cert.pem"
}

# make_cert CADIR DIR ROLE [expired]: ROLE-key.pem and ROLE-cert.pem
# (ROLE server or client) in DIR, signed by the CA of CADIR, with its
# ca-cert.pem; with "expired", valid only during 2020.
make_cert ()
{
    local cadir=$1 dir=$2 role=$3 usage dates="expiration_days = 2"
    if [ "${4:-}" = expired ]; then
        dates='activation_date = "2020-01-01 00:00:00"
expiration_date = "2021-01-01 00:00:00"'
    fi
    mkdir -p "$dir"
    if [ "$role" = server ]; then
        usage="tls_www_server"
    else
        usage="tls_www_client"
    fi
    certtool --generate-privkey > "$dir/$role-key.pem"
    cat > "$dir/$role.info" <<EOF
organization = qnbd test
cn = localhost
dns_name = localhost
ip_address = 127.0.0.1
$usage
encryption_key
signing_key
$dates
EOF
    certtool --generate-certificate --load-privkey "$dir/$role-key.pem" \
             --load-ca-certificate "$cadir/ca-cert.pem" \
             --load-ca-privkey "$cadir/ca-key.pem" \
             --template "$dir/$role.info" --outfile "$dir/$role-cert.pem"
    cp "$cadir/ca-cert.pem" "$dir/ca-cert.pem"
}
