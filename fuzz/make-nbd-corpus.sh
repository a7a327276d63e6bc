#!/usr/bin/env bash
# fuzz/make-nbd-corpus.sh DIR: seed client streams for fuzz-nbd-server:
# handshakes with the common options, then a few requests of each kind.
set -euo pipefail
out=${1:?usage: make-nbd-corpus.sh DIR}
mkdir -p "$out"

hex () { printf "$(echo "$1" | sed -e 's/ //g' -e 's/\(..\)/\\x\1/g')"; }
opt () { hex "49484156454F5054$1"; }            # IHAVEOPT + option + len + data
req () { hex "25609513$1"; }                    # request magic + the rest
flags=00000003                                  # FIXED_NEWSTYLE | NO_ZEROES
go=$(printf '%s' 00000007 0000000600000000 0000)
sr=0000000800000000
meta=0000000a00000024000000000000000200000005626173653a0000000f626173653a616c6c6f636174696f6e

{ hex $flags; opt $go; } > "$out/go"
{ hex $flags; opt $sr; opt $go; req 0000 0000 0000000000000001 0000000000000000 00001000
  req 0000 0003 0000000000000002 0000000000000000 00000000
  req 0000 0002 0000000000000003 0000000000000000 00000000; } > "$out/go-read-flush"
{ hex $flags; opt $sr; opt "$meta"; opt $go
  req 0000 0007 0000000000000001 0000000000000000 00100000
  req 0001 0007 0000000000000002 0000000000010000 00100000; } > "$out/meta-status"
{ hex $flags; opt $go
  req 0000 0001 0000000000000001 0000000000000200 00000010; hex 41414141414141414141414141414141
  req 0001 0001 0000000000000002 0000000000000000 00000004; hex 42424242
  req 0000 0004 0000000000000003 0000000000010000 00010000
  req 0002 0006 0000000000000004 0000000000020000 00010000
  req 0000 0005 0000000000000005 0000000000000000 00001000; } > "$out/writes"
{ hex $flags; opt 000000030000000000000000; opt 0000000200000000; } > "$out/list-abort"
{ hex $flags; opt 000000010000000000000000; } > "$out/export-name"
ls "$out" | wc -l
