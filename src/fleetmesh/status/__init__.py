"""The status bounded context."""
