"""OpenVZ-format configuration: vz.conf (node), CTID.conf (container), samples."""
