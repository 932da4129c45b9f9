"""Secrets stay secret: a device with a broker password, a Wi-Fi password and a TLS client
key (mutual TLS, certificates made as in test_tls.py) runs, is asked for everything it can
say (ping, report, logs, a bad command, an unknown one), has its sensor crash a few times
(task restarts and their errors are logged and counted), and a second device is refused for
a wrong password. None of the secret bytes, in any usual encoding, may appear in a device's
console output, in anything published on the broker (an operator subscribed to `#`: status,
telemetry, health, config/reported, command results, the `logs` answer), or in the
broker's log."""
import base64
import json
import time

import pytest

from testbed import pki
from testbed.broker import Mosquitto, free_port
from testbed.devices import Spec
from testbed.observer import Observer

PW = "Brk-pw-7f3Qz9xVw2"
WRONG_PW = "Wrong-pw-K8d1Lp0"
WIFI_PW = "Wifi-pw-Mn4Ty6Rq"
OPERATOR = ("operator", "op-secret-Hh2j")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    pki.ca(d, "ca")
    pki.leaf(d, "server", "ca", san="DNS:localhost,IP:127.0.0.1")
    pki.leaf(d, "sec-1", "ca")
    return d


def encodings(secret):
    """The forms a leaked secret could take in text or a payload."""
    b = secret if isinstance(secret, bytes) else secret.encode()
    forms = [b, b.hex().encode(), b.hex().upper().encode(), base64.b64encode(b),
             repr(b).encode()[2:-1]]
    if not isinstance(secret, bytes):
        forms.append(json.dumps(secret).encode()[1:-1])
    return [f for f in forms if len(f) >= 8]


def leaks(blob, secrets):
    return [(name, f[:24]) for name, s in secrets.items() for f in encodings(s) if f in blob]


def test_secrets_never_leave_the_device(tmp_path, certs, fleet):
    mtls = free_port()
    conf = ("listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\n"
            "require_certificate true\n" % (mtls, certs / "ca.pem", certs / "server.pem",
                                            certs / "server.key"))
    acl = ("user operator\ntopic readwrite #\n"
           "pattern readwrite devices/%u/#\npattern read fleet/+/config/desired\n")
    broker = Mosquitto(tmp_path / "broker", extra_conf=conf, acl=acl,
                       passwords={"sec-1": PW, "sec-2": PW, OPERATOR[0]: OPERATOR[1]}).start()
    obs = None
    try:
        obs = Observer(broker.host, broker.port, auth=OPERATOR)
        key_der = (certs / "sec-1.key.der").read_bytes()
        scalar = key_der[7:39]  # SEC1: 30 77 02 01 01 04 20 <private key>
        assert key_der[5:7] == b"\x04\x20" and len(scalar) == 32
        secrets = {"broker password": PW, "wrong password": WRONG_PW, "wifi password": WIFI_PW,
                   "client key": key_der, "private scalar": scalar,
                   "scalar (16 bytes)": scalar[8:24]}
        control = tmp_path / "sec-1.control"
        control.write_text("")
        files = {"/ca.der": str(certs / "ca.der"), "/sec-1.der": str(certs / "sec-1.der"),
                 "/sec-1.key.der": str(certs / "sec-1.key.der")}
        tls = {"ca": "/ca.der", "cert": "/sec-1.der", "key": "/sec-1.key.der",
               "server_hostname": "localhost"}
        fleet.endpoint = (broker.host, mtls)
        cfg = fleet.config("sec-1", telemetry_interval=0.3, health_interval=2,
                           wifi=[{"ssid": "site-a", "password": WIFI_PW}],
                           broker={"user": "sec-1", "password": PW, "tls": tls, "timeout": 3,
                                   "reconnect": {"first_window": 0.3}})
        p = fleet.start(Spec(str(tmp_path / "sec-1.img"), config=cfg, files=files,
                             control=str(control)))
        fleet.endpoint = (broker.host, broker.port)
        q = fleet.device("sec-2", broker={"user": "sec-2", "password": WRONG_PW,
                                          "reconnect": {"first_window": 0.3}})
        # A damaged key file (cut short, the private key inside): refused with an error
        # that names the file's fault, not its bytes.
        cut = tmp_path / "cut.key.der"
        cut.write_bytes(key_der[:60])
        cfg3 = fleet.config("sec-3", broker={"user": "sec-1", "password": PW, "port": mtls,
                                             "tls": tls})
        r = fleet.start(Spec(str(tmp_path / "sec-3.img"), config=cfg3,
                             files=dict(files, **{"/sec-1.key.der": str(cut)})))
        try:
            obs.wait(lambda m: len(obs.json("devices/sec-1/telemetry")) >= 3, 20, "telemetry")
        except AssertionError:
            raise AssertionError(p.output() + broker.log()[-2000:])
        q.wait_line(r"sec-2 . connect failed at connack: .*not authori[sz]ed", 10)
        r.wait_line(r"E bootstrap config: TLS certificate or key unusable", 10)
        for name, body in (("ping", {"id": "s1"}), ("report", {"id": "s2"}),
                           ("no-such", {"id": "s3"}), ("ping", "{bad")):
            obs.publish("devices/sec-1/cmd/" + name,
                        body if isinstance(body, str) else json.dumps(body))
        # The sensor fails for a while: task restarts, each error logged and counted.
        control.write_text("crash")
        p.wait_line(r"sec-1 . .*sensor fault \(test hook\)", 10)
        time.sleep(1.0)
        control.write_text("")
        obs.publish("devices/sec-1/cmd/logs", json.dumps({"id": "s4", "n": 40}))
        logs = obs.wait(lambda m: [r for r in obs.json("devices/sec-1/cmd/logs/result")
                                   if r["id"] == "s4"], 10, "logs answer")[-1]
        h = obs.wait(lambda m: [h for h in obs.json("devices/sec-1/health")
                                if h["tasks"]["restarts"]], 10, "health after the crashes")[-1]
        assert len(logs["data"]["lines"]) >= 5 and h["mqtt"]["connects"] >= 1
        kinds = {t.rsplit("/", 1)[-1] for _, t, _, _ in obs.messages if "sec-1" in t}
        assert {"telemetry", "status", "health", "reported", "result"} <= kinds, kinds
        time.sleep(0.5)
        published = b"\n".join(t.encode() + b" " + pl for _, t, pl, _ in obs.messages)
        assert not leaks(published, secrets), leaks(published, secrets)
        for proc in (p, q, r):
            console = proc.output().encode()
            assert not leaks(console, secrets), leaks(console, secrets)
        assert not leaks(broker.log().encode(), secrets)
        # The checks can see a leak: the secrets are on the device's flash, by design.
        flash = (tmp_path / "sec-1.img").read_bytes()
        assert leaks(flash, {"broker password": PW})
        assert leaks(flash, {"client key": key_der})
    finally:
        if obs:
            obs.close()
        fleet.close()
        broker.stop()
