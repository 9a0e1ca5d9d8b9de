"""Test helpers other engineers reuse: a message-collecting actor that tests can wait on."""

from tests.support.collector import Collector, CollectorTimeout, Inbox, wait_until

__all__ = ["Collector", "CollectorTimeout", "Inbox", "wait_until"]
