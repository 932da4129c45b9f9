#!/bin/bash
# `make mcu MPY_DIR=...`: MicroPython's qemu port of a checkout built bare metal for two
# boards, with the firmware frozen in as a board freezes it (testbed/mcu/manifest.py:
# manifest_common.py's lists plus asyncio), to run under QEMU (`make test-mcu`):
#
#   build/mcu/m0/firmware.elf    BOARD MICROBIT: Cortex-M0 (ARMv6-M, the RP2040's instruction
#                                set), built as ports/rp2 builds (-Os; py/map.c, mpz.c, vm.c
#                                -O2; computed goto)
#   build/mcu/rv32/firmware.elf  BOARD VIRT_RV32: rv32imac (like an ESP32-C3), built as
#                                ports/esp32 builds (-O2, computed goto)
#   build/mcu/mpy-cross          the checkout's mpy-cross (the tests' .mpy must match it)
#
# Both add what the firmware needs and the qemu port leaves out (testbed/mcu/boards/):
# littlefs2 (vfs.VfsLfs2), asyncio's C core, os.urandom, time.time()/gmtime() (Unix epoch),
# and an idle wait that sleeps the CPU (WFI) as a board does; the GC heap is the port's
# default, MICROPY_HEAP_SIZE 143360 (HEAP=bytes for another; MCU_BOARDS="m0" for one board).
# No submodule, no micropython-lib, no network. CI does not run this: it has no MicroPython
# checkout.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/testbed/mcu
OUT=$ROOT/build/mcu
MPY_DIR=${MPY_DIR:-}
PACKAGES=(qemu-system-arm gcc-arm-none-eabi libnewlib-arm-none-eabi
          qemu-system-misc gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf)

need() {
    cat >&2 <<EOF
mcu: $1

It needs:
  - a MicroPython checkout with ports/qemu's VIRT_RV32 board and ROMFS (extmod/vfs_rom.c;
    tested with 1.29.0-preview, 1c3c201149), passed as MPY_DIR:
      git clone https://github.com/micropython/micropython
      make mcu MPY_DIR=\$PWD/micropython
  - Debian's cross compilers and QEMU (installed by this script when run as root):
      apt-get install -y ${PACKAGES[*]}
No submodule, no micropython-lib and no network access are needed.
EOF
    exit 2
}

[ -n "$MPY_DIR" ] || need "MPY_DIR is not set"
MPY_DIR=$(cd "$MPY_DIR" 2>/dev/null && pwd) || need "MPY_DIR=$MPY_DIR is not a directory"
[ -f "$MPY_DIR/ports/qemu/Makefile" ] && [ -f "$MPY_DIR/ports/qemu/boards/VIRT_RV32/mpconfigboard.mk" ] &&
    [ -f "$MPY_DIR/extmod/asyncio/manifest.py" ] && [ -f "$MPY_DIR/extmod/vfs_rom.c" ] ||
    need "$MPY_DIR is not a MicroPython checkout with ports/qemu (BOARD VIRT_RV32), extmod/asyncio and extmod/vfs_rom.c"

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "mcu: installing ${missing[*]}" >&2
        apt-get install -y "${missing[@]}" >&2 ||
            { apt-get update >&2 && apt-get install -y "${missing[@]}" >&2; } ||
            need "apt-get could not install ${missing[*]}"
    else
        need "missing Debian packages: ${missing[*]} (run as root: apt-get install -y ${missing[*]})"
    fi
fi
RV32_LIBGCC=$(ls /usr/lib/gcc/riscv64-unknown-elf/*/rv32imac/ilp32/libgcc.a 2>/dev/null | tail -1)
[ -n "$RV32_LIBGCC" ] || need "no rv32imac/ilp32 libgcc.a under /usr/lib/gcc/riscv64-unknown-elf/"

JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
if [ ! -x "$MPY_DIR/mpy-cross/build/mpy-cross" ]; then
    echo "mcu: building mpy-cross" >&2
    make -C "$MPY_DIR/mpy-cross" -j"$JOBS" >&2
fi

# The build refuses to freeze anything without $(MPY_LIB_DIR)/README.md, even when nothing
# is require()d: a directory with only that README stands in for micropython-lib.
WORK=$OUT/work
mkdir -p "$WORK/no-micropython-lib"
echo "Stand-in for micropython-lib: the mcu build requires nothing from it." \
    > "$WORK/no-micropython-lib/README.md"

# The GC heap (MICROPY_HEAP_SIZE) of both boards; HEAP=bytes to try another.
HEAP=${HEAP:-143360}
COMMIT=$(git -C "$MPY_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)
# Objects per checkout and board settings: another MPY_DIR, commit or configuration must
# not reuse them (the port's build does not see a changed mpconfigport.h in its qstrs).
OBJ_TAG=$( (echo "$MPY_DIR $COMMIT $HEAP"; cat "$HERE"/boards/*/*) | md5sum | cut -c1-8)
FINGERPRINT=$(python3 "$HERE/test.py" --fingerprint)

build() {  # build NAME BOARD_DIR MAKE-ARGS...
    local name=$1 board_dir=$2
    shift 2
    local t0=$SECONDS
    echo "mcu: building build/mcu/$name/firmware.elf" >&2
    make -C "$MPY_DIR/ports/qemu" -j"$JOBS" BOARD="MCU_${name^^}" BOARD_DIR="$board_dir" \
        BUILD="$WORK/obj-$name-$OBJ_TAG" FROZEN_MANIFEST="$HERE/manifest.py" \
        MPY_LIB_DIR="$WORK/no-micropython-lib" MICROPY_HEAP_SIZE=$HEAP "$@" >&2
    find "$WORK" -maxdepth 1 -name "obj-$name-*" ! -name "obj-$name-$OBJ_TAG" -exec rm -rf {} +
    mkdir -p "$OUT/$name"
    cp "$WORK/obj-$name-$OBJ_TAG/firmware.elf" "$OUT/$name/firmware.elf.new"
    mv "$OUT/$name/firmware.elf.new" "$OUT/$name/firmware.elf"
    local args
    args=$(printf '%s\n' "$@" | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read().splitlines()))')
    cat > "$OUT/$name/BUILD-INFO.json" <<EOF
{"board": "$name", "mpy_dir": "$MPY_DIR", "commit": "$COMMIT", "heap": $HEAP,
 "make_args": $args, "fingerprint": "$FINGERPRINT", "seconds": $((SECONDS - t0))}
EOF
    echo "mcu: build/mcu/$name/firmware.elf in $((SECONDS - t0)) s" >&2
}

for b in ${MCU_BOARDS:-m0 rv32}; do
    case $b in
        m0) build m0 "$HERE/boards/M0" CFLAGS_EXTRA=-DCPU_FREQ_HZ=16000000 ;;
        rv32) build rv32 "$HERE/boards/RV32" LIBS="$RV32_LIBGCC" COPT="-O2 -DNDEBUG" CSUPEROPT=-O2 ;;
        *) need "MCU_BOARDS=$b: the boards are m0 and rv32" ;;
    esac
done
cp "$MPY_DIR/mpy-cross/build/mpy-cross" "$OUT/mpy-cross"
echo "mcu: MicroPython $COMMIT ($MPY_DIR), firmware $FINGERPRINT; run them with make test-mcu"
