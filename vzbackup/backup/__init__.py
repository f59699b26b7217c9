"""Deduplicated backups of containers: repository, modes, prune, restore."""
