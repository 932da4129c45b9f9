# Freeze manifest: the firmware and its libraries compiled into a custom MicroPython build,
# so their bytecode runs from flash instead of taking ~100 KB of a board's heap.
#
#   ESP32: make -C ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=/path/to/repo/manifest.py
#   RP2:   make -C ports/rp2 BOARD=RPI_PICO_W FROZEN_MANIFEST=/path/to/repo/manifest.py
#
# The port's own manifest comes first (asyncio, network helpers, ...). boot.py and main.py
# stay on the filesystem, as do /config.json and the certificates (tools/deploy.py). The
# Unix board (unix.py, unixargs.py) is left out: it is the simulator's, never a
# microcontroller's.
# Paths are relative to this file; tests/host/test_packaging.py checks that each exists.
include("$(PORT_DIR)/boards/manifest.py")

package("backoff", base_path="lib")
package("mqtt", base_path="lib")
package("outbox", base_path="lib")

FIRMWARE = (
    "__init__.py", "app.py", "bootconfig.py", "bootlog.py", "commands.py", "configcache.py",
    "configsync.py", "health.py", "ntp.py", "settings.py", "supervisor.py", "telemetry.py",
    "tlsctx.py", "topics.py", "twin.py", "version.py", "wifi.py",
    "boards/__init__.py", "boards/base.py", "boards/mcu.py", "boards/esp32.py", "boards/rp2.py",
)
package("firmware", files=FIRMWARE, base_path=".")
