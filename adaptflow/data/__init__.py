"""Images in: ingesting and validating a dataset into an index, preprocessing for a backbone, and the demo data."""
