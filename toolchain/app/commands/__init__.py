"""One module per group of `toolchain` commands; each registers itself on the shared app."""
