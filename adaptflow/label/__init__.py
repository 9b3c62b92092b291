"""Target labels a person gives: which images to ask for (`suggest`)."""
