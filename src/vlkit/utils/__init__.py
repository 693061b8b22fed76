"""Small helpers used across layers (imports only torch and the config)."""
