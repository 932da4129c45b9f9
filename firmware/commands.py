# Commands sent to one device on {prefix}devices/{id}/cmd/{name}: a JSON body with a request
# id; the answer goes to .../cmd/{name}/result with the same id, a status and data.
# `ping` is built in; the device adds the others (reboot, refresh-config, report) as
# handlers. An unknown command or a bad body gets an error result, never a crash.
#
# A request id already executed is answered as a duplicate and not run again: MQTT's DUP
# check covers one connection, this covers a reboot in between (a `reboot` whose PUBACK
# never left is redelivered to the next boot). The last ids are kept on flash.
#
# A body may carry `exp`, Unix time in seconds after which the command must not run: a broker
# may hand a new subscriber old messages (ActiveMQ), and yesterday's `reboot` must not run on
# a fresh device. An expired command is answered with an error and counted. A device whose
# clock is not set yet (a board before its first SNTP answer) cannot tell: it runs the
# command and says so in the log.
import json

from firmware.bootlog import write_atomic
from firmware.twin import loads

DONE_PATH = "/cmd-done.json"
_KEEP = 16


class Commands:
    # Class attributes, so a device pays for them only once it has an error or an app:
    errors = 0  # handlers that raised: answered with an error
    # Commands whose ids are remembered on flash: a reboot, and the application's (whose
    # effects the firmware cannot know); the others' for this boot only.
    durable = ("reboot",)

    def __init__(self, topics, publish, uptime_ms, handlers=None, fs=None, now=None, log=None):
        self.topics = topics
        self.publish = publish  # async fn(topic, payload) -> QoS 1, not retained
        self.uptime_ms = uptime_ms
        self.handlers = handlers or {}  # name -> async fn(body) -> result data
        self.fs = fs
        self.now = now  # fn() -> Unix time in s, or None while the clock is not set
        self.log = log  # fn(level, message)
        self.expired = 0
        self.handled = 0
        self.rejected = 0
        self.duplicates = 0
        self.done = self._load()  # "name/id" of the last requests executed, oldest first

    def _load(self):
        if self.fs is None:
            return []
        try:
            with self.fs.open(DONE_PATH, "r") as f:
                done = json.loads(f.read())
            return [d for d in done if isinstance(d, str)][-_KEEP:]
        except (OSError, ValueError, TypeError):
            return []

    def _remember(self, key, persist):
        self.done.append(key)
        if len(self.done) > _KEEP:
            self.done.pop(0)
        if persist and self.fs is not None:
            try:
                write_atomic(self.fs, DONE_PATH, json.dumps(self.done))
            except OSError:
                pass  # dedup then holds for this boot only

    async def on_message(self, topic, payload, retain):
        name = bytes(topic).decode().rsplit("/", 1)[-1]
        if len(name) > 32:  # no command is named so; its result topic might not fit a frame
            self.rejected += 1
            return
        try:
            # Size, nesting and characters checked before parsing, as for desired layers.
            body = loads(payload)
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            rid = body.get("id")
            # Echoed and remembered (16 of them): short, a string or an integer.
            if rid is not None and (type(rid) not in (str, int) or len(str(rid)) > 64):
                raise ValueError("id must be a string or an integer of at most 64 characters")
            exp = body.get("exp")
            if exp is not None and (isinstance(exp, bool) or not isinstance(exp, (int, float))):
                raise ValueError("exp must be a number (Unix time in seconds)")
        except ValueError as e:
            self.rejected += 1
            await self._answer(name, None, "error", {"error": "bad body: %s" % e})
            return
        if exp is not None:
            now = self.now() if self.now else None
            if now is None:
                if self.log:
                    self.log("W", "command %s (id %s) has an expiry but the clock is not set: "
                                  "run without checking it" % (name, rid))
            elif now > exp:
                self.expired += 1
                self.rejected += 1  # not run: also where health counts refusals today
                await self._answer(name, rid, "error",
                                   {"error": "expired", "exp": exp, "now": now})
                return
        key = "%s/%s" % (name, rid)
        if rid is not None and key in self.done:
            self.duplicates += 1
            await self._answer(name, rid, "ok", {"duplicate": True})
            return
        if name == "ping":
            self.handled += 1
            await self._answer(name, rid, "ok", {"up": self.uptime_ms() // 1000})
        elif name in self.handlers:
            self.handled += 1
            if rid is not None:
                # Remembered (on flash for commands with effects beyond this boot) before
                # it runs: a reboot must find it done when it is redelivered.
                self._remember(key, name in self.durable)
            try:
                data = await self.handlers[name](body)
            except Exception as e:
                # A handler's failure is the requester's answer, never the connection's.
                self.errors += 1
                if self.log:
                    self.log("E", "command %s (id %s) failed: %r" % (name, rid, e))
                await self._answer(name, rid, "error", {"error": str(e)[:120] or repr(e)[:120]})
                return
            await self._answer(name, rid, "ok", data)
        else:
            self.rejected += 1
            await self._answer(name, rid, "error", {"error": "unknown command"})

    async def _answer(self, name, rid, status, data):
        await self.publish(
            self.topics.cmd_result(name), json.dumps({"id": rid, "status": status, "data": data})
        )
