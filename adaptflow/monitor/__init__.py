"""Scheduled runs: the shift test, the champion re-scored on new data, and the promotion gate."""
