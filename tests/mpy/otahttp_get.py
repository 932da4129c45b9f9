# Runs firmware/otahttp.get inside the Unix port for tests/host/test_otahttp.py (not a test
# module: the host test starts the file server, runs this and judges). Prints one
# "@@R {json}" line: what get() returned or raised, and what the sink was given.
#
#   micropython tests/mpy/otahttp_get.py '{"url", "start", "limit", "out", ...}'
#
# out: the file the sink appends to. fail_after: the sink raises OSError(ENOSPC) once it
# holds that many bytes. retry_s: a Transient is tried again (as ota.py does) until that
# many seconds have passed, each failure counted in "failures".
import sys

root = sys.argv[0].rsplit("/", 3)[0] if "/" in sys.argv[0] else "."
sys.path[1:1] = [root, root + "/lib"]

import asyncio
import json
import time

from firmware import otahttp

a = json.loads(sys.argv[1])
res = {"sunk": 0, "calls": 0, "biggest": 0, "failures": [], "total": None, "exc": None}
out = open(a["out"], "wb")


def sink(mv):
    if a.get("fail_after") is not None and res["sunk"] >= a["fail_after"]:
        raise OSError(28, "ENOSPC")
    out.write(mv)
    res["sunk"] += len(mv)
    res["calls"] += 1
    res["biggest"] = max(res["biggest"], len(mv))


async def main():
    buf = bytearray(1024)
    until = time.time() + a.get("retry_s", 0)
    while True:
        try:
            return await otahttp.get(a["url"], a["start"], sink, buf, timeout=a.get("timeout", 5),
                                     limit=a.get("limit"))
        except otahttp.Transient as e:
            if time.time() >= until:
                raise
            res["failures"].append(str(e))
            await asyncio.sleep(0.05)


try:
    res["total"] = asyncio.run(main())
except Exception as e:  # noqa: BLE001 - every class that escapes is the result
    res["exc"] = type(e).__name__
    res["msg"] = str(e)
    res["transient"] = isinstance(e, otahttp.Transient)
    res["oserror"] = isinstance(e, OSError)
out.close()
print("@@R " + json.dumps(res))
