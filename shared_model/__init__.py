"""shared_model package."""
