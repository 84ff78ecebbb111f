"""The telemetry bounded context."""
