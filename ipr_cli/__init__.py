"""The `ipr` command line."""
