"""A TWS socket-protocol simulator for tests, benchmarks and the demo (``python -m tests.simulator``)."""

from tests.simulator.tws import SimConfig, SimContract, SimPosition, SimStats, TwsSimulator, default_universe

__all__ = ["SimConfig", "SimContract", "SimPosition", "SimStats", "TwsSimulator", "default_universe"]
