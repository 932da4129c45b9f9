# Commands sent to one device on {prefix}devices/{id}/cmd/{name}: a JSON body with a request
# id; the answer goes to .../cmd/{name}/result with the same id, a status and data.
# `ping` is built in; the device adds the others (refresh-config, report) as handlers. An
# unknown command or a bad body gets an error result, never a crash.
import json


class Commands:
    def __init__(self, topics, publish, uptime_ms, handlers=None):
        self.topics = topics
        self.publish = publish  # async fn(topic, payload) -> QoS 1, not retained
        self.uptime_ms = uptime_ms
        self.handlers = handlers or {}  # name -> async fn(body) -> result data
        self.handled = 0
        self.rejected = 0

    async def on_message(self, topic, payload, retain):
        name = bytes(topic).decode().rsplit("/", 1)[-1]
        try:
            body = json.loads(bytes(payload))
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            rid = body.get("id")
        except ValueError as e:
            self.rejected += 1
            await self._answer(name, None, "error", {"error": "bad body: %s" % e})
            return
        if name == "ping":
            self.handled += 1
            await self._answer(name, rid, "ok", {"up": self.uptime_ms() // 1000})
        elif name in self.handlers:
            self.handled += 1
            await self._answer(name, rid, "ok", await self.handlers[name](body))
        else:
            self.rejected += 1
            await self._answer(name, rid, "error", {"error": "unknown command"})

    async def _answer(self, name, rid, status, data):
        await self.publish(
            self.topics.cmd_result(name), json.dumps({"id": rid, "status": status, "data": data})
        )
