"""Look at what backups and migrations do: browse snapshots (FUSE), metrics, a report."""
