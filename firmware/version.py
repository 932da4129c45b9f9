# Firmware version reported in status messages; bumped on every release.
FW_VERSION = "0.1.0"
# Version of the payload contract in README ("v" in every message).
SCHEMA = 1
# Over-the-air updates (tools/bundle.py sets both in a bundle): a bundle's version, an
# integer that only grows; the factory image is 1.
BUNDLE_VERSION = 1
# Formats of what an update keeps on the flash: the offline queue and the config cache. A
# bundle that needs a newer one is refused by this version (a rollback could not read it).
QUEUE_FORMAT = 1
CACHE_FORMAT = 1
