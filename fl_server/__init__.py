"""fl_server package."""
