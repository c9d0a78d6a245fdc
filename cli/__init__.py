"""The `cavmae` command line."""
