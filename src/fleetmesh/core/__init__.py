"""The shared kernel: settings, backbone, database, event envelope, auth, errors, observability."""
