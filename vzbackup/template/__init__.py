"""OS templates: the cache of ``NAME.tar.{zst,xz,gz}`` root filesystems and building Debian ones."""
