"""fleetmesh: an IoT platform built as microservices."""

__version__ = "0.1.0"
