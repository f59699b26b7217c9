"""Storage backends for the backup repository (local directory, S3); see issues 3 and 5."""
