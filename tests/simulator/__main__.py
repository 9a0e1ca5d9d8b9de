"""Run the TWS simulator standalone: ``python -m tests.simulator [--port 7497] [--stocks 300]``."""

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
    args = parser.parse_args()
    config = default_universe(args.stocks, args.option_strikes)
    config.line_limit = args.line_limit
    config.pacing_limit = args.pacing_limit
    config.tick_interval_s = args.tick_interval
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
