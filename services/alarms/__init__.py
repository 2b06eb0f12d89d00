"""roost alarms service (built in its own issue)."""
