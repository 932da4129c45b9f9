# The board model's ROMFS variant: the standard variant's settings (build.sh gives the
# manifest).
