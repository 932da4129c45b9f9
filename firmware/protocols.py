# Which brokers spoke only MQTT 3.1.1, remembered on flash so that a device does not ask
# them in 5 at every boot. Forgotten at the device's own config refresh (the client's
# retry_v5), so an upgraded broker is noticed on a per-device random schedule.
import json

from firmware.bootlog import write_atomic

PATH = "/mqtt-3.1.1.json"


def _name(e):
    return "%s:%d" % (e["host"], e["port"])


def load(fs, endpoints):
    """Mark the endpoints remembered as 3.1.1-only ("fallback", as the client reads it)."""
    try:
        with fs.open(PATH, "r") as f:
            names = json.loads(f.read())
    except (OSError, ValueError):
        return  # none remembered (or unreadable: 5 is tried, and learnt again)
    if isinstance(names, list):
        for e in endpoints:
            if _name(e) in names:
                e["fallback"] = True


def saver(fs, endpoints, log):
    """The client's on_protocol: writes the whole list again (at most one per endpoint)."""

    def save(i, fallback):
        try:
            write_atomic(fs, PATH, json.dumps([_name(e) for e in endpoints
                                               if e.get("fallback")]))
        except OSError as err:  # a full flash: learnt again after the next boot
            log("W", "could not remember %s's protocol: %r" % (_name(endpoints[i]), err))

    return save
