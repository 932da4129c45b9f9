# Firmware version reported in status messages; bumped on every release.
FW_VERSION = "0.1.0"
# Version of the payload contract in README ("v" in every message).
SCHEMA = 1
