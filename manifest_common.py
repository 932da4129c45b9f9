# Freeze lists shared by manifest.py (ESP32, RP2) and manifest_unix.py (the board-model build
# of the Unix port), so the boards and their model freeze the same firmware. Board modules
# that only one of them needs are added by that manifest.
# Paths are relative to this file; tests/host/test_packaging.py checks that each exists.
package("backoff", base_path="lib")
package("mqtt", base_path="lib")
package("outbox", base_path="lib")
package("p256", base_path="lib")

FIRMWARE = (
    "__init__.py", "api.py", "app.py", "apphost.py", "bootconfig.py", "bootlog.py", "clock.py", "commands.py",
    "configcache.py", "configsync.py", "duty.py", "failover.py", "health.py", "ntp.py", "ota.py", "otacheck.py", "otahttp.py", "protocols.py", "run.py",
    "settings.py", "supervisor.py", "telemetry.py", "tlsctx.py", "topics.py", "twin.py", "version.py", "wifi.py",
    "boards/__init__.py", "boards/base.py", "boards/mcu.py", "boards/mcuhw.py", "boards/esp32.py", "boards/rp2.py",
)
package("firmware", files=FIRMWARE, base_path=".")
# The loader's boot control (main.py imports it before any slot is on sys.path).
module("otaboot.py", base_path=".")
