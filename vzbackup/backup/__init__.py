"""vzdump-facing backup jobs: modes, hooks, defaults, restore of CTs and vzdump archives."""
