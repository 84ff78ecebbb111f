"""`python -m fleetmesh.cli`: the `fleetmesh` command."""

from fleetmesh.cli import app

app(prog_name="fleetmesh")
