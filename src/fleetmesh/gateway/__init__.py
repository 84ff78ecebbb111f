"""The HTTP front: composes the context routers and serves the web console."""
