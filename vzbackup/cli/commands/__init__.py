"""CLI commands, one module each; a module exports its click commands in ``COMMANDS``."""
