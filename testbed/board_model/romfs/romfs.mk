# Read after the Unix port's Makefile (make -f Makefile -f romfs.mk): main.c's own
# rom_ioctl, an empty read-only stub, is compiled under another name, so the one in
# romfs_file.c is the port's.
$(BUILD)/main.o: CFLAGS += -Dmp_vfs_rom_ioctl=mp_vfs_rom_ioctl_unix_stub
