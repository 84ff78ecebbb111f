"""The events bounded context."""
