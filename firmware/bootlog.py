# Boot history on flash: the boot number that tags every message, so consumers can tell a
# restart (seq back to 1) from loss. Written atomically: temp file, then rename.
import json

PATH = "/boot.json"


def read(fs):
    try:
        with fs.open(PATH, "r") as f:
            d = json.loads(f.read())
        if isinstance(d, dict) and isinstance(d.get("boot"), int):
            return d
    except (OSError, ValueError):
        pass
    return {"boot": 0}


def write_atomic(fs, path, text):
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.rename(tmp, path)


def next_boot(fs):
    """Increment and persist the boot counter; return the new record."""
    rec = read(fs)
    rec["boot"] += 1
    write_atomic(fs, PATH, json.dumps(rec))
    return rec
