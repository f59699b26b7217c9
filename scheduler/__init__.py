"""Scheduled backup, prune and verify jobs (APScheduler daemon); see issue 6."""
