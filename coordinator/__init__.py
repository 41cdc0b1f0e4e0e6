"""The fedmeki coordinator: schedules rounds, receives streamed deltas, aggregates, records everything."""
