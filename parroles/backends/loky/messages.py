"""The loky channel's own messages, beside the shared ones of ``backends.protocol`` (both sides use them).

A worker says ``Hello`` as it joins the channel; the parent sends ``Cancel``
to the worker running a role that is to stop (its own timeout) and ``Sweep``
when a batch is over. Worker-side code imports this module: it imports
neither duckdb nor the ledger.
"""

from __future__ import annotations

from typing import Any

import msgspec

from parroles.backends.protocol import WIRE, WireMessage


class Hello(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    """A loky worker joined the channel (its first message)."""

    pid: int
    host: str
    slot: int


class Cancel(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    """Parent to worker: the role of ``dispatch_id`` is to stop."""

    dispatch_id: int
    why: str


class Sweep(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    """Parent to worker: the batch is over; end what its roles left running."""


ChannelMessage = WireMessage | Hello | Cancel | Sweep
CHANNEL_WIRE: tuple[type[Any], ...] = (*WIRE, Hello, Cancel, Sweep)
