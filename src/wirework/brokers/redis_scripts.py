"""The Lua scripts of the Redis backend: every state change is one atomic script.

Redis runs a script without interleaving any other command, so each step of
the contract (publish, fetch, ack, nack, dead-letter, release, replay) sees
and leaves a consistent state however many consumers and processes race.
Scripts read before they write wherever a read can fail, because Redis does
not roll back a script that errors half-way.

Every key starts with ``{namespace}:``; the braces make it a Redis Cluster
hash tag, so all keys of a namespace share one slot. ``ARGV[1]`` is always that
prefix. For topic ``T`` and group ``G`` (names never contain ``:``):

============================ ======== =================================================
key                          type     holds
============================ ======== =================================================
``t:T``                      stream   the topic's messages (fields h, b, k, d); one
                                      consumer group per wirework group
``td:T``                     zset     ids of messages published with a delay -> due ms
``tm:T``                     hash     ``added``: messages ever added to the stream;
                                      ``groups``: its group count (from XINFO, set
                                      whenever a group is created or deleted)
``idle:T``                   string   a fetch found nothing: a subscription waits for
                                      a wake-up on channel ``w:T``
``ic:T``                     hash     idle consumer -> "G free lease_ms until_ms": a
                                      publish hands it new messages (see below)
``ih:T``                     hash     consumer -> "n ms": messages handed to it so
                                      far, and when the last one was
``topics``                   set      every topic name, for ``stats()``
``pid:<id>``                 string   a publish already stored (expires): retries dedup
``g:T:G``                    hash     ``base``/``read`` (unread count), ``parked``
``r:T:G``                    stream   replayed messages, for this group alone
``due:T:G``                  zset     waiting copies -> when they may be handed out
``lease:T:G``                zset     held copies -> when their lease runs out
``pdue:T:G``                 hash     parked copies that also wait for a delay
``fail:T:G``                 hash     copy -> first failure ms and last error JSON
``k:T:G:<key>``              list     the group's unsettled copies of one key, in order
``ks:T:G``                   set      the keys that have such a list (to delete a group)
``dlq`` / ``dlqn``           stream   dead letters / hash of counts per "T G"
============================ ======== =================================================

A *member* names one copy: a stream id of ``t:T``, or ``r`` + an id of
``r:T:G``. A copy is held (its member in the lease zset, owned by the holding
consumer in the PEL), waiting (in the due zset, owned by consumer ``-``), or
parked behind an earlier copy of its key (in neither, owned by ``-``). The
PEL delivery count is the attempt number: fetch claims with ``XCLAIM``, which
raises it; parking and giving back use ``JUSTID`` or ``RETRYCOUNT``, which do
not. A settle names (member, consumer, attempt): if the PEL shows another
owner or count, the delivery lost its message and the settle changes nothing.

*Hand-over.* A fetch that empties the group registers its consumer in ``ic:T``
with the room it has left (until a little past its next fetch, so a crashed
process's entry soon counts for nothing). A publish then does that consumer's
fetch itself, for the new message (and whatever else its group has not read),
one consumer per group, and sends what it took in the wake-up on ``w:T``; the
idle subscription hands it out without a fetch of its own: one round trip less
between a publish and its handler. What a publish hands over is counted in
``ih:T``; a fetch subtracts what was handed over but not yet seen by the
subscription (it says how much it saw) from its room, so a wake-up still on
its way never lets a subscription hold more than its prefetch. Pub/sub is at
most once: a hand-over lost on the way stays leased to the consumer, and the
subscription's release hands back its pending copies it never saw; if the
process died, its lease runs out as for any held copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from wirework.brokers.redis_lua import BODIES as _BODIES
from wirework.brokers.redis_lua import HELPERS as _HELPERS


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1, for EVALSHA with a fallback to EVAL.

    ``function`` names the same script in ``LIBRARY`` (Redis 7+ Functions), which a
    link calls with FCALL instead when the server has functions; a script outside
    the library (``function`` None) always runs with EVALSHA.
    """

    name: str
    source: str
    function: str | None = None
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())  # noqa: S324 - Redis names scripts by SHA1


@dataclass(frozen=True)
class Command:
    """One plain command (its arguments follow ``name``) that ``Link.call`` runs under the
    same outcome rules as a script: for a single write that no script needs to wrap.

    A script costs the server its own setup on every call: a reply sent as a script
    around one ``XADD`` took Redis 16 us where the ``XADD`` alone takes 3 us (SLOWLOG
    medians, bench workload 10), on the way to every waiting caller.
    """

    name: str


@dataclass(frozen=True)
class Library:
    """The backend's scripts as one Redis Functions library, loaded once per server.

    A script sent with EVALSHA runs its whole text on every call, helpers
    included (a dozen closures and their upvalues built per call); a function
    library runs that text once, at ``FUNCTION LOAD``, and each FCALL only
    calls into it. The library's name carries a digest of its code, so two
    wirework versions on one server each find their own, and a library once
    loaded never changes under a name.
    """

    name: str
    code: str


def _library() -> Library:
    """Every script as a function of one library: helpers once, one Lua function per script.

    ``P`` is an upvalue of the helpers, set from the call's first argument; each body
    runs as a Lua function whose parameter is named ``ARGV``, so the same text serves
    as an EVAL script and as a function.
    """
    digest = hashlib.sha1(  # noqa: S324 - a name, not a secret
        (_HELPERS + "".join(_BODIES.values())).encode()
    ).hexdigest()[:16]
    name = f"wirework_{digest}"
    parts = [f"#!lua name={name}\nlocal P\n", _HELPERS]
    for script, body in _BODIES.items():
        parts.append(
            f"\nlocal function {script}(ARGV)\n{body}\nend\n"
            f"redis.register_function('{name}_{script}', "
            f"function(_, args) P = args[1] return {script}(args) end)\n"
        )
    return Library(name, "".join(parts))


LIBRARY = _library()


def _script(name: str) -> Script:
    return Script(name, "local P = ARGV[1]\n" + _HELPERS + _BODIES[name], f"{LIBRARY.name}_{name}")


PUBLISH = _script("publish")
JOIN = _script("join")
FETCH = _script("fetch")
ACK = _script("ack")
NACK = _script("nack")
DEAD_LETTER = _script("dead_letter")
RELEASE = _script("release")
REPLAY = _script("replay")
STATS = _script("stats")
DELETE_GROUP = _script("delete_group")

#: What a settle script answers; WOKE: settled, and the next copy of its key is free now.
SETTLED, STALE, GONE, WOKE = 1, 0, 2, 4

#: The fetch script's first value when it handed out all it was asked for (no idle wait).
FILLED = -2

#: Fields per copy in a fetch's answer and in a hand-over: member, attempt, first
#: delivery time, headers, body, has-key flag, key.
ROW_FIELDS = 7

#: What the publish script answers besides SETTLED (stored now).
DUPLICATE, FULL = 2, 3
