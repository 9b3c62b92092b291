"""Images to embeddings: the backbone registry, weights files, the feature store and the training-image cache."""
