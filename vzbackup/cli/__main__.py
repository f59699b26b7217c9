"""``python -m vzbackup.cli`` runs the CLI."""

from vzbackup.cli import main

main()
