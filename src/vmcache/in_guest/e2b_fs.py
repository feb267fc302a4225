"""E2B's filesystem calls, guest side (run by the host through the agent): to be written."""
