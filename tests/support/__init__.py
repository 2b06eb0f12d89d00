"""Helpers and fixtures shared by the test suites (real servers, polling waits)."""
