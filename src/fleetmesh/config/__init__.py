"""The config bounded context."""
