"""CRIU through pycriu (criu swrk RPC): checks, dump and restore of containers."""
