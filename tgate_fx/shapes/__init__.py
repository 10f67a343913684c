"""A small text-to-image model trained on generated pictures of shapes."""
