"""roost inventory service (built in its own issue)."""
