"""`python -m fleetmesh.cli`: the `fleetmesh` command."""

from fleetmesh.cli import main

main()
