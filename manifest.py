# Freeze manifest: the firmware and its libraries compiled into a custom MicroPython build,
# so their bytecode runs from flash instead of taking ~100 KB of a board's heap.
#
#   ESP32: make -C ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=/path/to/repo/manifest.py
#   RP2:   make -C ports/rp2 BOARD=RPI_PICO_W FROZEN_MANIFEST=/path/to/repo/manifest.py
#
# The port's own manifest comes first (asyncio, network helpers, ...). boot.py and main.py
# stay on the filesystem, as do /config.json and the certificates (tools/deploy.py). The
# Unix board (unix.py, unixargs.py) is left out: it is the simulator's, never a
# microcontroller's (manifest_unix.py freezes it for the board-model build).
# The firmware's file lists are in manifest_common.py, shared with manifest_unix.py.
include("$(PORT_DIR)/boards/manifest.py")
include("manifest_common.py")
