"""Prefect flows: wiring only. Each reads as the list of its stages."""
