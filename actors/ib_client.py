"""Which client library the IB actor drives -- ib_insync or ib_async -- and the differences hidden.

``[ib] client`` picks one (default ``"ib_insync"``; ``"ib_async"`` is the
optional extra ``.[ib_async]``). Both speak the same wire protocol through
the same ``IB`` / ``Client`` / ``Wrapper`` objects, so
:class:`actors.ib_session.IbSession` is written once against their shared
surface; what differs is bridged here, and only here:

* **Ticker identity.** The session needs one Ticker per request (reqId), so
  a snapshot and a stream of the same conid never read each other's ticks.
  ib_insync keys its tickers by ``id(contract)``: a Contract copy per
  request is enough, and ``Wrapper.startTicker`` is used as it is.
  ib_async 2.x keys them by ``hash(contract)``, which is the conId: a second
  request of a conid gets the *same* Ticker, and ``ticker2ReqId`` then maps
  it to the later reqId only. For ib_async the Ticker is therefore made
  here and registered in the wrapper's per-reqId maps (``reqId2Ticker``,
  which every tick handler reads, ``ticker2ReqId`` and ``_reqId2Contract``,
  which its error messages read), never in its per-contract ``tickers``.
* Nothing else in what the session uses differs between ib_insync 0.9.86
  and ib_async 2.1 (docs/operations.md, "ib_insync or ib_async", lists
  what was checked).

Neither library is imported before :func:`load_client` is called, so a
config check (:func:`client_problem`) costs no import.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = ["CLIENTS", "ClientLib", "ClientName", "client_problem", "load_client"]

ClientName = Literal["ib_insync", "ib_async"]
#: The client libraries the IB actor can drive, and the extra that installs each.
CLIENTS: Final[dict[str, str]] = {"ib_insync": "the base install", "ib_async": "pip install '.[ib_async]'"}

_MKT_DATA = "mktData"


def client_problem(name: str) -> str | None:
    """Why client library ``name`` cannot be used in this environment, or None (nothing is imported)."""
    if name not in CLIENTS:
        return f"ib.client = {name!r} is not one of {', '.join(repr(c) for c in CLIENTS)}"
    if importlib.util.find_spec(name) is None:
        return f"ib.client = {name!r} but {name} is not installed ({CLIENTS[name]})"
    return None


@dataclass(frozen=True)
class ClientLib:
    """One client library's classes, and its way of giving each market data request its own Ticker."""

    name: str
    IB: type[Any]
    Contract: type[Any]
    Ticker: type[Any]

    def start_ticker(self, wrapper: Any, req_id: int, contract: Any) -> Any:
        """A new Ticker that receives exactly the ticks of ``req_id``, whatever other request shares its conid."""
        if self.name == "ib_insync":
            return wrapper.startTicker(req_id, contract, _MKT_DATA)  # keyed by id(contract): new per copy
        ticker = self.Ticker(contract=contract, defaults=wrapper.defaults)
        wrapper.reqId2Ticker[req_id] = ticker
        wrapper.ticker2ReqId[_MKT_DATA][ticker] = req_id  # Tickers hash by identity
        wrapper._reqId2Contract[req_id] = contract  # its error() names the contract of a failed reqId
        return ticker

    def release_ticker(self, wrapper: Any, req_id: int, contract: Any, ticker: Any) -> None:
        """Forget ``ticker`` in the wrapper (after ``Wrapper.endTicker``); later ticks of ``req_id`` are dropped."""
        if wrapper.reqId2Ticker.get(req_id) is ticker:
            wrapper.reqId2Ticker.pop(req_id, None)
        if self.name == "ib_insync":
            if contract is not None and wrapper.tickers.get(id(contract)) is ticker:
                wrapper.tickers.pop(id(contract), None)
        else:
            wrapper._reqId2Contract.pop(req_id, None)


def load_client(name: str) -> ClientLib:
    """Import client library ``name`` (one of :data:`CLIENTS`); raises ImportError if it is absent."""
    if name not in CLIENTS:
        raise ValueError(client_problem(name))
    module = importlib.import_module(name)
    return ClientLib(name=name, IB=module.IB, Contract=module.Contract, Ticker=module.Ticker)
