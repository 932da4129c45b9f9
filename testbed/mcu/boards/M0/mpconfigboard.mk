# testbed/mcu M0: the qemu port's MICROBIT board (Cortex-M0, ARMv6-M: the RP2040's instruction
# set, 256 KiB RAM under QEMU) built as ports/rp2 builds: -Os, with py/map.c, py/mpz.c and
# py/vm.c at -O2 (ports/rp2/CMakeLists.txt) and computed goto (common/mpconfigport.h).
include $(TOP)/ports/qemu/boards/MICROBIT/mpconfigboard.mk
include $(BOARD_DIR)/../common/common.mk

$(BUILD)/py/map.o $(BUILD)/py/mpz.o: CFLAGS += -O2
# py/py.mk compiles vm.c and gc.c with $(CSUPEROPT) (-O3); rp2 has vm.c at -O2, gc.c at -Os.
$(BUILD)/py/vm.o: CSUPEROPT = -O2
$(BUILD)/py/gc.o: CSUPEROPT = -Os
