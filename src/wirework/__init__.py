"""wirework: one typed service definition, reached over every communication pattern.

The stable names are re-exported here; anything else is reached through its
module. Importing ``wirework`` imports no broker client and no CLI stack.
"""

from wirework.brokers import connect as connect
from wirework.brokers.base import Broker as Broker
from wirework.brokers.base import DeadLetter as DeadLetter
from wirework.brokers.base import DeadLetterReason as DeadLetterReason
from wirework.brokers.base import Delivery as Delivery
from wirework.brokers.base import Subscription as Subscription
from wirework.clock import Clock as Clock
from wirework.consumer import Consumer as Consumer
from wirework.consumer import RetryPolicy as RetryPolicy
from wirework.consumer import Route as Route
from wirework.envelope import Envelope as Envelope
from wirework.envelope import WireMessage as WireMessage
from wirework.errors import ConfigurationError as ConfigurationError
from wirework.errors import Reject as Reject
from wirework.errors import Retry as Retry
from wirework.errors import WireworkError as WireworkError

__version__ = "0.1.0"

__all__ = [
    "Broker",
    "Clock",
    "ConfigurationError",
    "Consumer",
    "DeadLetter",
    "DeadLetterReason",
    "Delivery",
    "Envelope",
    "Reject",
    "Retry",
    "RetryPolicy",
    "Route",
    "Subscription",
    "WireMessage",
    "WireworkError",
    "__version__",
    "connect",
]
