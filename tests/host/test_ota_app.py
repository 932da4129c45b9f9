"""Updates of the application (README "Writing your application"): a release of the same
firmware with a new app/ (tools/bundle.py --app) moves a device to the new app, and a new
app that does not start, or whose sensors only fail, is rolled back to the previous one."""
import os

from testbed.devices import Spec
from tests.host.test_ota import births, ota_device, releases, request, state_of  # noqa: F401


def app_source(tmp_path, name, body):
    d = tmp_path / "apps" / name
    d.mkdir(parents=True)
    (d / "__init__.py").write_text(body)
    return str(d)


def _version_app(tmp_path, n):
    return app_source(tmp_path, "v%d" % n, "def setup(dev):\n"
                                             "    dev.sensor('app_version', lambda: %d)\n" % n)


def _app_versions(observer, dev):
    return [t.get("app_version") for t in observer.json("devices/%s/telemetry" % dev)]


def test_an_app_only_update_moves_and_a_broken_app_is_rolled_back(fleet, observer, tmp_path,
                                                                  releases):
    spec = ota_device(fleet, tmp_path, "a1", releases)
    p = fleet.start(Spec(spec.image, config=spec.config, control=spec.control,
                         app=_version_app(tmp_path, 1)), restart=True)
    observer.wait(lambda m: 1 in _app_versions(observer, "a1"), 20, "app 1 running")
    # The same firmware, a new app.
    v2 = releases.build("v2", 2, app=_version_app(tmp_path, 2))
    assert os.listdir(tmp_path / "srv" / "v2" / "files" / "app") == ["__init__.mpy"]
    request(observer, v2, reboot="now")
    state_of(observer, "a1", "confirmed", 2, p)
    observer.wait(lambda m: 2 in _app_versions(observer, "a1"), 20, "app 2 running")
    # A new app whose setup raises: the trial gives up at once, back to app 2.
    bad = app_source(tmp_path, "v3", "def setup(dev):\n    raise RuntimeError('v3 app broken')\n")
    request(observer, releases.build("v3", 3, app=bad), version=2, reboot="now")
    st = state_of(observer, "a1", "rolled_back", 3, p)
    assert "the app did not start" in st["reason"] and "v3 app broken" in st["reason"], st
    b = len(births(observer, "a1"))
    observer.wait(lambda m: [x for x in births(observer, "a1")[b - 1:] if x["fw"] == "2.0.0"],
                  30, "online on 2.0.0 again")
    n = len(_app_versions(observer, "a1"))
    observer.wait(lambda m: 2 in _app_versions(observer, "a1")[n:], 30, "app 2 again")
    # A new app whose every sensor fails: rolled back too.
    dead = app_source(tmp_path, "v4", "def bad():\n    raise OSError(19)\n"
                                       "def setup(dev):\n"
                                       "    dev.sensor('app_version', bad)\n"
                                       "    dev.sensor('other', bad)\n")
    request(observer, releases.build("v4", 4, app=dead), version=3, reboot="now")
    st = state_of(observer, "a1", "rolled_back", 4, p)
    assert "every app sensor failed" in st["reason"], st
    b = len(births(observer, "a1"))
    observer.wait(lambda m: [x for x in births(observer, "a1")[b - 1:] if x["fw"] == "2.0.0"],
                  30, "online on 2.0.0 again")
    n = len(_app_versions(observer, "a1"))
    observer.wait(lambda m: 2 in _app_versions(observer, "a1")[n:], 30, "app 2 once more")
