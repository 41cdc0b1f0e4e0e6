"""The fedmeki silo agent: runs next to a hospital's data and GPU, trains locally, streams deltas up."""
