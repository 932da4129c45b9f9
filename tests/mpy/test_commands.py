# Commands: expiry of a request (its body's "exp"), with the clock set and not yet set.
import json

from firmware.commands import Commands
from firmware.topics import Topics


class Rig:
    def __init__(self, now):
        self.sent = []
        self.logs = []
        self.runs = []
        self.clock = now

        async def publish(topic, payload):
            self.sent.append((topic, json.loads(payload)))

        async def reboot(body):
            self.runs.append(body["id"])
            return {"rebooting": True}

        self.c = Commands(Topics("", "d1"), publish, lambda: 5000, {"reboot": reboot},
                          now=lambda: self.clock, log=lambda lvl, m: self.logs.append((lvl, m)))

    async def send(self, name, **body):
        await self.c.on_message(b"devices/d1/cmd/" + name.encode(), json.dumps(body).encode(),
                                False)
        return self.sent[-1]


async def test_an_expired_command_is_refused_counted_and_not_run():
    r = Rig(1700000100.5)
    topic, res = await r.send("reboot", id="old", exp=1700000000)
    assert topic == "devices/d1/cmd/reboot/result"
    assert res == {"id": "old", "status": "error",
                   "data": {"error": "expired", "exp": 1700000000, "now": 1700000100.5}}
    assert r.runs == [] and r.c.expired == 1 and r.c.handled == 0
    # Not remembered as done: the same id with a later expiry runs.
    _, res = await r.send("reboot", id="old", exp=1700000200)
    assert res["status"] == "ok" and r.runs == ["old"]
    _, res = await r.send("ping", id="p", exp=1700000000)
    assert res["data"]["error"] == "expired" and r.c.expired == 2
    # No expiry: runs.
    _, res = await r.send("ping", id="p2")
    assert res["status"] == "ok"


async def test_without_a_set_clock_an_expiring_command_runs_and_the_log_says_so():
    r = Rig(None)
    _, res = await r.send("reboot", id="r1", exp=1)
    assert res["status"] == "ok" and r.runs == ["r1"] and r.c.expired == 0
    assert [m for lvl, m in r.logs if lvl == "W" and "clock is not set" in m and "r1" in m]


async def test_a_bad_exp_is_a_bad_body():
    r = Rig(1700000000)
    for bad in ("soon", True, [1]):
        _, res = await r.send("reboot", id="b", exp=bad)
        assert res["status"] == "error" and "exp must be a number" in res["data"]["error"]
    assert r.runs == []


async def test_a_handler_that_raises_answers_an_error_and_is_counted():
    r = Rig(None)

    async def broken(body):
        raise ValueError("relay stuck")

    r.c.handlers["relay"] = broken
    r.c.durable += ("relay",)
    _, res = await r.send("relay", id="a", on=True)
    assert res == {"id": "a", "status": "error", "data": {"error": "relay stuck"}}
    assert r.c.errors == 1 and r.logs[-1][0] == "E"
    # Run once: the id is done even though it failed (its effect may have begun).
    _, res = await r.send("relay", id="a", on=True)
    assert res["data"] == {"duplicate": True} and r.c.errors == 1
