"""The TWS simulator's pacing check: the oracle the IB actor's pacing tests rely on.

Driven with explicit arrival times (no server, no clock), so what it counts is exact.
"""

from __future__ import annotations

from tests.simulator import SimConfig, TwsSimulator


def test_the_51st_message_within_a_second_is_refused_as_ib_does() -> None:
    sim = TwsSimulator(SimConfig())
    assert all(sim._count_message(10.0 + i * 0.01, 1) for i in range(50))
    assert not sim._count_message(10.6, 1)  # error 100: "Max rate of messages per second has been exceeded"
    assert sim._count_message(11.02, 1)  # the first ones have left the window
    assert sim._violations == 1


def test_a_window_the_simulator_itself_was_stalled_in_is_not_judged() -> None:
    """Messages that waited in the socket while the simulator's thread did not run arrive as one lump.

    On a busy machine that made a client that kept 45 a second look like 60 in one window.
    """
    sim = TwsSimulator(SimConfig())
    sim._heartbeat_due = 20.0
    sim._note_stall(20.2)  # the thread ran 0.2 s late: it was stalled
    assert all(sim._count_message(20.2, 1) for _ in range(60))
    assert sim._violations == 0
    assert sim._max_in_window == 0
    sim._heartbeat_due = 21.3  # running on time again
    sim._note_stall(21.3)
    assert all(sim._count_message(21.3 + i * 0.001, 1) for i in range(50))  # the lump has left the window
    assert not sim._count_message(21.36, 1)  # and a real burst is judged again
