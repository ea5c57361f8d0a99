"""The cluster's network plane: sealing of frames and the zenoh transport."""

from shoal.net.config import TransportSettings
from shoal.net.sealing import DropCounters, DropReason, FrameError, Sealer
from shoal.net.transport import Subscription, Transport, TransportClosedError, TransportOpenError

__all__ = [
    "DropCounters",
    "DropReason",
    "FrameError",
    "Sealer",
    "Subscription",
    "Transport",
    "TransportClosedError",
    "TransportOpenError",
    "TransportSettings",
]
