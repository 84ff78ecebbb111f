"""The registry bounded context."""
