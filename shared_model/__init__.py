"""What both roles use, and nothing of either role: the message protocol (`protocol`), the configuration
schemas (`config`), LLNM-Net (`model`), a site's data (`sitedata`, only ever read at a site), evaluation
(`evaluation`), the privacy accounting both sides compute alike (`dp_accounting`), and small utilities
(`fileio`, `environment`, `cli_support`, `text_table`)."""
