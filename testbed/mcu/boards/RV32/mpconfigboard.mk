# testbed/mcu RV32: the qemu port's VIRT_RV32 board (rv32imac, like an ESP32-C3) built as
# ports/esp32 builds: computed goto (common/mpconfigport.h) and -O2 throughout
# (CONFIG_COMPILER_OPTIMIZATION_PERF in its sdkconfig.base; build.sh passes COPT=-O2 on the
# make command line, the port's Makefile appends -Os to COPT after this file).
include $(TOP)/ports/qemu/boards/VIRT_RV32/mpconfigboard.mk
include $(BOARD_DIR)/../common/common.mk
