"""roost heartbeat service (built in its own issue)."""
