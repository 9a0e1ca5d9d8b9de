"""The actors: one concept a module, and the public surface other packages use.

Exports are resolved lazily (PEP 562), so importing one actor never imports
every other -- in particular ib_insync is loaded only by whoever uses the
real IB actor.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EventSourcedActor": "actors.base",
    "ask": "actors.messaging",
    "ask_async": "actors.messaging",
    "CommandRejected": "actors.messaging",
    "Rejected": "actors.messaging",
    "Request": "actors.messaging",
    "HandlerSet": "actors.handlers",
    "RegistryActor": "actors.registry",
    "RegistryState": "actors.registry",
    "QueueActor": "actors.queue",
    "QueueState": "actors.queue_state",
    "StreamRouter": "actors.router",
    "RouterSettings": "actors.router",
    "QueueWorker": "actors.worker",
    "WorkerSettings": "actors.worker",
    "IbActor": "actors.ib",
    "FakeIbActor": "actors.fake_ib",
    "FakeIbSettings": "actors.fake_ib",
    "demo_positions": "actors.fake_ib_demo",
    "PositionWriter": "actors.position_writer",
    "Reconciliation": "actors.reconciliation",
    "Config": "actors.config",
    "load_config": "actors.config",
}

__all__ = [
    "CommandRejected",
    "Config",
    "EventSourcedActor",
    "FakeIbActor",
    "FakeIbSettings",
    "HandlerSet",
    "IbActor",
    "PositionWriter",
    "QueueActor",
    "QueueState",
    "QueueWorker",
    "Reconciliation",
    "RegistryActor",
    "RegistryState",
    "Rejected",
    "Request",
    "RouterSettings",
    "StreamRouter",
    "WorkerSettings",
    "ask",
    "ask_async",
    "demo_positions",
    "load_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
