# Over-the-air updates (README "Updates"): acts on the `ota` request of the config layers.
# Downloads the signed bundle into the inactive slot while the application keeps running,
# checks it again from flash, switches at a random moment of the request's window, and on
# the first boot of a new version watches it prove itself (confirm) or gives up on it (roll
# back). The state goes out retained on devices/{id}/ota; the slot record is otaboot's.
import asyncio
import hashlib
import json

import otaboot
from backoff import full_jitter
from firmware import otahttp
from firmware.otacheck import Refused, check_manifest, check_signature, hexstr, running_slot
from firmware.version import BUNDLE_VERSION, FW_VERSION

MANIFEST_MAX = 16384
SIG_MAX = 1024
CHUNK = 1024
# Attempts at one file (each resuming it) before the download is abandoned, its slot freed,
# and the whole request tried again after a longer jittered pause.
FETCH_TRIES = 8


class _Changed(Exception):
    """The request changed while a download waited to retry."""


class Updater:
    def __init__(self, fs, cfg, ssl, rnd, log, publish, reset, checks, uptime_s):
        self.fs = fs
        self.cfg_keys = cfg["keys"]
        self.confirm_s = cfg["confirm_s"]
        self.deadline_s = cfg["confirm_s"] + cfg["deadline_margin_s"]
        self.reserve = cfg["flash_reserve"]
        self.ssl = ssl
        self.rnd = rnd
        self.log = log
        self.publish = publish  # async fn(text): the state, retained
        self.reset = reset  # async fn(why): graceful stop, then the reset
        self.checks = checks  # fn() -> (unmet conditions, fatal reason or None)
        self.uptime_s = uptime_s
        self.want = None
        self._changed = asyncio.Event()
        self.buf = bytearray(CHUNK)
        self.state = {"state": "idle"}
        self.stats = {"downloaded": 0, "retries": 0, "refused": 0, "failed": 0}
        self.trial = False
        self.stray = None  # why a trial in the record is not this code's to judge
        self.slot = None

    def keys(self, rec):
        """The update keys this device trusts: those the last confirmed release named (key
        rotation), else the provisioned ones."""
        return rec.get("keys") or self.cfg_keys

    # ---- what the device tells it -------------------------------------------------------

    def start(self):
        """At boot: a new version on trial, or the outcome of the last update to report."""
        rec = otaboot.read(self.fs)
        if rec.get("state") == "testing":
            slot = running_slot()
            if rec.get("version") == BUNDLE_VERSION and slot == rec.get("active"):
                self.trial = True
                self._set("testing", rec.get("version"), name=rec.get("name"))
                return
            # The loader did not start the slot on trial (it failed, or its record could not
            # be written): this code is not the one on trial and must never confirm it.
            self.stray = ("version %s in slot %s is on trial, but version %d from %s is "
                          "running: the loader did not start it" % (
                              rec.get("version"), rec.get("active"), BUNDLE_VERSION,
                              "slot " + slot if slot else "the factory image"))
            self.log("E", "ota: " + self.stray)
            self._set("failed", rec.get("version"), reason=self.stray)
        elif rec.get("result"):
            r = rec["result"]
            self._set(r["state"], r.get("version"), reason=r.get("reason"), name=r.get("name"),
                      refused=r.get("refused"))

    def request(self, req):
        """The effective `ota` request changed (None: there is none)."""
        self.want = req
        self._changed.set()

    def _set(self, state, version=None, **kw):
        d = {"state": state, "version": version, "running": BUNDLE_VERSION, "fw": FW_VERSION}
        for k, v in kw.items():
            if v is not None:
                d[k] = v
        self.state = d

    async def report(self):
        try:
            await self.publish(json.dumps(self.state))
        except Exception as e:  # noqa: BLE001 - a report lost is not an update lost
            self.log("W", "ota state not sent: %r" % (e,))

    # ---- the task -------------------------------------------------------------------------

    async def run(self):
        if self.trial:
            await self._trial()
        await self.report()
        if self.stray:
            # Nothing is downloaded over a record this code does not own; the next boot's
            # loader counts the trial's boots and rolls it back in the end.
            await asyncio.Event().wait()
        fails = 0
        while True:
            req = self.want
            self._changed.clear()
            if req is None or not self._wanted(req):
                self._free_slot()
                await self.report()
                if self.want is not req:
                    continue  # a new request came while the state went out
                # Idle: the device lets go of the updater (its code and buffer) until the
                # request changes (Device._apply loads a fresh one).
                return
            try:
                await self._update(req)
                return  # the reset is under way
            except _Changed:
                continue
            except Refused as e:
                self._free_slot()
                await self._refuse(req, str(e), e.release)
                continue
            except Exception as e:  # noqa: BLE001 - no update failure may end the task
                # A server that keeps failing, a full flash, a heap too small to verify: the
                # download is abandoned (its slot freed, for the queue's sake) and the whole
                # request tried again later, spread like every retry.
                self._free_slot()
                d = full_jitter(fails, 30, 3600, self.rnd)
                fails += 1
                self.stats["failed"] += 1
                why = "%s: %s" % (type(e).__name__, e)
                self.log("W", "update to version %d failed (%s); again in %d s"
                         % (req["version"], why, d))
                self._set("failed", req["version"], reason="%s; again in %d s" % (why, d))
                await self.report()
                await self._wait_change(d)

    async def _update(self, req):
        window = req["window_s"]
        delay = self.rnd.uniform(0, window)
        self.log("I", "update to version %d: download in %d s" % (req["version"], delay))
        if await self._wait_change(delay):
            raise _Changed()
        m = await self._download(req)
        if self.want is not req:
            raise _Changed()  # a newer request came during the download
        self._set("staged", req["version"], name=m.get("name"))
        await self.report()
        delay = 0 if req["reboot"] == "now" else self.rnd.uniform(0, window)
        self.log("I", "version %d staged: switching in %d s" % (req["version"], delay))
        if await self._wait_change(delay):
            raise _Changed()
        trial = {"floor": m.get("floor", 1)}
        if m.get("keys"):
            trial["keys"] = m["keys"]
        otaboot.switch(self.fs, self.slot, req["version"], m.get("name"),
                       req["manifest_sha256"], self.deadline_s, trial)
        await self.reset("update to version %d" % req["version"])

    def _wanted(self, req):
        """Whether to act on `req`; sets and reports the state when not."""
        rec = otaboot.read(self.fs)
        v = req["version"]
        if v == BUNDLE_VERSION:
            if self.state["state"] != "confirmed":
                self._set("confirmed", BUNDLE_VERSION)
            return False
        if req["manifest_sha256"] in (rec.get("bad") or ()):
            return False  # its signature failed already: its state stands
        if otaboot.refused(rec, v):
            # Crashed, rolled back or refused for its content: however often it is asked.
            if self.state.get("version") != v or self.state["state"] not in (
                    "rolled_back", "failed"):
                self._refused(v, "version %d was refused on this device before (it crashed,"
                                 " rolled back or was refused for its content)" % v)
            return False
        fl = otaboot.floor(rec)
        why = None
        if v < fl:
            why = "version %d is below this device's security floor %d" % (v, fl)
        elif v < BUNDLE_VERSION and not req["downgrade"]:
            why = "version %d is not newer than the running %d" % (v, BUNDLE_VERSION)
        if why:
            # Refused without a download, and not noted: a request is not a release.
            if self.state.get("reason") != why:
                self._refused(v, why)
            return False
        return True

    async def _wait_change(self, s):
        """Sleep s seconds (up to a week: in steps a board's clock can time); True if the
        request changed meanwhile."""
        while True:
            step = min(s, 86400)
            try:
                await asyncio.wait_for(self._changed.wait(), step)
                return True
            except asyncio.TimeoutError:
                s -= step
                if s <= 0:
                    return False

    def _refused(self, version, why):
        self.stats["refused"] += 1
        self.log("E", "update to version %d refused: %s" % (version, why))
        self._set("failed", version, reason=why, refused=True)

    async def _refuse(self, req, why, release):
        """A refusal kept on flash: the release (by version, once its signature verified)
        or this manifest (by sha256) is not tried again."""
        self._refused(req["version"], why)
        try:
            otaboot.note(self.fs, {"state": "failed", "version": req["version"],
                                   "reason": why, "refused": True},
                         bad_sha=None if release else req["manifest_sha256"],
                         bad_version=req["version"] if release else None)
        except OSError as e:
            self.log("E", "ota record not written: %r" % (e,))
        await self.report()

    async def _trial(self):
        """The first boot of a new version: confirm it once it has shown every sign of
        health, or roll back when it has not within confirm_s, or a task keeps dying."""
        while True:
            unmet, fatal = self.checks()
            if fatal is None and not unmet:
                rec = otaboot.confirm(self.fs)
                self.trial = False
                self.log("I", "version %s confirmed" % rec.get("version"))
                self._set("confirmed", rec.get("version"), name=rec.get("name"))
                return
            up = self.uptime_s()
            if fatal is None and up >= self.confirm_s:
                fatal = "not confirmed within %d s: no %s" % (self.confirm_s, ", ".join(unmet))
            if fatal:
                rec = otaboot.read(self.fs)
                self.log("E", "version %s rolled back: %s" % (rec.get("version"), fatal))
                otaboot.roll_back(self.fs, fatal)
                self._set("rolled_back", rec.get("version"), reason=fatal, name=rec.get("name"))
                await self.report()
                await self.reset("rolling back: " + fatal)
                return
            await asyncio.sleep(1)

    # ---- the download ---------------------------------------------------------------------

    async def _small(self, url):
        out = bytearray()
        # Resumed like a file: from the bytes already kept.
        await self._retrying(lambda: otahttp.get(url, len(out), out.extend, self.buf,
                                                 self.ssl, limit=SIG_MAX - len(out)))
        return bytes(out)

    async def _retrying(self, attempt):
        """attempt() until it succeeds, at most FETCH_TRIES times, with jittered backoff
        between: a server that lags, restarts, answers 404 for a while or sends what was not
        asked is waited for, not taken at its word."""
        n = 0
        while True:
            try:
                return await attempt()
            except otahttp.Transient as e:
                n += 1
                self.stats["retries"] += 1
                if n >= FETCH_TRIES:
                    raise
                d = full_jitter(n - 1, 1, 60, self.rnd)
                self.log("W", "ota download: %s; again in %.1f s" % (e, d))
                self.state["reason"] = "retrying: %s" % e
                await self.report()
                if await self._wait_change(d):
                    raise _Changed()

    async def _download(self, req):
        base = req["url"] if req["url"].endswith("/") else req["url"] + "/"
        rec = otaboot.read(self.fs)
        keys = self.keys(rec)
        if not keys:
            raise Refused("no trusted keys provisioned (ota.keys)", release=False)
        self._set("downloading", req["version"], progress=0)
        await self.report()
        self.slot = otaboot.inactive(rec)
        d = otaboot.slot_dir(self.slot)
        mpath = d + "/manifest.json"
        self._prepare(d, req["manifest_sha256"])
        sha = req["manifest_sha256"]
        # To flash as it arrives, parsed from there: the text is never held in RAM beside its
        # parsed form (a download's peak heap). A server still serving an older manifest (an
        # upload racing the push) is retried like a lost link.
        digest = await self._retrying(lambda: self._checked(
            base + "manifest.json", mpath, None, sha,
            "manifest.json does not have the requested sha256"))
        sig = await self._small(base + "manifest.sig")
        check_signature(digest, sig, keys)
        self._write(d + "/manifest.sig", sig)
        sig = None
        try:
            with self.fs.open(mpath, "rb") as f:
                m = json.load(f)
        except ValueError:
            raise Refused("manifest.json is not JSON")
        check_manifest(m, req, floor=otaboot.floor(rec))
        need = m["total"] + 512 * len(m["files"]) + self.reserve
        st = self.fs.statvfs("/")
        free = st[0] * st[4]
        if need > free:
            raise Refused("the bundle needs %d bytes of flash, %d are free" % (need, free))
        done = 0
        step = m["total"] // 5 or 1
        for path, size, fsha in m["files"]:
            await self._file(base + "files/" + path, d + "/" + path, size, fsha)
            done += size
            if done // step != (done - size) // step:
                pct = min(100, done * 100 // (m["total"] or 1))
                self._set("downloading", req["version"], progress=pct)
                await self.report()
        # Everything again from flash, as the loader will run it; the manifest by its hash,
        # the one the signature was checked over. A file at a time, the loop served between.
        got = self._hash(mpath)
        if got is None or got[1] != sha:
            raise otahttp.BadReply("manifest.json changed on flash after its download")
        for path, size, fsha in m["files"]:
            await asyncio.sleep(0)
            if self._hash(d + "/" + path) != (size, fsha):
                raise otahttp.BadReply("%s changed on flash after its download" % path)
        self._write(d + "/ok", b"1")
        return m

    def _prepare(self, d, sha):
        """The slot ready for this bundle: kept when it holds its manifest already (a
        download resumed after a reboot: its files resume one by one), else emptied. The
        record stops naming it as the slot to fall back to: it is not that any more."""
        self._remove(d + "/ok")  # nothing in it is bootable until checked again
        rec = otaboot.read(self.fs)
        if rec.get("prev") == self.slot:
            rec["prev"] = rec["prev_version"] = rec["prev_name"] = rec["prev_sha"] = None
            otaboot.write(self.fs, rec)
        got = self._hash(d + "/manifest.json")
        if got is None or got[1] != sha:
            self._rmtree(d)
            self._mkdirs(d)

    def _free_slot(self):
        """Empty the inactive slot unless the record keeps it to fall back to: a refused or
        abandoned download leaves nothing behind to fill the flash."""
        rec = otaboot.read(self.fs)
        slot = otaboot.inactive(rec)
        if rec.get("prev") == slot:
            return
        d = otaboot.slot_dir(slot)
        try:
            self.fs.stat(d)
        except OSError:
            return
        self._rmtree(d)
        self.log("I", "ota: slot %s freed" % slot)

    async def _file(self, url, path, size, sha):
        """One file into the slot, hashed as it streams; retried like every download, each
        attempt resuming from what the flash has."""
        self._mkdirs(path.rpartition("/")[0])
        await self._retrying(lambda: self._checked(
            url, path, size, sha, "%s does not have the sha256 of the manifest" % path))

    async def _checked(self, url, path, size, sha, why):
        """One attempt at a file whose sha256 is known: its digest, or BadReply(why) (the
        file removed, to be fetched whole again) when it is not that."""
        h = await self._fetch(url, path, size)
        digest = h.digest()  # once: a MicroPython hash is final after it
        if hexstr(digest) != sha:
            self._remove(path)
            raise otahttp.BadReply(why)
        return digest

    async def _fetch(self, url, path, size):
        """One attempt at the rest of a file (`size` None: not known, at most MANIFEST_MAX):
        the sha256 over all of it on flash. Never more than the manifest allows is written."""
        have, h = self._partial(path, size)
        if have == size:
            return h
        limit = (MANIFEST_MAX if size is None else size) - have

        def sink(mv):
            f.write(mv)
            h.update(mv)
            self.stats["downloaded"] += len(mv)

        f = self.fs.open(path, "ab")
        try:
            total = await otahttp.get(url, have, sink, self.buf, self.ssl, limit=limit)
        finally:
            f.close()
        if size is not None and total != size:
            self._remove(path)
            raise otahttp.BadReply("%s is %d bytes on the server, the manifest says %d"
                                   % (path, total, size))
        return h

    def _partial(self, path, size):
        """(bytes of `path` on flash, a sha256 over them); a file longer than `size` (when
        known) is started again."""
        h = hashlib.sha256()
        try:
            n = self.fs.stat(path)[6]
        except OSError:
            return 0, h
        if size is not None and n > size:
            self._remove(path)
            return 0, h
        with self.fs.open(path, "rb") as f:
            while True:
                k = f.readinto(self.buf)
                if not k:
                    break
                h.update(memoryview(self.buf)[:k])
        return n, h

    def _hash(self, path):
        try:
            n, h = self._partial(path, None)
        except OSError:
            return None
        return n, hexstr(h.digest())

    # ---- flash ------------------------------------------------------------------------------

    def _read(self, path):
        with self.fs.open(path, "rb") as f:
            return f.read()

    def _write(self, path, data):
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def _remove(self, path):
        try:
            self.fs.remove(path)
        except OSError:
            pass

    def _mkdirs(self, d):
        p = ""
        for part in d.strip("/").split("/"):
            p += "/" + part
            try:
                self.fs.mkdir(p)
            except OSError:
                pass  # exists

    def _rmtree(self, d):
        try:
            entries = list(self.fs.ilistdir(d))
        except OSError:
            return
        for e in entries:
            p = d + "/" + e[0]
            if e[1] == 0x4000:
                self._rmtree(p)
            else:
                self._remove(p)
        try:
            self.fs.rmdir(d)
        except OSError:
            pass
