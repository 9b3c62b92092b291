"""The adaptflow command line."""
