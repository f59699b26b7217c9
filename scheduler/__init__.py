"""The scheduler daemon: backup, prune, verify and restore-test jobs on calendar schedules.

``config`` reads jobs.cfg, ``calendar`` turns Proxmox calendar events and cron lines into
APScheduler triggers, ``daemon`` runs them (SQLite job store and history in ``history``),
``runner`` executes one job as vzbackup commands, ``notify`` mails and posts webhooks.
"""
