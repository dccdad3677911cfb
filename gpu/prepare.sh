#!/usr/bin/env bash
# Prepares, on the CPU machine, what `gpu/check.sh` needs on an offline GPU machine, in the
# git-ignored folders the device tool carries (64 MiB in all):
#   .gpu-kit/   a copy of the vLLM kit (GPU_KIT_SOURCE, default ../shared/gpu/kit), parts checked
#   .gpu-deps/  python.tar.xz: the wheels of gpu/requirements.txt for cp312 manylinux x86_64,
#               one folder per wheel, shared objects stripped of debug info (xz: 20 -> 9 MB);
#               redis.tar.xz: Debian's redis-server with the libraries `ldd` lists
#   gen/        the generated protobuf code (make proto)
# Each part is rebuilt only when its inputs change. Ends by printing the carried sizes and
# fails if they exceed the limit.
set -euo pipefail
cd "$(dirname "$0")/.."

KIT_SOURCE=${GPU_KIT_SOURCE:-../shared/gpu/kit}
PIP=${PIP:-.venv/bin/pip}
CACHE=.run/gpu-wheels  # downloaded wheels (not carried)
LIMIT_MIB=64

say() { echo "[prepare] $*"; }

prepare_kit() {
    if [[ -f .gpu-kit/MANIFEST.json ]] && cmp -s "$KIT_SOURCE/MANIFEST.json" .gpu-kit/MANIFEST.json; then
        say "kit: .gpu-kit/ is up to date"
    else
        say "kit: copying $KIT_SOURCE to .gpu-kit/"
        rm -rf .gpu-kit
        mkdir .gpu-kit
        # Not the fallback (55 MB, over the limit): the pruned extension runs on H100/H200.
        cp -r "$KIT_SOURCE"/{install.py,MANIFEST.json,MANIFEST.sha256,parts,extra,smoke.py} .gpu-kit/
        cp -r "$KIT_SOURCE"/{serve_bench.py,mc_client.py} .gpu-kit/
        chmod -R u+w .gpu-kit
    fi
    (cd .gpu-kit && grep ' parts/' MANIFEST.sha256 | sha256sum --quiet -c -) || {
        say "FAIL: .gpu-kit/parts do not match MANIFEST.sha256"
        exit 1
    }
    say "kit: parts match MANIFEST.sha256"
}

prepare_python() {
    local stamp
    stamp=$(sha256sum gpu/requirements.txt | cut -c1-64)
    if [[ -f .gpu-deps/python.tar.xz && "$(cat .gpu-deps/python.stamp 2>/dev/null)" == "$stamp" ]]; then
        say "wheels: .gpu-deps/python.tar.xz is up to date"
        return
    fi
    mkdir -p "$CACHE" .gpu-deps
    say "wheels: downloading gpu/requirements.txt for cp312 manylinux x86_64"
    grep -vE '^\s*(#|$)|# image' gpu/requirements.txt | sed 's/ *#.*//' > "$CACHE/carried.txt"
    "$PIP" download --quiet --no-deps --only-binary=:all: --dest "$CACHE" \
        --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_12_x86_64 \
        --platform manylinux2010_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
        --platform any -r "$CACHE/carried.txt" 2> >(grep -v "is ignored: it is neither" >&2)
    local staging
    staging=$(mktemp -d)
    local requirement name version wheel
    while read -r requirement; do
        name=${requirement%%==*}
        version=${requirement##*==}
        wheel=$(find "$CACHE" -maxdepth 1 -iname "$(echo "$name" | tr '-' '_')-$version-*.whl" | head -1)
        [[ -n "$wheel" ]] || { say "FAIL: no wheel for $requirement in $CACHE"; exit 1; }
        .venv/bin/python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
            "$wheel" "$staging/$name"
    done < "$CACHE/carried.txt"
    # Wheels such as uvloop's and hiredis's ship debug info: most of their size.
    find "$staging" -name '*.so' -exec strip --strip-unneeded {} +
    tar -C "$staging" -cf - . | xz -6 -T2 > .gpu-deps/python.tar.xz
    rm -rf "$staging"
    cp "$CACHE/carried.txt" .gpu-deps/python.txt
    echo "$stamp" > .gpu-deps/python.stamp
    say "wheels: packed $(wc -l < .gpu-deps/python.txt) wheels into .gpu-deps/python.tar.xz"
}

prepare_redis() {
    local binary stamp staging library
    binary=$(command -v redis-server) || { say "FAIL: redis-server not installed here"; exit 1; }
    stamp=$(cat "$binary" gpu/redis-server.sh | sha256sum | cut -c1-64)
    if [[ -f .gpu-deps/redis.tar.xz && "$(cat .gpu-deps/redis.stamp 2>/dev/null)" == "$stamp" ]]; then
        say "redis: .gpu-deps/redis.tar.xz is up to date"
        return
    fi
    staging=$(mktemp -d)
    mkdir -p "$staging"/{bin,libexec,lib} .gpu-deps
    cp -L "$binary" "$staging/libexec/redis-server"
    for library in $(ldd "$binary" | grep -oE '/[^ ]+\.so[^ ]*'); do
        cp -L "$library" "$staging/lib/"
    done
    install -m 755 gpu/redis-server.sh "$staging/bin/redis-server"
    tar -C "$staging" -cf - . | xz -6 -T2 > .gpu-deps/redis.tar.xz
    echo "$stamp" > .gpu-deps/redis.stamp
    say "redis: packed $("$binary" --version | cut -d' ' -f1-3) and $(ls "$staging/lib" | wc -l) libraries"
    rm -rf "$staging"
}

report_sizes() {
    local total=0 bytes path
    for path in .gpu-kit .gpu-deps gen; do
        bytes=$(du -sb "$path" | cut -f1)
        total=$((total + bytes))
        say "carry $path: $((bytes / 1024)) KiB"
    done
    bytes=$(git ls-files -co --exclude-standard -z | xargs -0 cat 2>/dev/null | wc -c)
    say "working tree (tracked and untracked, not ignored): $((bytes / 1024)) KiB"
    total=$((total + bytes))
    say "total $((total / 1024)) KiB of $((LIMIT_MIB * 1024)) KiB"
    if ((total > LIMIT_MIB * 1024 * 1024)); then
        say "FAIL: over the device tool's ${LIMIT_MIB} MiB"
        exit 1
    fi
}

prepare_kit
prepare_python
prepare_redis
[[ -f gen/.generated ]] || { say "FAIL: gen/ missing: run make proto"; exit 1; }
report_sizes
