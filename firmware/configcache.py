# The applied config layers cached on flash, so the device runs from them at boot before
# any network. Written atomically (temp file, then rename) with a CRC of the body inside;
# written only when the layers changed. A missing or corrupt cache means defaults, reported.
import json
from binascii import crc32

from firmware.bootlog import write_atomic

PATH = "/config-cache.json"


def load(fs):
    """(layers, None) or (None, reason) where reason is "missing" or "corrupt: ..."."""
    try:
        with fs.open(PATH, "r") as f:
            text = f.read()
    except OSError:
        return None, "missing"
    try:
        outer = json.loads(text)
        body = outer["body"]
        if crc32(body.encode()) != outer["crc"]:
            return None, "corrupt: checksum mismatch"
        layers = json.loads(body)
        if not isinstance(layers, dict):
            raise ValueError("not an object")
        return layers, None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, "corrupt: %s" % e


def save(fs, layers, last_body=None):
    """Write the layers if they differ from last_body; returns the body written (or
    last_body when nothing changed)."""
    body = json.dumps(layers)
    if body == last_body:
        return last_body
    write_atomic(fs, PATH, json.dumps({"crc": crc32(body.encode()), "body": body}))
    return body
