"""Live migration of containers between nodes (vzmigrate equivalent): the SSH link, the
private area's sync, the SOURCE side's phases and the DEST agent (README "Live migration")."""
