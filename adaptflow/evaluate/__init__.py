"""How well a model does: classification metrics, and prediction at any size."""
