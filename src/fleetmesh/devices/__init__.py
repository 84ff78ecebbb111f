"""The devices bounded context."""
