"""Saved models: the model card and its weights, and the registry of versions and aliases. Rebuilding and
running a model is `adaptflow.adapt.inference`; export for serving is `adaptflow.serve`."""
