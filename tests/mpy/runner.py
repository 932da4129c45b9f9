# Runs one MicroPython test module inside the Unix port: every test_* function, each result
# printed as one "@@MPY {json}" line with the traceback on failure. async tests get a loop.
import sys

path = sys.argv[1]
root = sys.path[0].rsplit("/", 2)[0]
# Ahead of ".frozen": on a build with the firmware frozen in (make board-model) the tests
# still run the source in this checkout, not the copy frozen when it was built.
sys.path[1:1] = [root, root + "/lib"]
sys.path.append(root + "/tests/mpy")
name = path.rsplit("/", 1)[-1][:-3]
mod = __import__(name)

import mpyutil

mpyutil.run_module(mod)
