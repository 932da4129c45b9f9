# Config twin: layered merge, versions, validation, limits, provenance, and the flash cache.
import json

from firmware import configcache, settings
from firmware.boards.unix import open_flash
from firmware.twin import Rejected, Twin, check_text, parse_layer
from mpyutil import fresh_image, raises

ORDER = ["all", "model-x", "model-x-v3", "device"]


def doc(version, **kw):
    d = {"version": version}
    d.update(kw)
    return json.dumps(d)


def test_layers_merge_most_general_first_device_last_key_by_key():
    t = Twin(ORDER)
    t.offer("all", doc(1, telemetry_interval=30, reconnect={"cap": 300, "base": 2}))
    t.offer("model-x-v3", doc(4, reconnect={"cap": 600}))
    t.offer("device", doc(2, telemetry_interval=5))
    eff = t.effective()
    assert eff["telemetry_interval"] == 5  # device beats groups
    assert eff["reconnect.cap"] == 600  # the more specific group beats `all`
    assert eff["reconnect.base"] == 2  # nested objects merge: `all` still gives base
    assert eff["log_level"] == "info"  # declared default
    src = t.sources()
    assert (src["telemetry_interval"], src["reconnect.cap"], src["reconnect.base"],
            src["log_level"]) == ("device", "model-x-v3", "all", "default")
    rep = t.reported()
    assert rep["versions"] == {"all": 1, "model-x-v3": 4, "device": 2}
    # The order layers arrive in does not matter.
    u = Twin(ORDER)
    u.offer("device", doc(2, telemetry_interval=5))
    u.offer("model-x-v3", doc(4, reconnect={"cap": 600}))
    u.offer("all", doc(1, telemetry_interval=30, reconnect={"cap": 300, "base": 2}))
    assert u.effective() == eff and u.sources() == src


def test_a_version_not_newer_is_ignored_and_changes_are_listed():
    t = Twin(ORDER)
    assert t.offer("all", doc(3, telemetry_interval=30)) == ["telemetry_interval"]
    assert t.offer("all", doc(3, telemetry_interval=10)) == []
    assert t.offer("all", doc(2, telemetry_interval=10)) == []
    assert t.effective()["telemetry_interval"] == 30
    assert t.offer("all", doc(4, telemetry_interval=30, log_level="debug")) == ["log_level"]
    # A cleared retained layer: back to the defaults.
    assert sorted(t.offer("all", "")) == ["log_level", "telemetry_interval"]
    assert t.effective()["telemetry_interval"] == 60 and t.offer("all", "") == []


def test_an_older_layer_or_the_same_version_changed_is_reported_as_stale_once_per_layer():
    t = Twin(ORDER)
    t.offer("model-x", doc(3, telemetry_interval=30))
    # The same document again (a refresh re-delivers it): normal, nothing reported.
    assert t.offer("model-x", doc(3, telemetry_interval=30)) == [] and t.ignored is None
    assert "stale" not in t.reported()
    # A broker that lost its retained layer, then an operator tool starting at 1 again.
    assert t.offer("model-x", doc(1, telemetry_interval=5)) == []
    assert t.ignored == (1, 3)
    assert t.reported()["stale"] == {"model-x": {"got": 1, "have": 3}}
    # The same version with other settings will never apply either: stale too.
    t.offer("model-x", doc(3, telemetry_interval=7))
    t.offer("device", doc(0, telemetry_interval=7))  # a new layer: applies
    assert t.reported()["stale"] == {"model-x": {"got": 3, "have": 3}}
    assert t.effective()["telemetry_interval"] == 7 and t.reported()["groups"] == [
        "model-x", "model-x-v3"]
    # A newer version applies and ends the complaint.
    t.offer("model-x", doc(4, telemetry_interval=6))
    assert t.ignored is None and "stale" not in t.reported()
    assert t.reported()["versions"]["model-x"] == 4
    # Without groups, the reported document has no groups field.
    assert "groups" not in Twin(["all", "device"]).reported()


def test_invalid_documents_are_rejected_whole_and_reported():
    t = Twin(ORDER)
    t.offer("device", doc(1, telemetry_interval=7))
    bad = [
        ("not json", "{version: 2"),
        ("no version", json.dumps({"telemetry_interval": 3})),
        ("bool version", json.dumps({"version": True})),
        ("string version", json.dumps({"version": "3"})),
        ("out of range", doc(5, telemetry_interval=0)),
        ("wrong type", doc(5, telemetry_interval="fast")),
        ("bad choice", doc(5, log_level="loud")),
        ("array", "[1, 2]"),
        ("half good", doc(6, log_level="debug", telemetry_interval=-1)),
        ("huge", doc(9, log_level="debug") + " " * 3000),
        ("deep", '{"version": 9, "a": {"b": {"c": {"d": {"e": 1}}}}}'),
        ("not utf-8", b"\xff\xfe{}"),
    ]
    for what, text in bad:
        assert t.offer("device", text) == [], what
    assert t.effective()["telemetry_interval"] == 7 and t.effective()["log_level"] == "info"
    assert t.rejected == len(bad)
    rep = t.reported()
    assert len(rep["rejections"]) == 4  # the last few, bounded
    last = rep["rejections"][-1]
    assert last["layer"] == "device" and "UTF-8" in last["reason"]
    # The version of a document rejected for its values is reported; one refused for its
    # size or depth was never parsed, so its version is unknown.
    assert [r["version"] for r in rep["rejections"]] == [6, None, None, None]
    assert t.offer("somebody-else", doc(1)) == [] and t.rejected == len(bad) + 1


def test_unknown_keys_are_reported_not_applied():
    t = Twin(ORDER)
    changed = t.offer("all", doc(1, telemetry_interval=20, colour="red", reconnect={"x": 1}))
    assert changed == ["telemetry_interval"]
    assert sorted(t.reported()["unknown"]["all"]) == ["colour", "reconnect.x"]
    assert "colour" not in t.effective()


def test_size_and_depth_are_checked_before_parsing():
    check_text('{"a": "{{{{{{{{"}')  # braces inside strings do not count
    raises(Rejected, check_text, "[" * 5 + "]" * 5)
    raises(Rejected, check_text, "x" * 2049)
    e = raises(Rejected, parse_layer, '{"version": 1, "a": {"b": {"c": {"d": {}}}}}', ())
    assert "deeper" in str(e)


def test_every_declared_setting_has_a_valid_default():
    for s in settings.SETTINGS:
        assert settings.check(s[0], s[2], ()) == s[2], s


def test_cache_round_trip_corruption_and_write_only_on_change():
    path = fresh_image("cache")
    bdev, fs = open_flash(path, 262144)
    layers, why = configcache.load(fs)
    assert layers is None and why == "missing"
    t = Twin(ORDER)
    t.offer("all", doc(2, telemetry_interval=15))
    t.offer("device", doc(1, log_level="warn"))
    body = configcache.save(fs, t.snapshot())
    writes = bdev.writes
    assert configcache.save(fs, t.snapshot(), body) == body and bdev.writes == writes
    layers, why = configcache.load(fs)
    u = Twin(ORDER)
    u.restore(layers)
    assert u.effective() == t.effective() and why is None
    with fs.open(configcache.PATH, "r") as f:
        text = f.read()
    with fs.open(configcache.PATH, "w") as f:
        f.write(text.replace("15", "16"))
    layers, why = configcache.load(fs)
    assert layers is None and why.startswith("corrupt")
    with fs.open(configcache.PATH, "w") as f:
        f.write("{not json")
    assert configcache.load(fs)[1].startswith("corrupt")


def test_a_cached_layer_that_no_longer_validates_is_dropped_and_reported():
    t = Twin(ORDER)
    t.restore({"all": {"version": 3, "settings": {"telemetry_interval": 10}},
               "device": {"version": 1, "settings": {"retired_setting": 1}},
               "model-x": {"version": "x", "settings": {}}})
    assert t.effective()["telemetry_interval"] == 10
    assert set(t.layers) == {"all"} and t.rejected == 2


def test_the_size_limit_is_on_bytes_not_characters():
    text = json.dumps({"version": 1, "log_level": "info"})[:-1] + ', "x": "' + "\u20ac" * 700 + '"}'
    assert len(text) < 2048 < len(text.encode())
    e = raises(Rejected, parse_layer, text.encode(), ())
    assert "larger" in str(e)


def test_application_settings_merge_validate_and_survive_their_apps_absence():
    extra = (("app.threshold", "num", 50, 0, 100, True),
             ("app.mode", "choice", "eco", ("eco", "boost"), None, True),
             ("app.on", "bool", False, None, None, True),
             ("app.label", "str", "", None, 8, True),
             ("app.any", "num", 1, None, None, True))
    t = Twin(["all", "device"], extra=extra)
    assert t.effective()["app.threshold"] == 50
    assert t.sources()["app.mode"] == "default"
    assert set(t.offer("all", '{"version": 1, "app": {"threshold": 60, "on": true}}')) == {
        "app.threshold", "app.on"}
    assert set(t.offer("device", '{"version": 1, "app": {"label": "pump", "any": -7e9}}')) == {
        "app.label", "app.any"}
    for bad, why in (('{"threshold": 101}', "app.threshold must be in 0..100"),
                     ('{"mode": "turbo"}', "app.mode must be one of eco|boost"),
                     ('{"on": 1}', "app.on must be true or false"),
                     ('{"label": "far too long"}', "app.label must be a string of at most 8"),
                     ('{"threshold": "60"}', "app.threshold must be a number")):
        assert t.offer("device", '{"version": 2, "app": %s}' % bad) == []
        assert t.rejections[-1][2].startswith(why), t.rejections[-1]
    eff = t.effective()
    assert eff["app.threshold"] == 60 and eff["app.label"] == "pump" and eff["app.on"] is True
    # A cached layer read by a boot whose app did not start keeps its other settings.
    snap = {"device": {"version": 3, "settings": {"app.label": "x", "telemetry_interval": 7}}}
    bare = Twin(["all", "device"])
    bare.restore(snap)
    assert bare.effective()["telemetry_interval"] == 7 and bare.rejected == 0
    # ...while a firmware setting that no longer exists still drops the layer.
    bare.restore({"device": {"version": 4, "settings": {"nosuch": 1}}})
    assert bare.rejected == 1
