"""fl_research package: research commands that run both roles (coordinator and sites) on one machine."""
