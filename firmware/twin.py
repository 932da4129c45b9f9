# Desired/reported config twin (README "Config twin"). Pure: documents in, effective config
# and the reported document out; no I/O, so the merge and every rejection rule is tested
# on its own.
#
# Layers, most general first: group `all`, the device's groups in bootstrap order, then the
# device's own layer. Each layer is a JSON object with an integer `version`; a layer whose
# version is not newer than the one applied is ignored (and reported as stale when it is older,
# or the same version with other settings: a broker that lost its retained layers, or an
# operator tool that did not know the version applied). Merge: start from the declared
# defaults, apply each layer in order, key by key (nested objects merge, other values
# replace). A layer that fails validation is rejected whole; unknown keys are reported.
import json

from firmware import settings

MAX_BYTES = 2048
MAX_DEPTH = 4


class Rejected(ValueError):
    def __init__(self, reason, version=None):
        super().__init__(reason)
        self.version = version  # of the rejected document, when it could be read


def check_text(text, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH, ascii=True):
    """Refuse a document by size or nesting before it is parsed (a parser's recursion and
    allocations are what a hostile document would aim at). With `ascii`, also anything but
    printable ASCII, tab and newlines, and \\u escapes: MicroPython's json keeps overlong
    bytes and makes non-UTF-8 strings of escaped surrogates, which the device would echo
    (unknown keys, request ids) to consumers that cannot read them; desired layers and
    command bodies need no other characters."""
    if len(text) > max_bytes:
        raise Rejected("document larger than %d bytes" % max_bytes)
    depth = 0
    in_str = False
    esc = False
    for c in text:
        if ascii and (c > "~" or c < " " and c not in "\t\n\r"):
            raise Rejected("not printable ASCII")
        if in_str:
            if esc:
                if ascii and c == "u":
                    raise Rejected("\\u escape")
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
            if depth > max_depth:
                raise Rejected("document nested deeper than %d" % max_depth)
        elif c in "}]":
            depth -= 1


def loads(text):
    """A JSON document from the wire (bytes or str), or Rejected: checked by check_text
    before it is parsed."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        if len(text) > MAX_BYTES:  # bytes, before decoding: the limit is on the wire size
            raise Rejected("document larger than %d bytes" % MAX_BYTES)
        try:
            text = bytes(text).decode()
        except UnicodeError:
            raise Rejected("not UTF-8")
    check_text(text)
    try:
        return json.loads(text)
    except ValueError:
        raise Rejected("not valid JSON")


def parse_layer(text, extra):
    """(version, {dotted name: value}, [unknown names]) or Rejected. `extra`: the
    application's settings (settings.find)."""
    doc = loads(text)
    if not isinstance(doc, dict):
        raise Rejected("not a JSON object")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise Rejected("version must be a non-negative integer")
    flat = {}
    unknown = []
    _flatten(doc, "", flat, unknown, extra)
    for name in flat:
        try:
            flat[name] = settings.check(name, flat[name], extra)
        except ValueError as e:
            raise Rejected(str(e), version)
    return version, flat, unknown


def _flatten(d, prefix, out, unknown, extra):
    for k, v in d.items():
        if not isinstance(k, str):  # MicroPython's json reads {1: 2}
            raise Rejected("keys must be strings")
        if not prefix and k == "version":
            continue
        name = prefix + k
        if isinstance(v, dict) and not settings.find(name, extra):
            _flatten(v, name + ".", out, unknown, extra)
        elif settings.find(name, extra):
            out[name] = v
        elif len(unknown) < 8:  # reported: bounded, so the report still fits a frame
            unknown.append(name[:64])


class Twin:
    extra = ()  # the application's settings (settings.find); an instance's only with an app

    def __init__(self, layer_names, base=None, extra=None):
        self.order = list(layer_names)  # most general first, "device" last
        if extra:
            self.extra = extra
        # Values from the bootstrap config: below every layer, above the declared defaults.
        self.base = base or {}
        self.layers = {}  # name -> (version, flat)
        self.unknown = {}  # name -> [unknown keys] of its applied version
        self.rejections = []  # last few (layer, version or None, reason)
        self.rejected = 0
        # name -> (version offered, version applied) of the last document ignored because
        # it was not newer; one per layer (bounded by the layers), dropped once a newer
        # version of that layer applies.
        self.stale = {}
        self.ignored = None  # (got, have) when the last offer() was ignored as stale

    def offer(self, layer, text):
        """A desired document arrived for `layer`. Returns the list of setting names whose
        effective value changed (empty if ignored or rejected)."""
        self.ignored = None
        if layer not in self.order:
            self._reject(layer, None, "not a layer of this device")
            return []
        if not text:
            # A retained document was cleared: the layer no longer applies.
            if layer not in self.layers:
                return []
            before = self.effective()
            del self.layers[layer]
            self.unknown.pop(layer, None)
            self.stale.pop(layer, None)
            return self._changes(before)
        try:
            version, flat, unknown = parse_layer(text, self.extra)
        except Rejected as e:
            self._reject(layer, e.version, str(e))
            return []
        have = self.layers.get(layer)
        if have is not None and version <= have[0]:
            # The same document again (a refresh re-delivers it) is normal; an older
            # version, or this version with other settings, is a change that will never
            # apply: said in the reported document, so the operator learns it.
            if version < have[0] or flat != have[1]:
                self.ignored = self.stale[layer] = (version, have[0])
            return []
        before = self.effective()
        self.layers[layer] = (version, flat)
        self.stale.pop(layer, None)
        if unknown:
            self.unknown[layer] = unknown
        else:
            self.unknown.pop(layer, None)
        return self._changes(before)

    def _reject(self, layer, version, reason):
        self.rejected += 1
        self.rejections.append((layer, version, reason))
        if len(self.rejections) > 4:
            self.rejections.pop(0)

    def _changes(self, before):
        after = self.effective()
        return [k for k in after if after[k] != before.get(k)]

    def effective(self):
        eff = settings.defaults(self.extra)
        eff.update(self.base)
        for name in self.order:
            got = self.layers.get(name)
            if got:
                eff.update(got[1])
        return eff

    def sources(self):
        """For each setting, the layer its effective value came from ("default" if none)."""
        src = {s[0]: "default" for s in settings.SETTINGS}
        for s in self.extra:
            src[s[0]] = "default"
        for k in self.base:
            src[k] = "bootstrap"
        for name in self.order:
            got = self.layers.get(name)
            if got:
                for k in got[1]:
                    src[k] = name
        return src

    def reported(self):
        doc = {
            "effective": self.effective(),
            "source": self.sources(),
            "versions": {n: v[0] for n, v in self.layers.items()},
            "rejected": self.rejected,
        }
        if len(self.order) > 2:
            # The bootstrap groups: an operator tool learns which devices a group layer
            # targets, also before any layer of that group was ever applied.
            doc["groups"] = self.order[1:-1]
        if self.unknown:
            doc["unknown"] = self.unknown
        if self.stale:
            doc["stale"] = {n: {"got": g, "have": h} for n, (g, h) in self.stale.items()}
        if self.rejections:
            doc["rejections"] = [
                {"layer": l, "version": v, "reason": r} for l, v, r in self.rejections
            ]
        return doc

    def snapshot(self):
        """What the cache keeps: the applied layers."""
        return {n: {"version": v[0], "settings": v[1]} for n, v in self.layers.items()}

    def restore(self, snap):
        """Layers from the cache, checked again (the declared settings may have changed
        with a firmware update); what no longer validates is dropped and reported."""
        for name, layer in snap.items():
            if name not in self.order:
                continue
            try:
                flat = {}
                for k, v in layer["settings"].items():
                    if not settings.find(k, self.extra):
                        if k.startswith("app."):
                            # The application's, and this boot runs without it (none, or
                            # its setup failed): the layer's other settings still hold.
                            continue
                        raise Rejected("%s is not a setting of this firmware" % k)
                    flat[k] = settings.check(k, v, self.extra)
                self.layers[name] = (int(layer["version"]), flat)
            except (Rejected, ValueError, KeyError, TypeError, AttributeError) as e:
                self._reject(name, None, "cached layer: %s" % e)

