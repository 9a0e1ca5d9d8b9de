"""Contract tests: one suite run against every implementation of an actor's messages."""
