# Freeze manifest of the testbed's bare-metal builds (testbed/mcu/build.sh, `make mcu`): what
# a board freezes from this repository (manifest_common.py, the lists manifest.py freezes on
# an ESP32 or an RP2) plus asyncio, which a board's own port manifest brings. Not the Unix
# board modules (manifest_unix.py's), and nothing of micropython-lib: the tests' guest-side
# stand-ins (testbed/mcu/guest/) are sent over the serial line, never frozen.
include("$(MPY_DIR)/extmod/asyncio")
include("../../manifest_common.py")
