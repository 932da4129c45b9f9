"""fleetctl: the operator's command line for a fleet of these devices (host-side, CPython).

Talks to the broker with paho-mqtt, using only the topic contract of README "Topic contract":
watch what devices publish (tail), run a device command and wait for its answer (cmd),
change a desired config layer after checking it against the firmware's declared settings
(set), show a device's effective config (config), list devices from their retained status
and recent health (status), and roll out an over-the-air update (ota push) and follow it
(ota status).

    python tools/fleetctl.py [--broker HOST:PORT] [--user U] [--prefix P] [--timeout S] \
        {tail,cmd,set,config,status,ota} ...

A rollout, canary group first (OTA_HELP below, `fleetctl.py ota --help`); push publishes
only once --url serves the bundle's manifest.json and manifest.sig (--no-url-check: anyway):

    fleetctl.py ota push --group canary --bundle out/b2 --url http://files:8080/b2/ --pub rel.pub
    fleetctl.py ota status --group canary        # until every canary is confirmed
    fleetctl.py ota push --group all --bundle out/b2 --url http://files:8080/b2/ --pub rel.pub

Exit codes are listed in EPILOG (shown by --help) and are meant for scripts.
"""
import argparse
import fnmatch
import hashlib
import http.client
import json
import os
import queue
import re
import secrets
import socket
import ssl
import sys
import textwrap
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The firmware's own declared settings and document checks, imported rather than copied:
# they are plain Python that runs unchanged in CPython, so what fleetctl accepts is exactly
# what a device of this firmware revision accepts.
from firmware import settings, twin  # noqa: E402

OK, DEVICE_ERROR, INVALID, TIMEOUT, BROKER, URL_CHECK = 0, 1, 2, 3, 4, 5
INTERRUPTED = 130

EPILOG = """\
exit codes:
  0    done (cmd: the device answered "ok"; tail: --count messages printed or Ctrl-C)
  1    cmd: the device answered with status "error" (e.g. an unknown command, expired);
       set: a device ignored the layer as not newer than its own (stale) or rejected it
  2    bad arguments, or a desired document refused by validation (nothing was published)
  3    timeout: no command result within --timeout, tail --duration ended before --count,
       set: an online device did not report the layer within --wait, or config: no
       config/reported retained for the device
  4    broker problem: unreachable, connection or subscription refused, connection lost
  5    ota push: the bundle is not served as it is at --url (unreachable, HTTP error, another
       manifest.json or manifest.sig); nothing was published (--no-url-check skips it)
  130  interrupted (Ctrl-C) other than in tail

The password is taken from --password or, better (not visible in ps), $FLEETCTL_PASSWORD.

examples:
  fleetctl.py tail 'pump-*' --kind telemetry --count 10
  fleetctl.py tail 'pump-*' --kind event,state
  fleetctl.py cmd pump-0042 logs --body '{"n": 5}'
  fleetctl.py set --group model-x telemetry_interval=30 reconnect.cap=300
  fleetctl.py set --device pump-0042 app.threshold=60
  fleetctl.py config pump-0042 'app.*'
  fleetctl.py status 'pump-*' --wait 3
  fleetctl.py ota push --group canary --bundle out/b2 --url http://files:8080/b2/
  fleetctl.py ota status --group canary
"""

OTA_HELP = """\
an update rollout, step by step:
  1. build and sign the bundle, and serve its directory over HTTP (upload it first: push
     fetches URL/manifest.json and URL/manifest.sig and refuses to publish unless they are
     the bundle's own):
       tools/bundle.py build --out out/b2 --version 2 --name 2.0.0
       tools/bundle.py sign --bundle out/b2 --key secrets/ota/release.pem
  2. ask a small canary group first (devices with `canary` among their bootstrap groups):
       fleetctl.py ota push --group canary --bundle out/b2 --url http://files:8080/b2/ \\
           --pub secrets/ota/release.pub
  3. watch it until every canary is confirmed (devices download at a random moment within
     --window, switch, and confirm themselves or roll back):
       fleetctl.py ota status --group canary
     failed (refused before any switch: signature, hash, ABI, older version, size) and
     rolled_back devices are listed with their reasons: stop there and find out why.
  4. then the whole fleet (devices already running version 2 just report confirmed):
       fleetctl.py ota push --group all --bundle out/b2 --url http://files:8080/b2/ \\
           --pub secrets/ota/release.pub
       fleetctl.py ota status
"""

# What devices publish that tail and status read: devices/{id}/{kind}, and for events
# devices/{id}/event/{name} (README "Topic contract"; events and state come from the app).
KINDS = ("telemetry", "status", "health", "event", "state")
# An app setting's name: app settings are the app's own, not declared in firmware/settings.py,
# so fleetctl checks the name and the kind of value and the device checks the rest (it
# reports a rejection in config/reported).
APP_NAME_RE = re.compile(r"^app\.[a-z_][a-z0-9_]{0,31}$")
# Device ids and group names as the bootstrap config allows them: they become topic levels,
# so anything else could address another device's topics or a wildcard. No ".": RabbitMQ's
# MQTT plugin delivers it as "/", so such a device or group would not work on every broker.
NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
# Command expiry (the body's "exp"): a broker may hand a new subscriber old messages.
DEFAULT_EXPIRY_S = 300
# First version of a layer no version was found for: seconds since 2025-01-01 UTC. A layer
# the broker lost (and devices still run from their cache) thus starts above every version
# it had, unless it changed more than once a second on average; below 2^30 until 2059, a
# small int on a 32-bit MicroPython board.
VERSION_EPOCH = 1735689600
GLOB_CHARS = set("*?[")


class Fail(Exception):
    """Ends the run: one line on stderr and the exit code."""

    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code


# ---- broker session ----------------------------------------------------------------------


# --protocol auto: how long MQTT 5 is given to answer before 3.1.1 is tried (a 3.1.1-only
# broker may not answer a 5 CONNECT at all: amqtt waits for the rest of it).
V5_WAIT_S = 3.0


class Session:
    """One clean MQTT session: blocking connect, subscribe and publish that wait for the
    broker's acknowledgement, and the received messages in a queue for the main thread.
    MQTT 5 where the broker speaks it (--protocol auto), else 3.1.1."""

    def __init__(self, args):
        self.args = args
        self.host, self.port = parse_hostport(args.broker)
        self.prefix = args.prefix
        self.timeout = args.timeout
        proto = getattr(args, "protocol", "auto")
        self.v5 = proto != "3.1.1"
        self.auto = proto == "auto"
        self.client_id = "fleetctl-%d-%s" % (os.getpid(), secrets.token_hex(3))
        self.msgs = queue.Queue()
        self.cond = threading.Condition()
        self.connack = None
        self.subacks = {}
        self.lost = False
        self.c = self._client()

    def _client(self):
        args = self.args
        if self.v5:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                            protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                            clean_session=True)
        if args.user is not None:
            c.username_pw_set(args.user, args.password)
        c.connect_timeout = self.timeout
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = lambda cl, u, m: self.msgs.put((time.time(), m.topic, m.payload, m.retain))
        return c

    def __enter__(self):
        where = "%s:%d" % (self.host, self.port)
        try:
            self.c.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as e:  # refused, DNS, timeout, unreachable
            raise Fail(BROKER, "cannot reach broker %s: %s" % (where, _reason(e)))
        self.c.loop_start()
        wait = min(V5_WAIT_S, self.timeout) if self.auto else self.timeout
        with self.cond:
            answered = self.cond.wait_for(lambda: self.connack is not None or self.lost, wait)
        if self.auto and (not answered or self.lost or (
                self.connack is not None and self.connack.value in (1, 0x84))):
            # Not understood (refused as a bad protocol version, closed, or silence): the
            # same session in 3.1.1, once.
            self.close()
            self.v5 = self.auto = False
            self.connack = None
            self.lost = False
            self.c = self._client()
            return self.__enter__()
        if not answered:
            self.close()
            raise Fail(BROKER, "no answer from broker %s within %g s" % (where, self.timeout))
        if self.connack is None or self.connack.is_failure:
            self.close()
            raise Fail(BROKER, "broker %s refused the connection: %s" % (where, self.connack))
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.lost = False  # ours: not a loss
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connack = reason_code
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        # paho would reconnect by itself, but a new clean session would have lost our
        # subscriptions: the run stops instead (exit 4) and the operator runs it again.
        with self.cond:
            self.lost = True
            self.cond.notify_all()
        self.msgs.put(None)  # wakes a waiting get()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks[mid] = reason_codes
            self.cond.notify_all()

    def _check(self):
        if self.lost:
            raise Fail(BROKER, "lost the connection to the broker")

    def subscribe(self, filters):
        rc, mid = self.c.subscribe([(f, 1) for f in filters])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise Fail(BROKER, "subscribe failed: %s" % mqtt.error_string(rc))
        with self.cond:
            self.cond.wait_for(lambda: mid in self.subacks or self.lost, self.timeout)
            codes = self.subacks.get(mid)
        self._check()
        if codes is None:
            raise Fail(BROKER, "no SUBACK from the broker within %g s" % self.timeout)
        for f, code in zip(filters, codes):
            if code.is_failure:  # mosquitto's answer to a filter an ACL forbids
                raise Fail(BROKER, "broker refused the subscription to %s: %s" % (f, code))

    def publish(self, topic, payload, retain=False, expiry=None):
        """QoS 1, waiting for the PUBACK. expiry: seconds after which a 5 broker drops the
        message if nobody collected it (Message Expiry Interval; ignored on 3.1.1)."""
        props = None
        if expiry and self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry)
        info = self.c.publish(topic, payload, 1, retain, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise Fail(BROKER, "publish to %s failed: %s" % (topic, mqtt.error_string(info.rc)))
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as e:
            raise Fail(BROKER, "publish to %s failed: %s" % (topic, e))
        self._check()
        if not info.is_published():
            raise Fail(BROKER, "no PUBACK from the broker for %s within %g s"
                       % (topic, self.timeout))

    def get(self, deadline):
        """The next message (time, topic, payload, retain), or None once `deadline`
        (time.monotonic(); None: never) has passed."""
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                # Bounded waits: a blocking get() without a timeout would delay Ctrl-C.
                m = self.msgs.get(timeout=0.5 if left is None else min(left, 0.5))
            except queue.Empty:
                self._check()
                continue
            self._check()
            if m is not None:
                return m

    def retained(self, filters, wait):
        """The retained messages on `filters`: {topic: payload}. A marker we publish to
        ourselves after subscribing comes back after every retained message the broker
        queued for those subscriptions, so no fixed wait has to be guessed; `wait` bounds
        it when an ACL keeps the marker from us."""
        marker = "%sfleetctl/%s/sync" % (self.prefix, self.client_id)
        self.subscribe(list(filters) + [marker])
        token = secrets.token_hex(8).encode()
        self.publish(marker, token)
        got = {}
        deadline = time.monotonic() + wait
        while True:
            m = self.get(deadline)
            if m is None or (m[1] == marker and m[2] == token):
                return got
            if m[3] and m[1] != marker:
                got[m[1]] = m[2]


def _reason(e):
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def parse_hostport(text):
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 1883
    host = host.strip("[]")  # [::1]:1883
    try:
        port = int(port)
    except ValueError:
        raise Fail(INVALID, "--broker must be HOST:PORT, not %r" % text)
    return host or "127.0.0.1", port


# ---- topics ----------------------------------------------------------------------------------


def check_name(what, name):
    if not NAME_RE.match(name):
        why = ""
        if "." in name:
            why = " ('.' is not portable across brokers: RabbitMQ delivers it as '/')"
        raise Fail(INVALID, "%s must be 1 to 64 characters of A-Z a-z 0-9 - _, not %r%s"
                   % (what, name, why))
    return name


def is_pattern(text):
    return bool(GLOB_CHARS & set(text))


def device_of(prefix, topic):
    """(device id, kind, event name) of a devices/{id}/{kind} topic under the prefix (event
    name None), or of devices/{id}/event/{name}; else None."""
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix):].split("/")
    if parts[0] != "devices":
        return None
    if len(parts) == 3:
        return parts[1], parts[2], None
    if len(parts) == 4 and parts[2] == "event":
        return parts[1], "event", parts[3]
    return None


def kind_filters(prefix, level, kinds):
    """Subscription filters of those kinds for `level` (a device id or +)."""
    return ["%sdevices/%s/%s" % (prefix, level, "event/+" if k == "event" else k)
            for k in kinds]


def target_filter(target):
    """(topic level to subscribe to, fn(id) -> bool) for a device id or a glob pattern.
    A pattern is subscribed to with `+` and matched here: MQTT has no partial wildcards."""
    if is_pattern(target):
        if "/" in target or "#" in target or "+" in target:
            raise Fail(INVALID, "a pattern matches device ids and cannot hold / + #: %r" % target)
        return "+", lambda i: fnmatch.fnmatchcase(i, target)
    check_name("device id", target)
    return target, lambda i: i == target


def _json(payload):
    try:
        return json.loads(payload)
    except ValueError:
        return None


# ---- tail ------------------------------------------------------------------------------------


def event_text(payload):
    """An event's body as tail prints it: "boot=B seq=N DATA" (DATA as JSON), or None when
    the payload is not an event document (then it is printed as it came)."""
    doc = _json(payload)
    if not isinstance(doc, dict) or "data" not in doc or "seq" not in doc:
        return None
    return "boot=%s seq=%s %s" % (_cell(doc.get("boot")), _cell(doc.get("seq")),
                                  json.dumps(doc["data"]))


def cmd_tail(args):
    kinds = [k.strip() for k in args.kind.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise Fail(INVALID, "--kind takes a comma-separated list of %s" % ",".join(KINDS))
    level, match = target_filter(args.target)
    printed = 0
    deadline = time.monotonic() + args.duration if args.duration else None
    with Session(args) as s:
        s.subscribe(kind_filters(args.prefix, level, kinds))
        while args.count is None or printed < args.count:
            m = s.get(deadline)
            if m is None:
                break
            t, topic, payload, retain = m
            dk = device_of(args.prefix, topic)
            # Retained status is old news (use `status`); shown only when asked for.
            if dk is None or not match(dk[0]) or (retain and not args.retained):
                continue
            text = payload.decode("utf-8", "replace")
            if args.json:
                data = _json(payload)
                doc = {"t": round(t, 3), "device": dk[0], "kind": dk[1]}
                if dk[1] == "event":
                    doc["event"] = dk[2]
                doc.update({"retained": retain, "data": text if data is None else data})
                line = json.dumps(doc)
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(t)) + ".%03d" % (t % 1 * 1000)
                kind, body = dk[1], text
                if kind == "event":  # event NAME boot=B seq=N DATA
                    kind, body = "event " + dk[2], event_text(payload) or text
                line = "%s %s %s%s %s" % (stamp, dk[0], kind, " (retained)" if retain else "",
                                           body)
            print(line, flush=True)
            printed += 1
    if args.count is not None and printed < args.count:
        raise Fail(TIMEOUT, "%d of %d messages within --duration %g s"
                   % (printed, args.count, args.duration))
    return OK


# ---- cmd -------------------------------------------------------------------------------------


def cmd_cmd(args):
    check_name("device id", args.device)
    if not args.name or set("/+#\0") & set(args.name):
        raise Fail(INVALID, "a command name is one topic level, without / + #: %r" % args.name)
    body = {}
    if args.body is not None:
        body = _json(args.body.encode())
        if not isinstance(body, dict):
            raise Fail(INVALID, "--body must be a JSON object, e.g. '{\"n\": 5}'")
    # The device answers a request id it already ran as a duplicate without running it
    # again, so an operator retrying after a timeout passes the same id in --body.
    rid = body.setdefault("id", "fleetctl-" + secrets.token_hex(6))
    # An expiry, so that a broker handing the command over late (to a device that was away
    # for a day, or to a new subscriber: ActiveMQ) does not run it then.
    if "exp" not in body and args.expires > 0:
        body["exp"] = int(time.time() + args.expires)
    wait = args.cmd_timeout if args.cmd_timeout is not None else args.timeout
    base = "%sdevices/%s/" % (args.prefix, args.device)
    topic = base + "cmd/" + args.name
    state = None
    with Session(args) as s:
        # Subscribed before publishing: a fast answer must not be missed.
        s.subscribe([topic + "/result", base + "status"])
        # The broker drops it once expired too (MQTT 5): a device that comes back later
        # never gets it; one that does still checks "exp" (a 3.1.1 broker keeps it).
        s.publish(topic, json.dumps(body), expiry=args.expires if args.expires > 0 else None)
        deadline = time.monotonic() + wait
        while True:
            m = s.get(deadline)
            if m is None:
                break
            doc = _json(m[2])
            if not isinstance(doc, dict):
                continue
            if m[1] == base + "status":
                state = doc.get("state")
            elif doc.get("id") == rid:
                print(json.dumps(doc), flush=True)
                return OK if doc.get("status") == "ok" else DEVICE_ERROR
    note = " (its retained status says %s)" % state if state else ""
    raise Fail(TIMEOUT, "no result from %s for %s (id %s) within %g s%s; the broker may still "
               "deliver the command when the device reconnects: to retry without running it "
               "twice, pass the same id: --body '{\"id\": \"%s\"}'"
               % (args.device, args.name, rid, wait, note, rid))


# ---- set -------------------------------------------------------------------------------------


def flatten(doc, prefix="", out=None):
    """{dotted name: value} of a desired document without its version (nested objects are
    dotted names, as the firmware's twin reads them; an object that is itself a setting,
    like ota, stays whole; the app's settings are app.NAME)."""
    out = {} if out is None else out
    for k, v in doc.items():
        if not prefix and k == "version":
            continue
        if isinstance(v, dict) and (prefix + k == "app" or settings.find(prefix + k, ()) is None):
            flatten(v, prefix + k + ".", out)
        else:
            out[prefix + k] = v
    return out


def nest(flat):
    doc = {}
    for name in sorted(flat):
        parts = name.split(".")
        d = doc
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = flat[name]
    return doc


def validate(flat, what, hint=""):
    """Every problem of a layer's settings at once, as the operator must fix them all. The
    device would apply a layer with unknown keys minus those keys; here they are refused,
    since they are typos or settings this firmware does not have."""
    errors = []
    for name in sorted(flat):
        if name.startswith("app."):
            why = check_app(name, flat[name])
            if why:
                errors.append(why)
            continue
        if settings.find(name, ()) is None:
            errors.append("%s: not a setting of this firmware" % name)
            continue
        try:
            settings.check(name, flat[name], ())
        except ValueError as e:
            errors.append(str(e))
    if errors:
        known = ", ".join([s[0] for s in settings.SETTINGS] + ["app.NAME"])
        raise Fail(INVALID, "%s refused, nothing published:\n  %s\n(settings: %s)%s"
                   % (what, "\n  ".join(errors), known, hint))


def check_app(name, value):
    """Why an app setting cannot be published, or None. The app declares its settings on the
    device, so only the name and the kind of value are checked here; the device checks the
    rest and reports a rejection in config/reported (fleetctl set says so)."""
    if not APP_NAME_RE.match(name):
        return "%s: an app setting is app.NAME, NAME 1 to 32 characters of a-z 0-9 _ not " \
               "starting with a digit" % name
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        return "%s must be a finite number" % name
    if not isinstance(value, (bool, int, float, str)):
        return "%s must be a number, true, false or a string" % name
    return None


def parse_assignments(items):
    """KEY=VALUE -> {key: value}; VALUE is JSON when it parses (7, 2.5, true, "x"), else a
    string (log_level=warn); an empty VALUE (KEY=) or null removes KEY from the layer (None)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Fail(INVALID, "expected KEY=VALUE, got %r" % item)
        if value == "":
            out[key] = None
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def current_version(payload, where):
    """Version of a retained desired document, 0 if there is none; (version, flat or None
    when it cannot be read)."""
    if not payload:
        return 0, {}
    doc = _json(payload)
    if not isinstance(doc, dict):
        print("fleetctl: warning: the current document on %s is not a JSON object" % where,
              file=sys.stderr)
        return 0, None
    v = doc.get("version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        print("fleetctl: warning: the current document on %s has no valid version" % where,
              file=sys.stderr)
        v = 0
    return v, flatten(doc)


def desired_topic(args):
    """The desired layer --device ID or --group G names."""
    if args.device:
        check_name("device id", args.device)
        return "%sdevices/%s/config/desired" % (args.prefix, args.device)
    check_name("group", args.group)
    return "%sfleet/%s/config/desired" % (args.prefix, args.group)


def cmd_set(args):
    topic = desired_topic(args)
    if bool(args.file) == bool(args.assignments):
        raise Fail(INVALID, "give either KEY=VALUE... or --file")
    if args.file:
        try:
            with (sys.stdin if args.file == "-" else open(args.file)) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise Fail(INVALID, "cannot read %s: %s" % (args.file, e))
        if not isinstance(doc, dict):
            raise Fail(INVALID, "%s: a desired document is a JSON object" % args.file)
        change = flatten(doc)
        if "version" in doc:
            print("fleetctl: note: the file's version is ignored; the next version is used",
                  file=sys.stderr)
    else:
        change = parse_assignments(args.assignments)
    # Checked before any connection: a refused change publishes nothing.
    validate({k: v for k, v in change.items() if v is not None}, "desired settings")
    return publish_layer(args, topic, change, bool(args.file or args.replace),
                         "\nremove a key of the current layer with KEY=, or start afresh with "
                         "--replace", wait=args.wait)[1]


def _int(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def layer_name(args):
    """The layer's name in the devices' config/reported documents."""
    return "device" if args.device else args.group


def layer_view(rep, layer):
    """What a config/reported document says about `layer`: (member, versions seen) where
    member says the device takes that layer (its bootstrap groups, or a version of it
    applied, ignored or rejected) and versions are those it applied or was offered."""
    if not isinstance(rep, dict):
        return False, []
    seen = []
    member = layer in ("all", "device")
    vs = rep.get("versions")
    if isinstance(vs, dict) and layer in vs:
        member = True
        seen.append(_int(vs[layer]))
    st = rep.get("stale")
    if isinstance(st, dict) and isinstance(st.get(layer), dict):
        member = True
        seen += [_int(st[layer].get("got")), _int(st[layer].get("have"))]
    for r in rep.get("rejections") or []:
        if isinstance(r, dict) and r.get("layer") == layer:
            member = True
            seen.append(_int(r.get("version")))
    if isinstance(rep.get("groups"), list) and layer in rep["groups"]:
        member = True
    return member, [v for v in seen if v is not None]


def outcome(rep, layer, version):
    """How a device's config/reported answers version `version` of `layer`: ("applied",
    [keys it did not know]), ("stale", version it runs), ("rejected", reason) or None (not
    yet)."""
    if not isinstance(rep, dict):
        return None
    # Stale first: the version a device runs is higher then, which is not taking it.
    st = rep.get("stale")
    if isinstance(st, dict) and isinstance(st.get(layer), dict) \
            and st[layer].get("got") == version:
        return ("stale", st[layer].get("have"))
    vs = rep.get("versions")
    if isinstance(vs, dict) and (_int(vs.get(layer)) or 0) >= version:
        # The keys of the layer it did not know (an app setting its app does not declare).
        unknown = rep.get("unknown")
        unknown = unknown.get(layer) if isinstance(unknown, dict) else None
        return ("applied", unknown if isinstance(unknown, list) else [])
    for r in rep.get("rejections") or []:
        if isinstance(r, dict) and r.get("layer") == layer and r.get("version") == version:
            return ("rejected", r.get("reason"))
    return None


def publish_layer(args, topic, change, replace, hint, wait=0.0):
    """Publish `change` ({dotted name: value}, None removing the name) merged into the
    current retained layer on `topic` (or into an empty one with `replace`), retained, with
    the next version; prints the topic and the document. With `wait`, then follows the
    targeted devices' config/reported for at most that long (follow()). Returns (the
    document published (with args.dry_run: that would have been), exit code)."""
    layer = layer_name(args)
    who = args.device or "+"
    base = "%sdevices/" % args.prefix
    with Session(args) as s:
        # The devices' reported documents and status too: the versions they run (the
        # broker may have lost the retained layer while they still run it from their
        # cache), and which of them the layer targets and are online, to follow them.
        got = s.retained([topic, "%s%s/config/reported" % (base, who),
                          "%s%s/status" % (base, who)], args.read_wait)
        version, flat = current_version(got.get(topic), topic)
        found = version > 0
        reps, states = {}, {}
        for t, payload in got.items():
            dk = device_of(args.prefix, t.replace("/config/reported", "/reported"))
            if dk is None:
                continue
            doc = _json(payload)
            if dk[1] == "reported":
                reps[dk[0]] = doc
                member, seen = layer_view(doc, layer)
                if member and seen:
                    found = True
                    version = max([version] + seen)
            elif dk[1] == "status" and isinstance(doc, dict):
                states[dk[0]] = doc.get("state")
        if replace:
            flat = {}
        elif flat is None:
            raise Fail(INVALID, "cannot merge into the unreadable document on %s; use "
                       "fleetctl set --replace" % topic)
        for k, v in change.items():
            if v is None:
                flat.pop(k, None)
            else:
                flat[k] = v
        validate(flat, "the merged layer (current document on %s plus the change)" % topic, hint)
        doc = {"version": version + 1 if found
               else max(1, int(time.time()) - VERSION_EPOCH)}
        doc.update(nest(flat))
        text = json.dumps(doc)
        try:
            twin.check_text(text)  # the device's size and nesting limits
        except twin.Rejected as e:
            raise Fail(INVALID, "the document would be refused by devices: %s" % e)
        if args.dry_run:
            print("%s %s (dry run, not published)" % (topic, text), flush=True)
            return doc, OK
        s.publish(topic, text, retain=True)
        print("%s %s" % (topic, text), flush=True)
        if wait <= 0:
            return doc, OK
        if args.device:
            targets = {args.device}
        else:
            targets = {d for d, r in reps.items() if layer_view(r, layer)[0]}
            if layer == "all":
                targets |= set(states)
        code, runs = follow(s, args, layer, doc["version"], targets, reps, states, wait, True)
        if runs:
            # Devices run a version this one is not above: a broker that lost the layer
            # and their reports (nothing to read the version from), and a clock-derived
            # version no later than theirs. Their stale reports say which: once more, past it.
            doc["version"] = max(runs) + 1
            text = json.dumps(doc)
            s.publish(topic, text, retain=True)
            print("%s %s (again: past the version they run)" % (topic, text), flush=True)
            code, runs = follow(s, args, layer, doc["version"], targets, reps, states, wait)
        return doc, code


def follow(s, args, layer, version, targets, reps, states, wait, again=False):
    """Wait (at most `wait` s) until every online target's config/reported says whether it
    took version `version` of `layer`; print who did not. A device that answers for the
    layer counts as a target even if it was not known as one. Exit code: 1 if a device
    refused it (ignored as not newer, or rejected), 3 if an online device did not answer,
    else 0; offline devices are pending (the broker keeps the layer for them). Returns
    (exit code, the versions the stale devices run); with `again` (the caller publishes
    once more past those) the stale ones are not told as a failure yet."""
    done = {}
    deadline = time.monotonic() + wait
    for d in targets:
        o = outcome(reps.get(d), layer, version)
        if o:
            done[d] = o
    while [d for d in targets if d not in done and states.get(d) == "online"]:
        m = s.get(deadline)
        if m is None:
            break
        dk = device_of(args.prefix, m[1].replace("/config/reported", "/reported"))
        if dk is None or (args.device and dk[0] != args.device):
            continue
        doc = _json(m[2])
        if dk[1] == "status" and isinstance(doc, dict):
            states[dk[0]] = doc.get("state")
        elif dk[1] == "reported":
            o = outcome(doc, layer, version)
            if o:
                targets.add(dk[0])
                done[dk[0]] = o
    applied = sorted(d for d in done if done[d][0] == "applied")
    stale = sorted(d for d in done if done[d][0] == "stale")
    rejected = sorted(d for d in done if done[d][0] == "rejected")
    silent = sorted(d for d in targets if d not in done and states.get(d) == "online")
    pending = sorted(d for d in targets if d not in done and states.get(d) != "online")
    print("applied by %d of %d device%s (version %d)" % (
        len(applied), len(targets), "" if len(targets) == 1 else "s", version), flush=True)
    runs = [done[d][1] for d in stale if _int(done[d][1]) is not None]
    if stale:
        print("stale: ignored as not newer than the version they run: " + ", ".join(
            "%s (runs %s)" % (d, done[d][1]) for d in stale) + (
            "" if again and runs else "; set again: the next version goes past theirs"),
            flush=True)
    if again and runs and not rejected:
        return DEVICE_ERROR, runs
    if rejected:
        print("rejected: " + ", ".join("%s (%s)" % (d, done[d][1]) for d in rejected),
              flush=True)
    unknown = [d for d in applied if done[d][1]]
    if unknown:
        # Applied without those keys: settings the device does not have (app settings are
        # declared by the app on the device, so fleetctl cannot check their names).
        print("applied without the keys it does not know: " + ", ".join(
            "%s (%s)" % (d, ", ".join(str(k) for k in done[d][1])) for d in unknown),
            flush=True)
    if silent:
        print("no answer within %g s (online): %s" % (wait, ", ".join(silent)), flush=True)
    if pending:
        print("pending (offline; they get it when they connect): " + ", ".join(pending),
              flush=True)
    if stale or rejected:
        return DEVICE_ERROR, []
    return (TIMEOUT if silent else OK), []


# ---- status ----------------------------------------------------------------------------------


def _age(seconds):
    if seconds is None:
        return "-"
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm" % (seconds // 60)
    return "%dh" % (seconds // 3600)


def cmd_status(args):
    level, match = target_filter(args.pattern)
    # id -> {"status", "health", "state": doc, "seen": time of the latest live message}
    devs = {}
    with Session(args) as s:
        s.subscribe(kind_filters(args.prefix, level, KINDS))
        deadline = time.monotonic() + args.wait
        asked = set()
        while True:
            m = s.get(deadline)
            if m is None:
                break
            t, topic, payload, retain = m
            dk = device_of(args.prefix, topic)
            if dk is None or not match(dk[0]):
                continue
            d = devs.setdefault(dk[0], {"status": None, "health": None, "state": None,
                                        "seen": None})
            if not retain:
                # A retained status tells nothing about when it was sent; only messages
                # that arrived live say the device was there.
                d["seen"] = t
            doc = _json(payload)
            if not isinstance(doc, dict):
                continue
            if dk[1] == "status":
                d["status"] = doc
                if args.report and doc.get("state") == "online" and dk[0] not in asked:
                    # Health comes every ~5 min; `report` makes an online device send one now.
                    asked.add(dk[0])
                    body = json.dumps({"id": "fleetctl-" + secrets.token_hex(6)})
                    s.c.publish("%sdevices/%s/cmd/report" % (args.prefix, dk[0]), body, 1)
            elif dk[1] in ("health", "state"):
                d[dk[1]] = doc
    now = time.time()
    rows = []
    for dev in sorted(devs):
        d = devs[dev]
        st = d["status"] or {}
        h = d["health"] or {}
        ob = h.get("outbox")
        queued = ob.get("queued") if isinstance(ob, dict) else None
        # The app's section: of the latest health, else of the status (which has one only
        # when the app failed to set up).
        app = h.get("app") if isinstance(h.get("app"), dict) else st.get("app")
        rows.append({
            "device": dev,
            "state": st.get("state", "?"),
            "safe_mode": bool(st.get("safe_mode") or h.get("safe_mode")),
            "boot": h.get("boot", st.get("boot")),
            "cause": st.get("cause") or h.get("reset_cause"),
            "fw": st.get("fw"),
            "last_seen_s": None if d["seen"] is None else round(now - d["seen"], 1),
            "queued": queued,
            # With several brokers (README "Broker failover"): the one it is connected to.
            "broker": st.get("broker") if st.get("state") == "online" else None,
            "app": app if isinstance(app, dict) else None,
            # The app's retained state document ({"v", "boot", "ts", "state"}), as published.
            "app_state": d["state"],
        })
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return OK
    brokers = any(r["broker"] for r in rows)
    apps = any(r["app"] or r["app_state"] for r in rows)
    table = [("DEVICE", "STATE", "BOOT", "CAUSE", "FW", "LAST SEEN", "QUEUE")
             + (("APP",) if apps else ()) + (("BROKER",) if brokers else ())]
    notes = [[]]  # lines printed under each row: the app's problems, its state
    for r in rows:
        table.append((r["device"], r["state"] + (" (safe mode)" if r["safe_mode"] else ""),
                      _cell(r["boot"]), _cell(r["cause"]), _cell(r["fw"]),
                      _age(r["last_seen_s"]), _cell(r["queued"]))
                     + ((app_cell(r["app"]),) if apps else ())
                     + ((_cell(r["broker"]),) if brokers else ()))
        notes.append(app_notes(r["app"]) + state_notes(r["app_state"], r["boot"]))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row, extra in zip(table, notes):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        for line in extra:
            print("  " + line)
    if not rows:
        print("(no device matched %r within %g s)" % (args.pattern, args.wait), file=sys.stderr)
    return OK


def _cell(v):
    return "-" if v is None else str(v)


# A state line of status is cut at this many characters (--json has the whole document).
STATE_LINE_MAX = 160


def app_cell(app):
    """The APP column: ok (loaded), failed (it did not set up: see the note), none (no app
    on the device), - (not known: no health yet, and a status without an app section)."""
    if not isinstance(app, dict):
        return "-"
    if app.get("loaded"):
        return "ok"
    return "failed" if app.get("error") else "none"


def app_notes(app):
    """Lines under a status row: the app's error, and what its counters say went wrong."""
    if not isinstance(app, dict):
        return []
    out = []
    if app.get("error"):
        out.append("app error: %s" % app["error"])
    problems = []
    sensors = app.get("sensors")
    for name in sorted(sensors) if isinstance(sensors, dict) else ():
        c = sensors[name] if isinstance(sensors[name], dict) else {}
        errors, timeouts = _int(c.get("errors")) or 0, _int(c.get("timeouts")) or 0
        if errors or timeouts:
            problems.append("sensor %s %d errors, %d timeouts of %s reads%s" % (
                name, errors, timeouts, _cell(c.get("reads")),
                " (last: %s)" % c["last_error"] if c.get("last_error") else ""))
    cmds = app.get("commands")
    if isinstance(cmds, dict) and _int(cmds.get("errors")):
        problems.append("commands %d errors of %s handled" % (cmds["errors"],
                                                              _cell(cmds.get("handled"))))
    ev = app.get("events")
    if isinstance(ev, dict) and _int(ev.get("dropped_q0")):
        problems.append("events %d QoS 0 dropped" % ev["dropped_q0"])
    if problems:
        out.append("app: " + "; ".join(problems))
    return out


def state_notes(doc, boot):
    """The line under a status row with the app's retained state: "state: KEY=VALUE ..."
    (values as compact JSON, cut at STATE_LINE_MAX), "(boot B)" when it was published in
    another boot than the one the row shows."""
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
        return []
    line = "state: " + (" ".join("%s=%s" % (k, json.dumps(v, separators=(",", ":")))
                                 for k, v in doc["state"].items()) or "{}")
    if len(line) > STATE_LINE_MAX:
        line = line[:STATE_LINE_MAX - 3] + "..."
    if boot is not None and doc.get("boot") is not None and doc["boot"] != boot:
        line += " (boot %s)" % doc["boot"]
    return [line]


# ---- config ----------------------------------------------------------------------------------


def cmd_config(args):
    check_name("device id", args.device)
    topic = "%sdevices/%s/config/reported" % (args.prefix, args.device)
    with Session(args) as s:
        rep = _json(s.retained([topic], args.read_wait).get(topic) or b"null")
    if not isinstance(rep, dict):
        raise Fail(TIMEOUT, "no config/reported retained for %s (a device that never "
                   "connected, or another --prefix?)" % args.device)
    eff = rep.get("effective") if isinstance(rep.get("effective"), dict) else {}
    src = rep.get("source") if isinstance(rep.get("source"), dict) else {}
    names = sorted(n for n in eff if not args.names
                   or any(fnmatch.fnmatchcase(n, p) for p in args.names))
    if args.json:
        doc = dict(rep, effective={n: eff[n] for n in names},
                   source={n: src[n] for n in names if n in src})
        print(json.dumps(doc), flush=True)
        return OK
    table = [("SETTING", "VALUE", "SOURCE")] + [
        (n, json.dumps(eff[n]), _cell(src.get(n))) for n in names]
    widths = [max(len(row[i]) for row in table) for i in range(2)]
    for row in table:
        print("%s  %s  %s" % (row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2]))
    for line in config_notes(rep):
        print(line)
    if not names and args.names:
        print("(no setting of %s matched %s)" % (args.device, " ".join(args.names)),
              file=sys.stderr)
    return OK


def config_notes(rep):
    """The lines after the settings table of `config`: what the reported document says
    about the layers (versions, rejections, unknown keys, stale versions), the settings
    waiting for a reboot and the flash cache."""
    out = []
    vs = rep.get("versions")
    if isinstance(vs, dict) and vs:
        out.append("versions: " + ", ".join("%s %s" % (k, vs[k]) for k in vs))
    if rep.get("rejected"):
        out.append("rejected: %s" % rep["rejected"])
    for r in rep.get("rejections") or []:
        if isinstance(r, dict):
            out.append("  rejection: %s version %s: %s" % (
                r.get("layer"), _cell(r.get("version")), r.get("reason")))
    unknown = rep.get("unknown")
    for layer in unknown if isinstance(unknown, dict) else ():
        if unknown[layer]:
            out.append("unknown (not applied): %s: %s" % (
                layer, ", ".join(str(k) for k in unknown[layer])))
    stale = rep.get("stale")
    for layer in stale if isinstance(stale, dict) else ():
        if isinstance(stale[layer], dict):
            out.append("stale: %s version %s ignored, runs %s" % (
                layer, _cell(stale[layer].get("got")), _cell(stale[layer].get("have"))))
    if rep.get("pending_reboot"):
        out.append("pending reboot: " + ", ".join(str(k) for k in rep["pending_reboot"]))
    if rep.get("cache") is not None:
        out.append("cache: %s" % rep["cache"])
    return out


# ---- ota -------------------------------------------------------------------------------------

OTA_PENDING = ("downloading", "staged", "testing")
OTA_BAD = ("failed", "rolled_back")


def check_bundle(path, pubs):
    """(manifest document, manifest SHA-256) of the bundle directory `path`, or Fail: its
    files must match its manifest and it must be signed; with `pubs` (public keys: hex or
    .pub files) the signature is verified too, else manifest.sig only has to exist. The
    checks are tools/bundle.py's own, so what is published is what `bundle.py verify`
    passes and a device would accept."""
    # Imported here: only `ota push` needs the bundle tools (and their cryptography).
    from tools import bundle
    try:
        if pubs:
            bundle.verify(path, pubs)
        elif not os.path.isfile(os.path.join(path, "manifest.sig")):
            raise ValueError("no manifest.sig: sign it first (tools/bundle.py sign)")
        _, doc = bundle.read_manifest(path)
        problems = bundle.check_files(path, doc)
        if problems:
            raise ValueError("; ".join(problems))
        digest = bundle.manifest_sha256(path)
    except (ValueError, OSError) as e:
        raise Fail(INVALID, "bundle %s refused, nothing published: %s" % (path, e))
    return doc, digest


# What the URL check reads of a served file, at most (a device reads at most 16 KiB of a
# manifest: firmware/ota.py MANIFEST_MAX; more is another file anyway).
URL_CHECK_MAX = 1 << 20


def split_url(url):
    """(tls, host, port, path) of an http:// or https:// URL, read as a device reads its
    update URL (firmware/otahttp.py split_url)."""
    tls = url.startswith("https://")
    rest = url[8:] if tls else url[7:]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return tls, host, int(port) if port else (443 if tls else 80), "/" + path


def http_get(url, deadline, ctx):
    """(status, body) of one GET of `url` made as a device makes it: directly (no proxy),
    no redirect followed, an https server's certificate and host name verified with `ctx`.
    The body (at most URL_CHECK_MAX + 1 bytes) only with status 200, else None. Each socket
    operation waits at most until `deadline` (time.monotonic()), as it was at the connect."""
    tls, host, port, path = split_url(url)
    timeout = deadline - time.monotonic()
    if timeout <= 0:
        raise TimeoutError("timed out")
    if tls:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, None
        body = bytearray()
        while len(body) <= URL_CHECK_MAX:
            if time.monotonic() > deadline:
                raise TimeoutError("timed out")
            chunk = resp.read1(65536)
            if not chunk:
                break
            body += chunk
        return 200, bytes(body)
    finally:
        conn.close()


def _http_reason(e, timeout):
    if isinstance(e, ssl.SSLCertVerificationError):
        return "TLS: the server's certificate does not verify (%s; a private CA: set " \
               "SSL_CERT_FILE to its PEM file)" % (e.verify_message or e.reason)
    if isinstance(e, ssl.SSLError):
        return "TLS handshake failed: %s (is it an https server?)" % (e.reason or e)
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "no answer within %g s" % timeout
    if isinstance(e, socket.gaierror):
        return "cannot resolve the host name: %s" % _reason(e)
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (is the file server up?)"
    if isinstance(e, http.client.HTTPException):
        return "not an HTTP answer (%s)" % (type(e).__name__,)
    if isinstance(e, ValueError):
        return "not a URL a device can use: %s" % e
    return _reason(e)


def check_url(url, bundle_dir, digest, timeout):
    """Fail(URL_CHECK) unless `url` serves the bundle `bundle_dir` as a device will fetch
    it: URL/manifest.json whose SHA-256 is `digest` (the one the request names) and
    URL/manifest.sig with the bundle's own bytes. Catches a push that races the upload, a
    wrong URL and an older bundle left at it, before any device is asked."""
    ctx = ssl.create_default_context() if url.startswith("https://") else None
    deadline = time.monotonic() + timeout
    with open(os.path.join(bundle_dir, "manifest.sig"), "rb") as f:
        sig = f.read()
    for name in ("manifest.json", "manifest.sig"):
        where = url + name
        why = None
        try:
            status, body = http_get(where, deadline, ctx)
        except (OSError, ValueError, http.client.HTTPException) as e:
            why = _http_reason(e, timeout)
        else:
            if 300 <= status < 400:
                why = "HTTP %d: devices do not follow redirects" % status
            elif status == 404:
                why = "HTTP 404 (not uploaded yet, or a wrong URL?)"
            elif status != 200:
                why = "HTTP %d" % status
            elif name == "manifest.json":
                got = hashlib.sha256(body).hexdigest()
                if got != digest:
                    why = "SHA-256 %s, not the bundle's %s (another bundle, or an upload in " \
                          "progress?)" % (got[:16] + "...", digest[:16] + "...")
            elif body != sig:
                why = "not the bundle's manifest.sig (%d bytes served, %d in the bundle)" \
                      % (len(body), len(sig))
        if why:
            raise Fail(URL_CHECK, "the bundle is not served at %s, nothing published: GET %s: "
                       "%s; --no-url-check publishes without this check" % (url, where, why))


def cmd_ota_push(args):
    topic = desired_topic(args)
    path = os.path.abspath(args.bundle)
    doc, digest = check_bundle(path, args.pub)
    url = args.url if args.url.endswith("/") else args.url + "/"
    req = {"version": doc.get("version"), "url": url, "manifest_sha256": digest,
           "window_s": args.window}
    if args.downgrade:
        req["downgrade"] = True
    if args.reboot:
        req["reboot"] = args.reboot
    # The firmware's own check of a request, before any connection (bad URL, version...).
    validate({"ota": req}, "update request")
    # Then what devices will download, before the broker hears of it (also with --dry-run).
    if not args.no_url_check:
        check_url(url, path, digest, args.timeout)
    # The request replaces the layer's previous one whole; its other settings are kept.
    layer, _ = publish_layer(args, topic, {"ota": req}, False,
                             "\nfix the layer's other settings with fleetctl set first")
    extra = (", downgrade" if args.downgrade else "") + (", reboot now" if args.reboot else "")
    print("%s: layer %s version %d asks for bundle version %d (%s), manifest_sha256 %s, "
          "url %s, window %d s%s" % (
              "dry run" if args.dry_run else "published", args.device or args.group,
              layer["version"], req["version"], doc.get("name"), digest, url, args.window,
              extra), flush=True)
    return OK


def _layer_member(rep, group):
    """Whether a device whose config/reported document is `rep` has applied a layer of
    `group` (group "all": every device)."""
    if group == "all":
        return True
    return isinstance(rep, dict) and isinstance(rep.get("versions"), dict) \
        and group in rep["versions"]


def cmd_ota_status(args):
    if args.group is not None:
        check_name("group", args.group)
    kinds = ("ota", "status", "config/reported")
    base = "%sdevices/" % args.prefix
    devs = {}  # id -> {kind: document}
    with Session(args) as s:
        got = s.retained([base + "+/" + k for k in kinds], args.read_wait)
    for topic, payload in got.items():
        dev, _, kind = topic[len(base):].partition("/")
        if topic.startswith(base) and kind in kinds:
            devs.setdefault(dev, {})[kind] = _json(payload)
    states, running, bad, pending = {}, {}, {k: [] for k in OTA_BAD}, []
    n = 0
    for dev in sorted(devs):
        d = devs[dev]
        if args.group is not None and not _layer_member(d.get("config/reported"), args.group):
            continue
        n += 1
        ota = d.get("ota") if isinstance(d.get("ota"), dict) else {}
        st = d.get("status") if isinstance(d.get("status"), dict) else {}
        # "unknown": no (readable) ota document: a firmware without updates, or not yet sent.
        state = str(ota.get("state") or "unknown")
        version = ota.get("version")
        key = "null" if version is None else str(version)
        states.setdefault(state, {})
        states[state][key] = states[state].get(key, 0) + 1
        if ota.get("running") is not None:
            r = str(ota["running"])
            running[r] = running.get(r, 0) + 1
        row = {"device": dev, "version": version, "online": st.get("state")}
        if state in OTA_BAD:
            row["reason"] = ota.get("reason")
            row["refused"] = bool(ota.get("refused"))
            bad[state].append(row)
        elif state in OTA_PENDING:
            row["state"] = state
            if ota.get("progress") is not None:
                row["progress"] = ota["progress"]
            pending.append(row)
    if args.json:
        print(json.dumps({"devices": n, "states": states, "running": running,
                          "failed": bad["failed"], "rolled_back": bad["rolled_back"],
                          "pending": pending}), flush=True)
        return OK
    where = "" if args.group is None else " in group %s" % args.group
    print("%d device%s%s" % (n, "" if n == 1 else "s", where))
    if states:
        print("  %-12s %-8s %s" % ("STATE", "VERSION", "DEVICES"))
    for state in sorted(states):
        for key in sorted(states[state], key=lambda k: (len(k), k)):
            print("  %-12s %-8s %d" % (state, "-" if key == "null" else key,
                                       states[state][key]))
    if running:
        print("running: " + ", ".join("bundle %s: %d" % (k, running[k])
                                      for k in sorted(running, key=lambda k: (len(k), k))))
    for state in OTA_BAD:
        if bad[state]:
            print("%s:" % state.replace("_", " "))
            for r in bad[state]:
                print("  %s version %s%s: %s" % (r["device"], _cell(r["version"]),
                                                 " (refused)" if r["refused"] else "",
                                                 r["reason"] or "-"))
    if pending:
        print("in progress:")
        for r in pending:
            print("  %s %s version %s%s%s" % (
                r["device"], r["state"], _cell(r["version"]),
                " %s%%" % r["progress"] if "progress" in r else "",
                " (%s)" % r["online"] if r["online"] and r["online"] != "online" else ""))
    return OK


# ---- command line ----------------------------------------------------------------------------


def _text(*paragraphs):
    """Help text as wrapped paragraphs (the raw formatter keeps the exit code tables as
    written, so prose is wrapped here)."""
    return "\n\n".join(textwrap.fill(x, 88) for x in paragraphs)


def _publish_options(p):
    """What `set` and `ota push` share: both read the current retained layer first."""
    p.add_argument("--dry-run", action="store_true", help="print the layer, publish nothing")
    p.add_argument("--read-wait", type=float, default=2.0, metavar="S",
                   help="at most this long to read the current retained layer (default "
                        "%(default)s; normally it takes a round trip)")


def parser():
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="fleetctl.py", formatter_class=fmt, epilog=EPILOG,
        description=_text("Operate a fleet over MQTT: watch devices (tail), run commands "
                          "(cmd), change the desired config (set), show a device's effective "
                          "config (config), list devices (status), roll out updates (ota "
                          "push, ota status). COMMAND --help tells more."))
    p.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT",
                   help="broker address (default %(default)s)")
    p.add_argument("--user", help="MQTT user name")
    p.add_argument("--password", default=os.environ.get("FLEETCTL_PASSWORD"),
                   help="MQTT password (default: $FLEETCTL_PASSWORD; never printed)")
    p.add_argument("--prefix", default="", help="topic prefix of the fleet (default none)")
    p.add_argument("--protocol", choices=("auto", "5", "3.1.1"), default="auto",
                   help="MQTT version: auto (default) speaks 5 where the broker does (then "
                        "commands carry a Message Expiry Interval), else 3.1.1")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the broker, for a command result, and "
                        "(ota push) for the bundle's URL (default %(default)s)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "tail", formatter_class=fmt, help="print what devices publish, as it arrives",
        description=_text(
            "Print the messages of one device, or of every device whose id matches a glob "
            "pattern (pump-*, sensor-?1; quote it for the shell), one line each as they arrive. "
            "Retained messages (status, an app's state: old news, use status) are left out "
            "unless --retained.",
            "A line is TIME DEVICE KIND PAYLOAD; an app's event is TIME DEVICE event NAME "
            "boot=B seq=N DATA (DATA: the event's data as JSON). With --json: {\"t\", "
            "\"device\", \"kind\", \"retained\", \"data\"}, and \"event\": NAME for an "
            "event."),
        epilog="exit codes: 0 after --count messages or on Ctrl-C, 3 if --duration ends first")
    t.add_argument("target", metavar="TARGET", help="device id or glob pattern of ids")
    t.add_argument("--kind", default=",".join(KINDS),
                   help="comma-separated message kinds (default %(default)s; event and "
                        "state are an app's)")
    t.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    t.add_argument("--duration", type=float, metavar="S", help="exit after S seconds")
    t.add_argument("--retained", action="store_true", help="also print retained messages")
    t.add_argument("--json", action="store_true",
                   help='one JSON object per line: {"t", "device", "kind", "retained", "data"} '
                        '(and "event" for an event)')

    c = sub.add_parser(
        "cmd", formatter_class=fmt, help="run a command on a device and print its result",
        description=_text(
            "Publish {prefix}devices/DEVICE/cmd/NAME with a JSON body carrying a request id, "
            "wait for the answer with that id on .../cmd/NAME/result and print it as one JSON "
            "line. Firmware commands: ping, report, logs (--body '{\"n\": 20}'), "
            "refresh-config, reboot.",
            "A timeout does not mean that the command will not run: the broker keeps it for a "
            "device that is away and has a session. Retry with the same id in --body to run it "
            "at most once (the device answers a known id with {\"duplicate\": true}).",
            "The body carries \"exp\", Unix time after which the device refuses it (--expires, "
            "300 s by default): a broker may deliver a command late. A device answers an "
            "expired one with {\"error\": \"expired\", \"exp\", \"now\"} (exit 1); one whose "
            "clock is not set yet runs it and logs that it could not check."),
        epilog="exit codes:\n"
               "  0  the device answered ok (also a duplicate: that id had already run)\n"
               "  1  the device answered error (unknown command, bad body, expired)\n"
               "  2  bad arguments\n"
               "  3  no answer within --timeout\n"
               "  4  broker problem")
    c.add_argument("device", metavar="DEVICE")
    c.add_argument("name", metavar="NAME", help="command name")
    c.add_argument("--body", metavar="JSON",
                   help="JSON object sent as the body; an \"id\" is added unless given")
    c.add_argument("--timeout", dest="cmd_timeout", type=float, metavar="S",
                   help="seconds to wait for the result (default: the global --timeout)")
    c.add_argument("--expires", type=float, default=DEFAULT_EXPIRY_S, metavar="S",
                   help="the device refuses the command after S seconds from now (body "
                        "\"exp\": Unix time; default %(default)s; 0: never expires; an "
                        "\"exp\" in --body is kept)")

    s = sub.add_parser(
        "set", formatter_class=fmt, help="change a device's or a group's desired config layer",
        description=_text(
            "Check the settings against the firmware's declared ones (firmware/settings.py): "
            "unknown names, wrong types and out-of-range values are refused with exit 2 and "
            "nothing is published. Then publish the layer retained on "
            "{prefix}devices/ID/config/desired or {prefix}fleet/GROUP/config/desired with the "
            "next version: 1 + the highest of the current retained document's and those the "
            "targeted devices report (applied or ignored); when none is found (a new layer, "
            "or one the broker lost), the seconds since 2025-01-01 UTC, which is above any "
            "version the layer had.",
            "Then it follows the targeted devices (the device, or those whose config/reported "
            "names the group; every device for 'all') for at most --wait seconds and prints "
            "how many applied it, which ignored it as not newer than the version they run "
            "(stale) or rejected it, which online ones did not answer, and which are offline "
            "(pending: the broker keeps the layer for them).",
            "KEY=VALUE changes those keys of the current layer and keeps the others (--replace "
            "starts from an empty layer); KEY= removes KEY. VALUE is JSON when it parses (30, "
            "2.5), else a string (log_level=warn). Dotted names (reconnect.cap) are published "
            "as nested objects. --file publishes the file's document as the whole layer (a "
            "version in it is ignored).",
            "app.NAME=VALUE sets a setting of the device's application, published as "
            "{\"app\": {\"NAME\": VALUE}}. The app declares its settings on the device, so "
            "only the name (1 to 32 of a-z 0-9 _, not starting with a digit) and the kind of "
            "VALUE (a number, true, false or a string) are checked here: a device that finds "
            "the value wrong rejects the layer (exit 1), one whose app has no such setting "
            "applies the rest and lists the key as unknown (printed; fleetctl config DEVICE "
            "shows the effective app settings).",
            "Two operators changing the same layer at the same moment can both take the same "
            "version; devices keep the first one they get and report the other as stale."),
        epilog="settings of this firmware:\n" + "\n".join(
            "  %-24s %s" % (x[0], "|".join(x[3]) if x[1] == settings.CHOICE
                            else "%s %s..%s" % (x[1], x[3], x[4])) for x in settings.SETTINGS)
        + "\n  %-24s %s" % ("app.NAME", "the app's own settings: a number, true, false or a "
                                         "string,\n  %-24s checked by the device (rejections "
                                         "in fleetctl config)" % "")
        + "\n\nexit codes: 0 published (and taken by every online target), 1 a device "
          "ignored it as stale or rejected it, 2 refused (nothing published), 3 an online "
          "target did not answer within --wait, 4 broker problem")
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", metavar="ID")
    who.add_argument("--group", metavar="G", help="a group of the devices' bootstrap config, "
                                                  "or 'all' for every device")
    s.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    s.add_argument("--file", metavar="PATH", help="desired document as JSON ('-': stdin)")
    s.add_argument("--replace", action="store_true",
                   help="KEY=VALUE: do not keep the other keys of the current layer")
    s.add_argument("--wait", type=float, default=10.0, metavar="S",
                   help="follow the targeted online devices' config/reported for at most S "
                        "seconds after publishing (default %(default)s; 0: do not wait)")
    _publish_options(s)

    st = sub.add_parser(
        "status", formatter_class=fmt, help="table of devices: state, boot, last seen, queue",
        description=_text(
            "Collect retained status and live status, health and telemetry for --wait seconds "
            "and print one row per device: id, online/offline (safe mode marked), boot number, "
            "reset cause of that boot, firmware, last seen (age of the newest live message; "
            "'-' if none arrived while collecting) and queue depth (outbox.queued of the "
            "latest health; '-' if none arrived: health comes every ~5 min, --report asks for "
            "it now).",
            "When a device has an application: an APP column (ok, failed: it did not set up, "
            "none: no app, -: not known yet), and under the row the app's error, its "
            "problems as health counts them (\"app: sensor NAME E errors, T timeouts of N "
            "reads (last: ERROR); commands E errors of N handled; events N QoS 0 dropped\") "
            "and its retained state (\"state: KEY=VALUE ...\", values as compact JSON, cut "
            "at %d characters; \"(boot B)\" when published in another boot)." % STATE_LINE_MAX,
            "--json: one object per device with \"device\", \"state\", \"safe_mode\", "
            "\"boot\", \"cause\", \"fw\", \"last_seen_s\", \"queued\", \"broker\", "
            "\"app\" (the app section of health, else of status, or null) and "
            "\"app_state\" (the state document as published, or null)."),
        epilog="exit codes: 0 (also when no device matched), 2 bad arguments, 4 broker problem")
    st.add_argument("pattern", nargs="?", default="*", metavar="PATTERN",
                    help="device id or glob pattern (default: every device)")
    st.add_argument("--wait", type=float, default=2.0, metavar="S",
                    help="seconds to collect (default %(default)s)")
    st.add_argument("--report", action="store_true",
                    help="ask each online device for health now (the report command)")
    st.add_argument("--json", action="store_true", help="one JSON object per device")

    cf = sub.add_parser(
        "config", formatter_class=fmt, help="a device's effective config, app settings included",
        description=_text(
            "Read the device's retained {prefix}devices/ID/config/reported and print its "
            "effective settings, one per line: SETTING VALUE SOURCE (VALUE as JSON; SOURCE: "
            "default, bootstrap or the layer it came from: all, a group, device). The app's "
            "settings are app.NAME. Then what the document says about the layers: versions "
            "applied, rejections (the app's refusals of its settings among them), unknown "
            "keys (not applied), stale versions, settings pending a reboot, the flash cache.",
            "NAME patterns ('app.*', quoted for the shell) keep the matching settings. --json "
            "prints the reported document (effective and source kept to those settings)."),
        epilog="exit codes: 0, 2 bad arguments, 3 no config/reported retained for DEVICE, "
               "4 broker problem")
    cf.add_argument("device", metavar="DEVICE")
    cf.add_argument("names", nargs="*", metavar="NAME",
                    help="setting name or glob pattern (default: every setting)")
    cf.add_argument("--json", action="store_true", help="the reported document as JSON")
    cf.add_argument("--read-wait", type=float, default=2.0, metavar="S",
                    help="at most this long to read the retained document (default "
                         "%(default)s; normally it takes a round trip)")

    o = sub.add_parser(
        "ota", formatter_class=fmt, help="roll out an over-the-air update and follow it",
        description=_text(
            "push asks a group (or one device) for a bundle through its desired config layer; "
            "status counts what the devices report on their retained devices/ID/ota."),
        epilog=OTA_HELP)
    osub = o.add_subparsers(dest="ota_command", required=True, metavar="ACTION")
    op = osub.add_parser(
        "push", formatter_class=fmt, help="ask a group or a device for a bundle",
        description=_text(
            "Check the bundle directory (tools/bundle.py build and sign): every file's size "
            "and SHA-256 against manifest.json, and manifest.sig: with --pub its signature "
            "is verified by one of the given keys, without it the file only has to exist. A "
            "bundle that fails is refused with exit 2 and nothing is published.",
            "Then publish the update request as the `ota` key of the desired layer of --group "
            "or --device, as `set` does: the layer's next version, its other settings kept, "
            "a previous request replaced whole: {\"version\": the bundle's version, \"url\": "
            "--url, \"manifest_sha256\": SHA-256 of manifest.json, \"window_s\": --window} "
            "(plus \"downgrade\": true, \"reboot\": \"now\" when asked). Devices refuse a "
            "bundle older than the one they run unless --downgrade.",
            "Before publishing (and with --dry-run) it fetches URL/manifest.json and "
            "URL/manifest.sig as a device would (directly, no redirects followed; https "
            "verified against the system's CA certificates, or the PEM file $SSL_CERT_FILE "
            "names), both within --timeout: unless they are the bundle's own (manifest.json "
            "of the same SHA-256, manifest.sig of the same bytes) it prints why in one line "
            "and exits 5, nothing published: the upload is not finished, the URL is wrong, or "
            "another bundle is there. --no-url-check skips this, to publish before the upload "
            "on purpose: a device that comes for the bundle before it is there retries with "
            "backoff (a 404 or another manifest.json is not a refusal), but each device "
            "downloads at a random moment from the push on, so early ones waste attempts.",
            "Prints the layer as published, then one line: layer version, bundle version and "
            "name, manifest SHA-256."),
        epilog=OTA_HELP + "\nexit codes: 0 published, 2 bundle or request refused (nothing "
                          "published), 4 broker problem,\n            5 the bundle is not "
                          "served at --url (nothing published)")
    who = op.add_mutually_exclusive_group(required=True)
    who.add_argument("--group", metavar="G", help="a group of the devices' bootstrap config "
                                                  "(canary first), or 'all' for every device")
    who.add_argument("--device", metavar="ID", help="one device's own layer")
    op.add_argument("--bundle", required=True, metavar="DIR",
                    help="the bundle directory (manifest.json, manifest.sig, files/)")
    op.add_argument("--url", required=True, metavar="URL",
                    help="http(s) URL at which that directory is served, e.g. "
                         "http://files:8080/b2/ (a trailing / is added if missing)")
    op.add_argument("--pub", action="append", metavar="HEX_OR_FILE",
                    help="public key (130 hex or a .pub file) the bundle must be signed by; "
                         "repeatable")
    op.add_argument("--window", type=int, default=3600, metavar="S",
                    help="devices download at a random moment within S seconds, and switch "
                         "within S seconds more (default %(default)s)")
    op.add_argument("--reboot", choices=("now",),
                    help="now: switch as soon as the bundle is staged")
    op.add_argument("--downgrade", action="store_true",
                    help="allow a bundle older than the one a device runs")
    op.add_argument("--no-url-check", action="store_true",
                    help="publish without first checking that --url serves this bundle's "
                         "manifest.json and manifest.sig (to push before the upload on "
                         "purpose)")
    _publish_options(op)
    os_ = osub.add_parser(
        "status", formatter_class=fmt, help="count the devices' update states",
        description=_text(
            "Read the retained devices/+/ota, status and config/reported and print the number "
            "of devices per (state, update version) (state unknown: no ota document), which "
            "bundle versions they run, then the failed and rolled_back devices with their "
            "reasons, then those still downloading, staged or testing.",
            "--group G keeps the devices that have applied a layer of group G (as their "
            "config/reported versions say); --group all keeps every device.",
            "--json prints one object: {\"devices\": N, \"states\": {STATE: {VERSION: "
            "COUNT}}, \"running\": {VERSION: COUNT}, \"failed\": [{\"device\", "
            "\"version\", \"reason\", ...}], \"rolled_back\": [...], \"pending\": "
            "[{\"device\", \"state\", \"version\", ...}]} (VERSION \"null\": none)."),
        epilog="exit codes: 0 (also when no device matched), 2 bad arguments, 4 broker problem")
    os_.add_argument("--group", metavar="G", help="only the devices of group G ('all': every one)")
    os_.add_argument("--json", action="store_true", help="one JSON object")
    os_.add_argument("--read-wait", type=float, default=2.0, metavar="S",
                     help="at most this long to read the retained documents (default "
                          "%(default)s; normally it takes a round trip)")
    return p


def cmd_ota(args):
    return {"push": cmd_ota_push, "status": cmd_ota_status}[args.ota_command](args)


def main(argv=None):
    args = parser().parse_args(argv)
    if args.prefix and not args.prefix.endswith("/"):
        args.prefix += "/"  # as the firmware reads its bootstrap config's prefix
    run = {"tail": cmd_tail, "cmd": cmd_cmd, "set": cmd_set, "config": cmd_config,
           "status": cmd_status, "ota": cmd_ota}[args.command]
    try:
        if set("+#\0") & set(args.prefix):
            raise Fail(INVALID, "--prefix must not contain MQTT wildcards")
        return run(args)
    except Fail as e:
        print("fleetctl: %s" % e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        # Ctrl-C is how a tail without --count ends: a normal end.
        return OK if args.command == "tail" else INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head`: the reader has all it wanted. stdout goes to /dev/null
        # so that the interpreter's final flush does not complain about the pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK


if __name__ == "__main__":
    sys.exit(main())
