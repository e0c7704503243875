"""fl_client package."""
