"""Live migration of containers between nodes (vzmigrate equivalent); see issue 4."""
