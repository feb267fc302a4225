"""E2B's code interpreter, guest side: one stateful Python context per process: to be written."""
