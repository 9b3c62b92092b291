"""Saved models: the model card and its weights, the registry of versions and aliases, and export for serving."""
