#!/bin/sh
# Debian's redis-server with every library `ldd` lists, glibc and its loader included, so it
# runs on a machine without redis-server whatever glibc that machine has (gpu/prepare.sh packs
# this as bin/redis-server of .gpu-deps/redis.tar.xz).
here=$(dirname "$(readlink -f "$0")")/..
LD_LIBRARY_PATH="$here/lib" exec "$here/lib/ld-linux-x86-64.so.2" "$here/libexec/redis-server" "$@"
