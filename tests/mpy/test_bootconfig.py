# Bootstrap config: a bad file is one clear ConfigError, never a crash later.
import json

from firmware import bootconfig
from firmware.boards.unix import open_flash
from mpyutil import fresh_image, raises

GOOD = {"device_id": "dev-1", "broker": {"host": "127.0.0.1", "port": 1883}}


def _with(**over):
    d = json.loads(json.dumps(GOOD))
    d.update(over)
    return d


def test_minimal_config_gets_defaults():
    cfg = bootconfig.validate(GOOD)
    assert cfg["device_id"] == "dev-1"
    assert cfg["prefix"] == ""
    assert cfg["broker"]["keepalive"] == 60
    assert cfg["telemetry_interval"] == 60
    assert cfg["wifi"] == [] and cfg["groups"] == []


def test_prefix_gets_trailing_slash():
    assert bootconfig.validate(_with(prefix="acme"))["prefix"] == "acme/"


def test_rejects_ids_that_could_reach_other_topics():
    for bad in ("", "a/b", "a+b", "a#", "a\x00", "x" * 65, 5, None):
        e = raises(bootconfig.ConfigError, bootconfig.validate, _with(device_id=bad))
        assert "device_id" in str(e)
    raises(bootconfig.ConfigError, bootconfig.validate, _with(groups=["ok", "bad/+"]))
    raises(bootconfig.ConfigError, bootconfig.validate, _with(prefix="a/#"))


def test_a_dot_in_an_id_or_group_is_refused_saying_why():
    # RabbitMQ delivers "." as "/": pump.7 would get devices/pump/7/cmd/ping.
    for over in ({"device_id": "pump.7"}, {"groups": ["model-x", "model-x.v3.1"]},
                 {"device_id": "."}):
        e = raises(bootconfig.ConfigError, bootconfig.validate, _with(**over))
        assert "not portable across brokers" in str(e) and "RabbitMQ" in str(e), str(e)
    assert "RabbitMQ" not in str(raises(bootconfig.ConfigError, bootconfig.validate,
                                        _with(device_id="a/b")))
    assert bootconfig.validate(_with(groups=["model-x-v3-1"]))["groups"] == ["model-x-v3-1"]


def test_rejects_bad_types_and_ranges():
    for broker in ({"port": 1883}, {"host": "h", "port": 0}, {"host": "h", "port": "1883"},
                   {"host": "h", "port": True}, {"host": "h", "keepalive": 1}):
        raises(bootconfig.ConfigError, bootconfig.validate, _with(broker=broker))
    raises(bootconfig.ConfigError, bootconfig.validate, _with(telemetry_interval="1"))
    raises(bootconfig.ConfigError, bootconfig.validate, _with(wifi={"ssid": "x"}))
    raises(bootconfig.ConfigError, bootconfig.validate, [GOOD])


def test_load_missing_malformed_and_oversized_files():
    bdev, fs = open_flash(fresh_image("bootcfg"), 64 * 4096)
    e = raises(bootconfig.ConfigError, bootconfig.load, fs)
    assert "missing" in str(e)
    with fs.open("/config.json", "w") as f:
        f.write('{"device_id": ')
    assert "not valid JSON" in str(raises(bootconfig.ConfigError, bootconfig.load, fs))
    with fs.open("/config.json", "w") as f:
        f.write(" " * 5000)
    assert "larger than" in str(raises(bootconfig.ConfigError, bootconfig.load, fs))
    with fs.open("/config.json", "w") as f:
        f.write(json.dumps(GOOD))
    assert bootconfig.load(fs)["device_id"] == "dev-1"


def test_reconnect_policy_and_timeouts_come_from_config():
    cfg = bootconfig.validate(GOOD)["broker"]
    assert cfg["timeout"] == 10 and cfg["window"] == 16 and cfg["max_frame"] == 4096
    r = cfg["reconnect"]
    assert (r["base"], r["cap"], r["first_window"], r["stable_s"]) == (1, 120, 5, 30)
    assert (r["hard_floor"], r["hard_cap"]) == (60, 1800)
    wide = _with(broker={"host": "h", "reconnect": {"first_window": 120, "cap": 600}})
    r = bootconfig.validate(wide)["broker"]["reconnect"]
    assert r["first_window"] == 120 and r["cap"] == 600 and r["base"] == 1


def test_bad_reconnect_settings_are_refused():
    for rec in ({"first_window": -1}, {"cap": "x"}, {"bogus": 1}, {"base": 10, "cap": 5},
                {"flap_limit": 1.5}, []):
        e = raises(bootconfig.ConfigError, bootconfig.validate,
                   _with(broker={"host": "h", "reconnect": rec}))
        assert "reconnect" in str(e) or "flap_limit" in str(e) or "first_window" in str(e) \
            or "cap" in str(e), (rec, str(e))
    raises(bootconfig.ConfigError, bootconfig.validate, _with(broker={"host": "h", "timeout": 0}))


def test_profile_defaults_to_standard_and_accepts_only_known_ones():
    assert bootconfig.validate(GOOD)["profile"] == "standard"
    assert bootconfig.validate(_with(profile="standard"))["profile"] == "standard"
    assert bootconfig.validate(_with(profile="baseline"))["profile"] == "baseline"
    for bad in ("Baseline", "", "fast", None, 1, ["baseline"]):
        e = raises(bootconfig.ConfigError, bootconfig.validate, _with(profile=bad))
        assert "profile" in str(e), (bad, str(e))


def test_tls_needs_a_ca_and_a_cert_with_its_key():
    ok = bootconfig.validate(_with(broker={"host": "h", "tls": {"ca": "/ca.der"}}))
    assert ok["broker"]["tls"]["ca"] == "/ca.der"
    e = raises(bootconfig.ConfigError, bootconfig.validate, _with(broker={"host": "h", "tls": {}}))
    assert "ca" in str(e)
    raises(bootconfig.ConfigError, bootconfig.validate,
           _with(broker={"host": "h", "tls": {"ca": "/ca", "cert": "/c"}}))
