"""roost dcsync service (built in its own issue)."""
