"""Run the TWS simulator standalone: ``python -m tests.simulator [--port 7497] [--stocks 300] ...``.

Every flag is a ``SimConfig`` field of the same meaning (see tests/simulator/tws.py).
"""

from __future__ import annotations

import argparse
import signal
import threading

from tests.simulator.tws import TwsSimulator, default_universe


def main() -> None:
    parser = argparse.ArgumentParser(description="Loopback TWS API simulator (127.0.0.1 only)")
    parser.add_argument("--port", type=int, default=7497)
    parser.add_argument("--stocks", type=int, default=300)
    parser.add_argument("--option-strikes", type=int, default=10)
    parser.add_argument("--line-limit", type=int, default=100)
    parser.add_argument("--pacing-limit", type=int, default=50)
    parser.add_argument("--tick-interval", type=float, default=0.25)
    parser.add_argument("--snapshot-delay-min", type=float, default=0.0, help="seconds before a snapshot's quote")
    parser.add_argument("--snapshot-delay-max", type=float, default=0.0, help="upper end of that delay's range")
    parser.add_argument("--snapshot-end-delay", type=float, default=0.02, help="quote -> tickSnapshotEnd, seconds")
    parser.add_argument("--snapshot-rate-limit", type=int, default=0, help="snapshots per second before 321 (0: none)")
    parser.add_argument("--portfolio-interval", type=float, default=0.0, help="updatePortfolio every S s (0: never)")
    parser.add_argument("--market-closed", action="store_true", help="-1 live bid/ask; frozen values with type 2/4")
    parser.add_argument("--unsubscribed", type=int, default=0, help="the last N stocks have no live subscription")
    parser.add_argument("--illiquid", type=int, default=0, help="the first N stocks: -1 bid/ask, only the close")
    parser.add_argument("--server-version", type=int, default=176, help="the handshake's version (157..178)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = default_universe(args.stocks, args.option_strikes)
    config.line_limit = args.line_limit
    config.pacing_limit = args.pacing_limit
    config.tick_interval_s = args.tick_interval
    config.snapshot_delay_min_s = args.snapshot_delay_min
    config.snapshot_delay_max_s = args.snapshot_delay_max
    config.snapshot_end_delay_s = args.snapshot_end_delay
    config.snapshot_rate_limit = args.snapshot_rate_limit
    config.portfolio_interval_s = args.portfolio_interval
    config.market_closed = args.market_closed
    config.seed = args.seed
    stocks = sorted(c for c, contract in config.contracts.items() if contract.sec_type == "STK")
    config.unsubscribed = set(stocks[len(stocks) - args.unsubscribed :]) if args.unsubscribed > 0 else set()
    config.illiquid = set(stocks[: args.illiquid])
    config.server_version = args.server_version
    sim = TwsSimulator(config)
    port = sim.start(args.port)
    print(f"TWS simulator on 127.0.0.1:{port}; Ctrl-C stops it", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    stats = sim.stats()
    sim.stop()
    print(f"stopped: {stats.connections} connections, {stats.messages} messages, max {stats.max_in_window}/window")


if __name__ == "__main__":
    main()
