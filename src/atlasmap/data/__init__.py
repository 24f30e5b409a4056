"""AnnData → validated arrays: registry (what a model was set up on), gene/category alignment, loaders."""
