"""roost orchestrator service (built in its own issue)."""
