#!/usr/bin/env bash
# fuzz/run.sh [SECONDS]: build the libFuzzer harnesses with clang
# (-fsanitize=fuzzer,address,undefined), make a seed corpus with qemu-img,
# and run each harness for SECONDS (default 60).  Crashes are left in
# fuzz/findings/ (and the script fails); turn each into a regression test.
#
# FUZZ_RUNS=N instead runs N inputs from a fixed seed: the same work on
# every machine, which is what CI wants.
#
# Needs clang and its runtime (apt-get install clang libclang-rt-14-dev).
set -euo pipefail
secs=${1:-60}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
work=${FUZZ_WORK:-$(mktemp -d /tmp/qnbd-fuzz.XXXXXX)}
mkdir -p "$work/cfg" "$here/findings"

cc=${CLANG:-clang}
command -v "$cc" >/dev/null || { echo "fuzz: clang not found" >&2; exit 77; }
printf '#define _GNU_SOURCE 1\n#define HAVE_ZSTD 1\n#define PACKAGE_VERSION "fuzz"\n' > "$work/cfg/config.h"
flags=(-g -O1 -std=gnu11 -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=undefined -DHAVE_CONFIG_H
       -I"$work/cfg" -I"$top/lib")
libs=(-luring -lz -lzstd -lpthread)

status=0
for harness in "$here"/fuzz-*.c; do
    name=$(basename "$harness" .c)
    echo "== $name"
    extra=()
    case $name in
        fuzz-nbd-server)
            # The daemon without its main().
            for f in "$top"/server/*.c; do
                [ "$(basename "$f")" = main.c ] || extra+=("$f")
            done
            # config.c reads configuration files with libinih, tls.c
            # speaks TLS with GnuTLS.
            extra+=(-I"$top/server" -lev $(pkg-config --libs inih)
                    $(pkg-config --cflags --libs gnutls)) ;;
    esac
    "$cc" "${flags[@]}" "$top"/lib/*.c "$harness" "${extra[@]}" "${libs[@]}" \
        -o "$work/$name"
    corpus=$work/corpus-$name
    mkdir -p "$corpus"
    case $name in
        fuzz-qcow2-open) "$here/make-corpus.sh" "$corpus" >/dev/null ;;
        fuzz-nbd-server) "$here/make-nbd-corpus.sh" "$corpus" >/dev/null ;;
    esac
    # -rss_limit_mb: images may claim huge tables; the engine must bound
    # what it allocates, so a big RSS is a finding too.
    if [ -n "${FUZZ_RUNS:-}" ]; then
        runs=$FUZZ_RUNS
        # Protocol inputs run some 100 times faster than image inputs.
        [ "$name" = fuzz-nbd-server ] && runs=$(( FUZZ_RUNS * 25 ))
        budget=(-runs="$runs" -seed=1)
    else
        budget=(-max_total_time="$secs")
    fi
    if ! (cd "$work" && ASAN_OPTIONS=detect_leaks=1 \
          "./$name" "${budget[@]}" -rss_limit_mb=2048 \
          -max_len=262144 -timeout=20 -handle_xfsz=0 \
          -artifact_prefix="$here/findings/" \
          "$corpus" 2>&1 | tail -n 15); then
        status=1
    fi
    if ls "$here"/findings/crash-* "$here"/findings/leak-* \
          "$here"/findings/timeout-* "$here"/findings/oom-* >/dev/null 2>&1; then
        echo "fuzz: $name found something: see $here/findings/" >&2
        status=1
    fi
done
[ -n "${FUZZ_WORK:-}" ] || rm -rf "$work"
exit $status
