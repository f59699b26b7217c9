"""vzbackup: OpenVZ-style system containers with CRIU checkpoint, backup and migration."""

__version__ = "0.1.0"
