"""``python -m vzbackup.classic PROG ARGS...``: what the classic wrappers run."""

from vzbackup.classic.run import main

main()
