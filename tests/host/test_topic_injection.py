"""Topic injection: a device id, group name or topic prefix that could reach other devices'
topics (+, #, /, NUL, over-long, and look-alikes: overlong UTF-8, RTL override) is refused
where it enters, by the same validator (firmware/bootconfig.py): at provisioning
(tools/provision.py) and at boot, from a bootstrap config already on flash. At boot the
device logs one clear error, never connects with it, and keeps waiting for a good config.
(The basic id and group cases of provisioning are in test_provision.py.)"""
import json
import os
import re
import time

import pytest

from tools import provision
from testbed.devices import Spec

# (field, value, what the error line must say); a bytes value is put raw into the JSON text.
BAD = [
    ("device_id", "a+b", "device_id 'a\\+b' has a character outside"),
    ("device_id", "dev/#", "device_id 'dev/#' has a character outside"),
    ("device_id", "dev/other", "device_id 'dev/other' has a character outside"),
    ("device_id", "a\x00b", r"device_id 'a\\x00b' has a character outside"),
    ("device_id", "x" * 65, "device_id must be a string of 1..64 characters"),
    ("device_id", "", "device_id must be a string of 1..64 characters"),
    ("device_id", "dev\u202e", "device_id .* has a character outside"),
    ("device_id", b"dev\xc0\xaf", "device_id .* has a character outside"),  # overlong "/"
    ("groups", ["model-x", "g+"], "group 'g\\+' has a character outside"),
    ("groups", ["#"], "group '#' has a character outside"),
    ("groups", ["a/b"], "group 'a/b' has a character outside"),
    ("groups", ["g\x00"], r"group 'g\\x00' has a character outside"),
    ("groups", ["g" * 65], "group must be a string of 1..64 characters"),
    ("prefix", "site/+", "prefix must be printable ASCII without the MQTT wildcards"),
    ("prefix", "#", "prefix must be printable ASCII without the MQTT wildcards"),
    ("prefix", "p\x00", "prefix must be printable ASCII without the MQTT wildcards"),
    ("prefix", b"p\xc0\xab/", "prefix must be printable ASCII without the MQTT wildcards"),
]


def _raw_config(field, value, dev, host, port):
    """The bootstrap config as bytes, with `value` in `field` (raw bytes kept raw)."""
    doc = {"device_id": dev, "broker": {"host": host, "port": port}}
    marker = "@@VALUE@@"
    doc[field] = marker
    text = json.dumps(doc, ensure_ascii=False).encode()
    raw = value if isinstance(value, bytes) else json.dumps(value, ensure_ascii=False).encode()
    if isinstance(value, bytes):
        raw = b'"' + raw + b'"'
    return text.replace(b'"' + marker.encode() + b'"', raw)


def test_a_device_with_an_injecting_id_group_or_prefix_logs_once_and_never_connects(
        fleet, broker, tmp_path):
    # Every config names the test's broker: a device that took its config would connect.
    specs = []
    for i, (field, value, _) in enumerate(BAD):
        path = tmp_path / ("bad-%02d.json" % i)
        path.write_bytes(_raw_config(field, value, "ok-%02d" % i, broker.host, broker.port))
        specs.append(Spec(str(tmp_path / ("bi-%02d.img" % i)),
                          files={"/config.json": str(path)}))
    p = fleet.start(*specs)
    # Each board: exactly its error. The config is re-read every 5 s; wait for one re-read.
    for s, (field, value, want) in zip(specs, BAD):
        p.wait_line(re.escape(s.image) + " E bootstrap config: " + want, 10)
    time.sleep(6)
    out = p.output()
    assert p.alive(), out
    for s, (field, value, want) in zip(specs, BAD):
        lines = [l for l in out.splitlines() if l.startswith(s.image + " ")]
        assert len(lines) == 1 and " E bootstrap config: " in lines[0], (field, value, lines)
    assert "Traceback" not in out and " connected" not in out and "resolved" not in out
    assert "New client connected" not in broker.log(), broker.log()


@pytest.mark.parametrize("args, what", [
    (["--prefix", "site/+"], "prefix"),
    (["--prefix", "#"], "prefix"),
    (["--prefix", "p\x00"], "prefix"),
    (["--prefix", "caf\u00e9"], "prefix"),
    (["--group", "g\u202e"], "group"),
    (["--group", "a/#"], "group"),
])
def test_provisioning_refuses_injecting_prefixes_and_groups(tmp_path, capsys, args, what):
    out = str(tmp_path / "out")
    assert provision.main(["dev-1", "--broker", "h", "--out", out] + args) == 2
    assert not os.path.exists(out)
    err = capsys.readouterr().err
    assert "error" in err and what in err, err


@pytest.mark.parametrize("dev", ["dev\u202e", "\U0001F600", "a" * 65 + "\u00e9", "\u0430bc"])
def test_provisioning_refuses_look_alike_ids(tmp_path, capsys, dev):
    out = str(tmp_path / "out")
    assert provision.main([dev, "--broker", "h", "--out", out]) == 2
    assert not os.path.exists(out)
