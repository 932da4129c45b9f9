# Runs one MicroPython test module inside the Unix port: every test_* function, each result
# printed as one "@@MPY {json}" line with the traceback on failure. async tests get a loop.
import io
import json
import sys

path = sys.argv[1]
root = sys.path[0].rsplit("/", 2)[0]
# Ahead of ".frozen": on a build with the firmware frozen in (make board-model) the tests
# still run the source in this checkout, not the copy frozen when it was built.
sys.path[1:1] = [root, root + "/lib"]
sys.path.append(root + "/tests/mpy")
name = path.rsplit("/", 1)[-1][:-3]
mod = __import__(name)

import asyncio

for fn_name in sorted(dir(mod)):
    if not fn_name.startswith("test_"):
        continue
    fn = getattr(mod, fn_name)
    ok, tb = True, ""
    try:
        r = fn()
        if r is not None and hasattr(r, "send"):
            asyncio.run(r)
            asyncio.new_event_loop()
    except Exception as e:
        ok = False
        buf = io.StringIO()
        sys.print_exception(e, buf)
        tb = buf.getvalue()
    print("@@MPY " + json.dumps({"name": fn_name, "ok": ok, "tb": tb}))

import mpyutil

mpyutil.cleanup()
