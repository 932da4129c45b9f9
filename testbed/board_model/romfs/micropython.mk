# The board model's ROMFS partition over a host file (romfs_file.c).
ROMFS_MOD_DIR := $(USERMOD_DIR)
SRC_USERMOD_C += $(ROMFS_MOD_DIR)/romfs_file.c
