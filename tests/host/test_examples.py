"""The example applications on real Unix-port devices against mosquitto, with the Unix
board's simulated SHT3x and pins (firmware/boards/unixhw.py) driven through the control
file: the same code a board runs."""
import json
import os

from testbed.devices import ROOT, Spec

EXAMPLES = os.path.join(ROOT, "examples")


def _device(fleet, tmp_path, dev, app, **over):
    ctl = tmp_path / (dev + ".ctl")
    ctl.write_text("")
    cfg = fleet.config(dev, **over)
    p = fleet.start(Spec(str(tmp_path / (dev + ".img")), config=cfg, control=str(ctl),
                         app=app))
    return p, ctl


def _events(observer, dev, name):
    return [e["data"] for e in observer.json("devices/%s/event/%s" % (dev, name))]


def _state(observer, dev):
    docs = observer.json("devices/%s/state" % dev)
    return docs[-1]["state"] if docs else {}


def _cmd(observer, dev, name, body):
    observer.publish("devices/%s/cmd/%s" % (dev, name), json.dumps(body))

    def got(_):
        return [r for r in observer.json("devices/%s/cmd/%s/result" % (dev, name))
                if r["id"] == body["id"]]
    return observer.wait(got, 15, "result of %s" % name)[-1]


def test_env_sensor_reports_and_alarms_with_hysteresis(fleet, observer, tmp_path):
    p, ctl = _device(fleet, tmp_path, "env1", os.path.join(EXAMPLES, "env_sensor"),
                     telemetry_interval=0.3, health_interval=5)
    first = observer.wait(lambda m: [t for t in observer.json("devices/env1/telemetry")
                                     if "env" in t], 20, "env in telemetry")[0]
    assert abs(first["env"]["temp_c"] - 21.5) < 0.05 and abs(first["env"]["rh"] - 45) < 0.05
    observer.wait(lambda m: _state(observer, "env1") == {"env_alarm": False}, 10, "state")
    ctl.write_text("sht3x_temp=35")
    ev = observer.wait(lambda m: _events(observer, "env1", "threshold"), 15, "above")
    assert ev == [{"state": "above", "temp_c": 35.0, "threshold": 30}]
    observer.wait(lambda m: _state(observer, "env1") == {"env_alarm": True}, 10, "alarm on")
    # Within the hysteresis (1): still above, nothing fires.
    ctl.write_text("sht3x_temp=29.5")
    n = len(observer.json("devices/env1/telemetry"))
    observer.wait(lambda m: [t for t in observer.json("devices/env1/telemetry")[n:]
                             if t.get("env", {}).get("temp_c") == 29.5][2:], 15, "29.5 read")
    assert len(_events(observer, "env1", "threshold")) == 1
    ctl.write_text("sht3x_temp=28.5")
    ev = observer.wait(lambda m: _events(observer, "env1", "threshold")[1:], 15, "below")
    assert ev == [{"state": "below", "temp_c": 28.5, "threshold": 30}]
    # The operator moves the threshold: from the next sample on.
    observer.publish("devices/env1/config/desired",
                     json.dumps({"version": 2, "app": {"threshold": 25}}), retain=True)
    ev = observer.wait(lambda m: _events(observer, "env1", "threshold")[2:], 15, "above 25")
    assert ev == [{"state": "above", "temp_c": 28.5, "threshold": 25}]
    # A failing bus: env is left out and counted; the device goes on.
    ctl.write_text("sht3x_temp=28.5 i2c-fail")
    n = len(observer.json("devices/env1/telemetry"))
    observer.wait(lambda m: len([t for t in observer.json("devices/env1/telemetry")[n:]
                                 if "env" not in t]) >= 3, 15, "telemetry without env")

    def failing(_):
        for h in observer.json("devices/env1/health"):
            s = h.get("app", {}).get("sensors", {}).get("env", {})
            if s.get("errors", 0) >= 2:
                return s
        return None
    s = observer.wait(failing, 30, "the counted errors")
    assert "OSError" in s["last_error"]
    assert not p.resets


def test_relay_command_state_and_safety_timer(fleet, observer, tmp_path):
    p, ctl = _device(fleet, tmp_path, "rl1", os.path.join(EXAMPLES, "relay"))
    p.wait_line(r"rl1 I connected", 15)
    observer.wait(lambda m: _state(observer, "rl1").get("relay", {}).get("on") is False, 10,
                  "relay off at boot")
    r = _cmd(observer, "rl1", "relay", {"id": "1", "on": True})
    assert r == {"id": "1", "status": "ok", "data": {"on": True}}
    observer.wait(lambda m: _state(observer, "rl1")["relay"]["on"] is True, 10, "relay on")
    r = _cmd(observer, "rl1", "relay", {"id": "2", "on": 1})
    assert r["status"] == "error" and '{"on": true}' in r["data"]["error"]
    # The safety limit, lowered live: the timer task switches it off and says so.
    observer.publish("devices/rl1/config/desired",
                     json.dumps({"version": 2, "app": {"max_on_s": 1}}), retain=True)
    ev = observer.wait(lambda m: _events(observer, "rl1", "relay_timeout"), 15, "timeout")
    assert ev[0]["max_on_s"] == 1 and ev[0]["on_s"] >= 1
    observer.wait(lambda m: _state(observer, "rl1")["relay"]["on"] is False, 10, "relay off")
    p.wait_line(r"rl1 W app: relay off after \d+ ms on", 5)


def test_the_minimal_app_answers_its_command(fleet, observer, tmp_path):
    p, _ = _device(fleet, tmp_path, "m1", os.path.join(ROOT, "app"), telemetry_interval=0.5)
    p.wait_line(r"m1 I connected", 15)
    observer.publish("devices/m1/config/desired",
                     json.dumps({"version": 2, "app": {"greeting": "hi"}}), retain=True)
    observer.wait(lambda m: [r for r in observer.json("devices/m1/config/reported")
                             if r["effective"].get("app.greeting") == "hi"], 15, "greeting")
    r = _cmd(observer, "m1", "hello", {"id": "h", "name": "ops"})
    assert r["data"] == {"text": "hi, ops"}
    observer.wait(lambda m: [t for t in observer.json("devices/m1/telemetry")
                             if t.get("hellos") == 1], 15, "hellos counted")
