# Freeze manifest of the board-model build: the Unix port built 32-bit with the firmware
# frozen in, so the simulator can measure heap as an ESP32 or a Pico W would hold it
# (testbed/board_model/build.sh, `make board-model MPY_DIR=...`).
#
# The Unix port has no boards/manifest.py, so asyncio is included here; the firmware lists
# are manifest_common.py's, the ones the boards freeze. A frozen package cannot load a
# submodule from the filesystem, so the Unix board modules, left out of manifest.py, are
# frozen here. ssl: see testbed/board_model/ssl.py (the boards get theirs from micropython-lib).
# Paths are relative to this file; tests/host/test_packaging.py checks that each exists.
include("$(MPY_DIR)/extmod/asyncio")
include("manifest_common.py")
package("firmware", files=("boards/unix.py", "boards/unixargs.py", "boards/unixhw.py"),
        base_path=".")
module("unixflash.py", base_path=".")
module("ssl.py", base_path="testbed/board_model")
