"""When no market data flowed, as ``what-if`` reads it from the log: runtime downtime and IB's outages.

The reader is fed events with their log timestamps directly, so each case
states exactly what the log held and which periods must come out.
"""

from __future__ import annotations

from events.base import Event
from events.ib import ConnectionState, ConnectionStateChanged
from events.log import RuntimeStarted, RuntimeStopped
from events.queue import ItemClaimed, ItemReleased, ItemSucceeded
from events.router import LineLimitLearned, StreamDemoted, StreamStarted
from storage.recorded_day import OutageWindow, _LogReader

S = 1_000_000  # µs


def _read(events: list[tuple[float, Event]], *, since_s: float | None = None, end_s: float = 100.0) -> list[tuple[float, float]]:
    reader = _LogReader(None if since_s is None else int(since_s * S))
    for t, event in events:
        reader.take(int(t * S), event)
    assert reader.first_start_us is not None
    down = reader.down_periods(reader.first_start_us, int(end_s * S))
    return [(a / S, b / S) for a, b in down]


def _started() -> RuntimeStarted:
    return RuntimeStarted(writer_id="w", pid=1, host="h")


def _ib(state: ConnectionState) -> ConnectionStateChanged:
    return ConnectionStateChanged(state=state)


def _claim(item_id: int) -> ItemClaimed:
    return ItemClaimed(item_id=item_id, conid=1, attempt=1, lease_until_us=0)


def test_an_ib_outage_while_running_is_down_from_when_data_stopped_until_it_flowed() -> None:
    events = [
        (0, _started()),
        (1, _ib(ConnectionState.CONNECTED)),
        (10, _ib(ConnectionState.DISCONNECTED)),
        (20, _ib(ConnectionState.CONNECTED)),
        (30, _ib(ConnectionState.CONNECTIVITY_LOST)),  # 1100: the socket is up, no data
        (35, _ib(ConnectionState.RESTORED_DATA_KEPT)),  # 1102
    ]
    assert _read(events) == [(10, 20), (30, 35)]


def test_an_outage_still_under_way_runs_to_the_end_and_one_before_the_period_is_cut_at_its_start() -> None:
    events = [(0, _started()), (5, _ib(ConnectionState.DISCONNECTED)), (15, _ib(ConnectionState.CONNECTED))]
    events.append((90, _ib(ConnectionState.DISCONNECTED)))
    assert _read(events) == [(5, 15), (90, 100)]
    assert _read(events, since_s=10) == [(10, 15), (90, 100)]


def test_a_stop_ends_an_outage_and_the_gap_to_the_next_start_is_down_once() -> None:
    events = [
        (0, _started()),
        (10, _ib(ConnectionState.DISCONNECTED)),
        (20, RuntimeStopped()),
        (30, _started()),
        (31, _ib(ConnectionState.CONNECTED)),
    ]
    assert _read(events) == [(10, 30)]  # the outage, then the stop: one period, not two overlapping


def test_a_run_killed_without_a_stop_is_down_from_its_last_event_to_the_next_start() -> None:
    events = [(0, _started()), (1, _ib(ConnectionState.CONNECTED)), (12, _claim(1)), (40, _started())]
    assert _read(events) == [(12, 40)]


def test_snapshots_the_connection_cut_are_the_outage_not_farm_blips() -> None:
    """A blip is replayed as cutting every snapshot that ends within a second of it; a drop is an outage.

    Counted as a blip too, a drop would also cut the snapshots that ended in the second before it.
    """
    reader = _LogReader(None)
    reader.take(0, _started())
    for t, item_id, detail in [
        (10, 1, "interrupted: 504"),  # not connected: the socket dropped
        (11, 2, "interrupted: 1100"),  # connectivity between the gateway and IB lost
        (12, 3, "interrupted: None"),  # no answer before the connection went
        (13, 4, "interrupted: 10182"),  # a farm blip: live updates failed
        (14, 5, "interrupted: 10197"),  # a competing session took the data
    ]:
        reader.take(t * S, ItemReleased(item_id=item_id, conid=1, detail=detail))
    assert reader.interruptions == [13 * S, 14 * S]


def test_a_day_run_against_a_gateway_is_paced_and_a_demo_day_is_not() -> None:
    """The IB actor paces what it sends a gateway; the demo's fake IB answers at once. The run in effect when the
    period starts decides how the replay sends (a later run of the other kind does not change it)."""
    for mode, paced in (("run", True), ("demo", False)):
        reader = _LogReader(None)
        reader.take(0, RuntimeStarted(writer_id="w", pid=1, host="h", mode=mode))
        reader.take(50 * S, RuntimeStarted(writer_id="w", pid=2, host="h", mode="demo" if paced else "run"))
        assert reader.paced is paced


def test_a_snapshot_ib_refused_for_the_request_rate_is_kept_with_its_time() -> None:
    """321 "Snapshot requests limitation exceeded": the worker released the item and halved its rate. The
    replay refuses a request at each such time, so its worker slows down when the runtime's did."""
    reader = _LogReader(None)
    reader.take(0, _started())
    reader.take(5 * S, ItemReleased(item_id=1, conid=1, detail="rate_limited: 321"))
    reader.take(6 * S, ItemReleased(item_id=2, conid=1, detail="refused: 101"))
    reader.take(7 * S, ItemReleased(item_id=3, conid=1, detail="interrupted: 10182"))
    assert reader.rate_limited == [5 * S]
    assert reader.interruptions == [7 * S]


def test_a_stream_ib_refused_for_a_reason_other_than_lines_is_kept_with_its_code() -> None:
    """No subscription (10168) or a competing session (10197) refused the stream, and the replayed IB refuses it
    so too; a 101 is the line count's, which the replayed IB decides by itself, and a shed stream has no code."""
    reader = _LogReader(None)
    reader.take(0, _started())
    for t, conid, code in [(1, 7, 10168), (2, 8, 101), (3, 9, None), (4, 7, 10197)]:
        reader.take(t * S, StreamStarted(conid=conid, reason="activated", lines_in_use=1, budget=10))
        reader.take(t * S + 1, StreamDemoted(conid=conid, code=code, reason="refused"))
    assert dict(reader.stream_refusals) == {7: [(1 * S + 1, 10168), (4 * S + 1, 10197)]}


def test_a_period_that_starts_mid_run_is_replayed_as_that_run_not_as_a_restart_inside_it() -> None:
    """--since inside a gateway run with 50 lines, then a demo restart with 30: the run in effect at the start is
    "as run" (its max_lines, its pacer)."""
    reader = _LogReader(10 * S)
    reader.take(0, RuntimeStarted(writer_id="w", pid=1, host="h", mode="run", max_lines=50))
    reader.take(12 * S, _ib(ConnectionState.CONNECTED))
    reader.take(20 * S, RuntimeStopped())
    reader.take(30 * S, RuntimeStarted(writer_id="w", pid=2, host="h", mode="demo", max_lines=30))
    assert reader.running_at_start
    assert (reader.max_lines, reader.paced) == (50, True)


def test_the_101s_the_runtime_met_in_the_period_are_counted_for_the_recorded_row() -> None:
    """A stream demoted for a 101 and a snapshot released for one count; one before the period does not, nor a
    stream shed for a learned limit (no code)."""
    reader = _LogReader(10 * S)
    reader.take(0, _started())
    reader.take(5 * S, ItemReleased(item_id=1, conid=1, detail="refused: 101"))
    reader.take(6 * S, StreamDemoted(conid=5, code=101, reason="IB refused the stream (error 101)"))
    reader.take(11 * S, ItemReleased(item_id=2, conid=1, detail="refused: 101"))
    reader.take(12 * S, StreamDemoted(conid=3, code=101, reason="IB refused the stream (error 101)"))
    reader.take(13 * S, StreamDemoted(conid=4, code=None, reason="line limit 30 learned"))
    assert reader.refusals_101 == 2


def test_a_101_seen_from_both_sides_counts_once_and_one_seen_only_in_the_learned_limit_counts_too() -> None:
    """Stream 8's 101 shows as its demotion and the limit learned from it (one 101); snapshot 9's as the limit
    (logged first, by the router) and the release (by the queue), still one; stream 7 was being shed when its 101
    came, so only the limit shows it. A limit learned without a 101 (max_lines held) is none."""
    reader = _LogReader(None)
    reader.take(0, _started())
    reader.take(1 * S, StreamDemoted(conid=8, code=101, reason="IB refused the stream (error 101)"))
    reader.take(1 * S + 1, LineLimitLearned(limit=40, reason="101 on stream 8"))
    reader.take(2 * S, LineLimitLearned(limit=39, reason="101 on a snapshot of 9"))
    reader.take(2 * S + 5, ItemReleased(item_id=1, conid=9, detail="refused: 101"))
    reader.take(3 * S, LineLimitLearned(limit=38, reason="101 on stream 7"))
    reader.take(4 * S, LineLimitLearned(limit=38, reason="max_lines held without a 101"))
    assert reader.refusals_101 == 3


def test_a_101_that_taught_nothing_is_not_paired_with_a_later_one_of_the_same_contract() -> None:
    """Stream 8 refused (101) without a limit learned (it taught nothing new); a minute later a 101 on it while it
    was being shed shows only as a learned limit: two 101s, not one seen from both sides."""
    reader = _LogReader(None)
    reader.take(0, _started())
    reader.take(1 * S, StreamDemoted(conid=8, code=101, reason="IB refused the stream (error 101)"))
    reader.take(61 * S, LineLimitLearned(limit=40, reason="101 on stream 8"))
    assert reader.refusals_101 == 2


def test_snapshots_excused_in_a_farm_outage_are_their_contracts_windows_not_blips() -> None:
    """The IB actor answers a snapshot that got no price while a farm was down 2103 (2110: the data server): that
    contract's data was away, not every contract's. Each contract's excused snapshots make one window, from the
    claim of the first to the end of the last, closed by its next quote; a blip (10182) stays a moment for all."""
    reader = _LogReader(None)
    reader.take(0, _started())
    item = 0

    def snapshot(conid: int, claimed_s: float, ended_s: float, end: Event | str) -> None:
        nonlocal item
        item += 1
        reader.take(int(claimed_s * S), ItemClaimed(item_id=item, conid=conid, attempt=1, lease_until_us=0))
        if isinstance(end, str):
            end = ItemReleased(item_id=item, conid=conid, detail=end)
        else:
            end = ItemSucceeded(item_id=item, conid=conid)
        reader.take(int(ended_s * S), end)

    snapshot(7, 10, 21, "interrupted: 2103")  # silent: timed out after 11 s
    snapshot(7, 30, 41, "interrupted: 2103")
    snapshot(7, 50, 51, "interrupted: 2103")  # ended without a price
    snapshot(7, 60, 61, ItemSucceeded(item_id=0, conid=7))  # its farm is back
    snapshot(7, 70, 81, "interrupted: 2110")  # later, the data server away
    snapshot(8, 20, 20.5, "interrupted: 10182")  # a blip: every contract's snapshot ending then
    reader.close_outages()
    assert reader.outages == {
        7: [OutageWindow(10 * S, 51 * S, 11.0, 2103, back_us=60 * S), OutageWindow(70 * S, 81 * S, 11.0, 2110)],
    }
    assert reader.interruptions == [int(20.5 * S)]


def test_an_outage_window_ends_when_its_contract_streams_or_the_session_ends_and_never_spans_them() -> None:
    """A window says the contract's snapshots went unanswered from its first excused one to its last. Excused again
    in a later outage, after it streamed, after a restart or a reconnect (the IB actor forgets every outage with
    its session), it opens a new window: one window across them would answer its snapshots without a price all
    that time in a replay that queues it (fewer lines), though IB served it."""
    reader = _LogReader(None)
    reader.take(0, _started())
    item = 0

    def excused(claimed_s: float, ended_s: float) -> None:
        nonlocal item
        item += 1
        reader.take(int(claimed_s * S), ItemClaimed(item_id=item, conid=7, attempt=1, lease_until_us=0))
        reader.take(int(ended_s * S), ItemReleased(item_id=item, conid=7, detail="interrupted: 2103"))

    excused(10, 21)
    reader.take(100 * S, StreamStarted(conid=7))  # activated: streams, and IB serves it
    reader.take(2000 * S, StreamDemoted(conid=7))
    excused(3000, 3011)
    reader.take(3100 * S, RuntimeStopped())
    reader.take(3200 * S, _started())
    excused(4000, 4011)
    reader.take(4100 * S, _ib(ConnectionState.DISCONNECTED))
    reader.take(4200 * S, _ib(ConnectionState.CONNECTED))
    excused(5000, 5011)
    reader.take(5100 * S, _started())  # the run before was killed: no RuntimeStopped
    excused(6000, 6011)
    reader.close_outages()
    assert reader.outages == {
        7: [OutageWindow(t * S, (t + 11) * S, 11.0, 2103) for t in (10, 3000, 4000, 5000, 6000)],
    }


def test_an_excused_snapshot_claimed_before_since_is_no_blip_for_every_contract() -> None:
    """``--since`` in the middle of a farm outage: a snapshot claimed before it and excused after is that
    contract's silence, not a 10182 that would cut every contract's snapshot ending within a second of it."""
    reader = _LogReader(15 * S)
    reader.take(0, _started())
    reader.take(10 * S, ItemClaimed(item_id=1, conid=7, attempt=1, lease_until_us=0))
    reader.take(21 * S, ItemReleased(item_id=1, conid=7, detail="interrupted: 2103"))
    reader.take(22 * S, ItemClaimed(item_id=2, conid=7, attempt=1, lease_until_us=0))
    reader.take(33 * S, ItemReleased(item_id=2, conid=7, detail="interrupted: 2110"))
    reader.close_outages()
    assert reader.interruptions == []
    assert reader.outages == {7: [OutageWindow(22 * S, 33 * S, 11.0, 2110)]}
