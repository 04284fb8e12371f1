"""Partner clients: the interface and the reference client for docs/partner-api.md."""
