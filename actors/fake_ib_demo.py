"""Demo positions for the fake IB: stocks and multi-leg option strategies that look like a real account.

Deterministic for a seed: the same call gives the same conids, strikes and
expiries. Strategies are built the way desks hold them (verticals, iron
condors, straddles, covered calls), with monthly expiries on the third
Friday, strikes on the underlying's strike grid, and multiplier 100.
"""

from __future__ import annotations

import datetime as dt
import random

from events.ib import PositionChanged

__all__ = ["demo_positions"]

_SYMBOLS = (
    "AAPL",
    "MSFT",
    "NVDA",
    "AMZN",
    "GOOGL",
    "META",
    "TSLA",
    "BRK B",
    "JPM",
    "V",
    "UNH",
    "XOM",
    "JNJ",
    "WMT",
    "MA",
    "PG",
    "AVGO",
    "HD",
    "CVX",
    "MRK",
    "ABBV",
    "KO",
    "PEP",
    "COST",
    "ADBE",
    "CRM",
    "BAC",
    "MCD",
    "CSCO",
    "TMO",
    "ACN",
    "NFLX",
    "AMD",
    "LIN",
    "ABT",
    "DHR",
    "DIS",
    "WFC",
    "TXN",
    "VZ",
    "PM",
    "INTC",
    "CMCSA",
    "NKE",
    "ORCL",
    "QCOM",
    "IBM",
    "CAT",
    "GE",
    "AMGN",
    "SPY",
    "QQQ",
    "IWM",
    "DIA",
    "GLD",
    "TLT",
    "XLF",
    "XLE",
    "SMH",
    "ARKK",
)
_ACCOUNT = "DU1234567"
_STOCK_CONID_BASE = 100_000
_OPTION_CONID_BASE = 500_000_000


def _third_friday(year: int, month: int) -> dt.date:
    first = dt.date(year, month, 1)
    friday = first + dt.timedelta(days=(4 - first.weekday()) % 7)
    return friday + dt.timedelta(weeks=2)


def _strike_step(price: float) -> float:
    return 1.0 if price < 50 else 2.5 if price < 100 else 5.0 if price < 500 else 10.0


def demo_positions(n_stocks: int, n_option_strategies: int, seed: int) -> list[PositionChanged]:
    """``n_stocks`` stock positions plus ``n_option_strategies`` strategies (2-4 option legs each)."""
    rng = random.Random(seed)
    out: list[PositionChanged] = []
    prices: dict[str, float] = {}
    symbols = [
        _SYMBOLS[i % len(_SYMBOLS)] + ("" if i < len(_SYMBOLS) else f"{i // len(_SYMBOLS)}")
        for i in range(max(n_stocks, 1))
    ]
    for i in range(n_stocks):
        symbol = symbols[i]
        price = round(rng.uniform(15, 600), 2)
        prices[symbol] = price
        out.append(
            PositionChanged(
                account=_ACCOUNT,
                conid=_STOCK_CONID_BASE + i,
                symbol=symbol,
                sec_type="STK",
                position=float(rng.choice([10, 25, 50, 100, 200, 500, -100])),
                avg_cost=round(price * rng.uniform(0.8, 1.1), 4),
                exchange="SMART",
            )
        )
    today = dt.date(2026, 1, 2)
    next_conid = _OPTION_CONID_BASE
    for k in range(n_option_strategies):
        symbol = symbols[k % len(symbols)]
        price = prices.get(symbol) or round(rng.uniform(15, 600), 2)
        step = _strike_step(price)
        atm = round(price / step) * step
        month = (today.month - 1 + rng.randint(1, 6)) % 12 + 1
        year = today.year + (1 if month <= today.month else 0)
        expiry = _third_friday(year, month).strftime("%Y%m%d")
        kind = rng.choice(["vertical", "iron_condor", "straddle", "covered_call"])
        qty = float(rng.choice([1, 2, 5, 10]))
        legs: list[tuple[str, float, float]] = {  # (right, strike, signed quantity)
            "vertical": [("C", atm, qty), ("C", atm + 2 * step, -qty)],
            "iron_condor": [
                ("P", atm - 4 * step, qty),
                ("P", atm - 2 * step, -qty),
                ("C", atm + 2 * step, -qty),
                ("C", atm + 4 * step, qty),
            ],
            "straddle": [("C", atm, qty), ("P", atm, qty)],
            "covered_call": [("C", atm + 2 * step, -qty)],
        }[kind]
        for right, strike, signed in legs:
            out.append(
                PositionChanged(
                    account=_ACCOUNT,
                    conid=next_conid,
                    symbol=symbol,
                    sec_type="OPT",
                    position=signed,
                    avg_cost=round(rng.uniform(0.5, 15.0) * 100, 4),
                    exchange="SMART",
                    right=right,
                    strike=float(strike),
                    expiry=expiry,
                    multiplier=100.0,
                )
            )
            next_conid += 1
    return out
