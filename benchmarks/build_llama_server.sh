#!/usr/bin/env bash
# Build llama.cpp's llama-server (and llama-bench) for the peer comparison, from the llama.cpp source
# vendored in the llama-cpp-python sdist. Idempotent: every step is skipped when its output exists.
#
#   benchmarks/build_llama_server.sh          -> .bench/llama.cpp-amx/bin/llama-server
#   NOAMX=1 benchmarks/build_llama_server.sh  -> also .bench/llama.cpp-noamx/bin/llama-server
#
# stdout: the llama-server path of each variant built, one a line; progress goes to stderr.
# Env: LLAMA_CPP_PYTHON_VERSION (sdist to use), JOBS (parallel compile jobs, default 2),
#      PYTHON (interpreter whose pip downloads the sdist, default .venv/bin/python).
#
# The AMX variant is `-DGGML_NATIVE=ON` plus one patch: on Sapphire Rapids, GCC drops the stores that
# fill the tile config before `ldtilecfg`, and the stock build dies there; a compiler barrier just
# before each `_tile_loadconfig` keeps them. The no-AMX variant is the same native build with the
# AMX instruction sets switched off. On a CPU without AMX both are plain native builds.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/.bench"
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SDIST="$BENCH/sdist/llama_cpp_python-$VERSION.tar.gz"
SRC="$BENCH/llama.cpp-src-$VERSION"
MMQ="$SRC/ggml/src/ggml-cpu/amx/mmq.cpp"
BARRIER='asm volatile("" ::: "memory");'

log() { echo "build_llama_server: $*" >&2; }
die() { log "error: $*"; exit 1; }

download() {
    [[ -f "$SDIST" ]] && return
    log "downloading the llama-cpp-python $VERSION sdist"
    mkdir -p "$BENCH/sdist"
    nice -n 19 "$PYTHON" -m pip download -q --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$BENCH/sdist"
    [[ -f "$SDIST" ]] || die "pip did not leave $SDIST"
}

extract() {
    [[ -f "$SRC/CMakeLists.txt" ]] && return
    log "extracting vendor/llama.cpp into $SRC"
    local top="llama_cpp_python-$VERSION" tmp="$SRC.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp"
    nice -n 19 tar -xzf "$SDIST" -C "$tmp" --strip-components=3 "$top/vendor/llama.cpp"
    # the submodule's commit: the sdist keeps the submodule's git dir, the source tree only a pointer
    tar -xzOf "$SDIST" "$top/.git/modules/vendor/llama.cpp/HEAD" | tr -d '[:space:]' >"$tmp/.llama-commit" \
        || die "no vendor/llama.cpp commit in $SDIST"
    # the pointer leads nowhere here, and without it git would find this repo's commit instead
    rm -f "$tmp/.git"
    mv "$tmp" "$SRC"
}

patch_tile_config() {
    # Insert the barrier on its own line before each _tile_loadconfig call that lacks one.
    "$PYTHON" - "$MMQ" "$BARRIER" <<'EOF'
import sys

path, barrier = sys.argv[1], sys.argv[2]
lines = open(path).read().split("\n")
out: list[str] = []
calls = added = 0
for line in lines:
    if "_tile_loadconfig(" in line and not line.lstrip().startswith("//"):
        calls += 1
        if not (out and out[-1].strip().startswith(barrier)):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}{barrier}  // keep the tile-config stores: GCC drops them before ldtilecfg")
            added += 1
    out.append(line)
if calls == 0:
    sys.exit(f"no _tile_loadconfig call in {path}: the patch no longer fits this llama.cpp")
if added:
    open(path, "w").write("\n".join(out))
print(f"{calls} _tile_loadconfig call(s), {added} barrier(s) added", file=sys.stderr)
EOF
    # verify: every call is directly preceded by the barrier
    local calls patched
    calls=$(grep -c '_tile_loadconfig(' "$MMQ")
    patched=$(grep -B1 '_tile_loadconfig(' "$MMQ" | grep -cF "$BARRIER" || true)
    [[ "$calls" -ge 1 && "$patched" -eq "$calls" ]] \
        || die "tile-config barrier not applied in $MMQ ($patched of $calls calls)"
    grep -nF -A1 "$BARRIER" "$MMQ" >&2
}

# build VARIANT EXTRA_C_FLAGS: configure once, then build the two targets; skipped when up to date
build() {
    local variant=$1 cflags=$2
    local dir="$BENCH/llama.cpp-$variant" commit
    commit=$(cat "$SRC/.llama-commit")
    local args=(
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
        -DLLAMA_BUILD_APP=OFF
        # no web UI: npm is not wanted and the prebuilt one would be downloaded at build time
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF  # LLAMA_CURL is deprecated and ignored in this version
        "-DLLAMA_BUILD_COMMIT=${commit:0:8}" -DLLAMA_BUILD_NUMBER=0  # the sdist's git history is shallow
        "-DCMAKE_C_FLAGS=$cflags" "-DCMAKE_CXX_FLAGS=$cflags"
    )
    local stamp="$dir/.built" want
    want="$VERSION $commit ${args[*]} $(sha256sum "$MMQ" | cut -c1-16)"
    if [[ -x "$dir/bin/llama-server" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "$variant: already built"
        echo "$dir/bin/llama-server"
        return
    fi
    log "$variant: configuring in $dir"
    GIT_CEILING_DIRECTORIES="$BENCH" nice -n 19 cmake -S "$SRC" -B "$dir" "${args[@]}" >"$dir.configure.log" 2>&1 \
        || { tail -30 "$dir.configure.log" >&2; die "cmake configure failed (log: $dir.configure.log)"; }
    log "$variant: building llama-server and llama-bench with -j$JOBS (log: $dir.build.log)"
    local t0=$SECONDS
    nice -n 19 cmake --build "$dir" --target llama-server llama-bench -j "$JOBS" >"$dir.build.log" 2>&1 \
        || { tail -30 "$dir.build.log" >&2; die "build failed (log: $dir.build.log)"; }
    local amx_insns
    amx_insns=$(objdump -d --no-show-raw-insn "$dir/bin/llama-server" | grep -c 'ldtilecfg' || true)
    cat >"$dir/build-info.txt" <<EOF
llama_cpp_python_sdist=$VERSION
llama_cpp_commit=$commit
llama_cpp_version=$(sed -n 's/^set(LLAMA_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$SRC/CMakeLists.txt" | paste -sd.)
variant=$variant
extra_flags=$cflags
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
cpu_has_amx=$(grep -qw amx_tile /proc/cpuinfo && echo yes || echo no)
ldtilecfg_in_binary=$amx_insns
build_seconds=$((SECONDS - t0))
EOF
    log "$variant: built in $((SECONDS - t0)) s; ldtilecfg instructions in the binary: $amx_insns"
    echo "$want" >"$stamp"
    echo "$dir/bin/llama-server"
}

mkdir -p "$BENCH"
grep -qw amx_tile /proc/cpuinfo \
    || log "warning: this CPU has no AMX (no amx_tile in /proc/cpuinfo): the 'amx' build is a plain native one"
download
extract
patch_tile_config
build amx ""
if [[ "${NOAMX:-0}" == 1 ]]; then
    build noamx "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
