"""The Nexmark event generator: persons, auctions and bids of an online auction site.

Deterministic and splittable: the events come in chunks of :data:`CHUNK`, and
chunk ``c`` draws its randomness from a generator seeded by ``(seed, c)``
alone, so any chunk can be made without the ones before it (as Nexmark's own
generator derives each event from its number). :func:`events` with ``parts=p``
and ``part=i`` yields the chunks ``c`` with ``c % p == i``, in order; the ``p``
parts together hold exactly the events of one unsplit run. As in Nexmark,
events come in epochs of 50: 1 person, 3 auctions, 46 bids. Event ``n`` happens
at ``n * step_ms`` milliseconds (event time starts at 0), so events are in order
within a part.
Auctions are sold by recent persons (a hot seller 3 times in 4, else one of the
last ``NUM_ACTIVE_PEOPLE``); bids go to recent auctions (a hot auction every
other bid, else one of the last ``NUM_IN_FLIGHT_AUCTIONS``) by recent persons
(a hot bidder 3 times in 4). Ids start at 1000, categories at 10, prices are
cents (``round(10 ** (6 * u) * 100)``, u uniform), as in Nexmark. Nexmark's
padding field ``extra`` is left out. Two auctions never close in the same
millisecond: auction ``a`` closes at a time ``≡ a (mod K)`` within
``MAX_AUCTION_MS`` of its start, where ``K`` (:func:`expiry_modulus`) is more
auctions than start within ``MAX_AUCTION_MS``; so "the last ten closed
auctions" of a seller has a single order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

PERSON_PROPORTION, AUCTION_PROPORTION, BID_PROPORTION = 1, 3, 46
EPOCH = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION  # 50 events
FIRST_PERSON_ID = 1000
FIRST_AUCTION_ID = 1000
FIRST_CATEGORY_ID = 10
NUM_CATEGORIES = 5
HOT_SELLER_RATIO = 4
HOT_AUCTION_RATIO = 2
HOT_BIDDER_RATIO = 4
NUM_ACTIVE_PEOPLE = 1000
NUM_IN_FLIGHT_AUCTIONS = 100
MAX_AUCTION_MS = 20_000  # an auction is open for 1 ms to 20 s of event time
STEP_MS = 10  # event time between two events
SEED = 2026
CHUNK = 100  # events per chunk of randomness (2 epochs, 1 s of event time at STEP_MS)

US_STATES = ["AZ", "CA", "ID", "OR", "WA", "WY"]
US_CITIES = [
    "Phoenix", "Los Angeles", "San Francisco", "Boise", "Portland",
    "Bend", "Redmond", "Seattle", "Kent", "Cheyenne",
]  # fmt: skip
FIRST_NAMES = [
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter",
]  # fmt: skip
LAST_NAMES = [
    "Shultz",
    "Abrams",
    "Spencer",
    "White",
    "Bartels",
    "Walton",
    "Smith",
    "Jones",
    "Noris",
]
CHANNELS = ["Google", "Facebook", "Baidu", "Apple"]


def person_reach_ms(step_ms: int = STEP_MS) -> int:
    """The longest event time from a person to an auction that names it as seller."""
    return NUM_ACTIVE_PEOPLE * EPOCH * step_ms


def expiry_modulus(step_ms: int = STEP_MS) -> int:
    """``K``: auctions ``K`` or more apart in number start ``MAX_AUCTION_MS`` or more
    apart in time, so closing times that differ mod ``K`` never meet."""
    # a2 - a1 >= K puts their epochs (K - 2) / 3 apart: 50 * (K - 2) / 3 - 2 events.
    k = 2 + -(-3 * (MAX_AUCTION_MS // step_ms + 3) // EPOCH)
    if k > MAX_AUCTION_MS:
        raise ValueError(f"step_ms={step_ms} is too small for auctions of {MAX_AUCTION_MS} ms")
    return k


def chunk_rng(seed: int, chunk: int) -> random.Random:
    """The random generator of chunk ``chunk``: seeded by the seed and the chunk alone."""
    return random.Random(seed << 40 | chunk)


class Generator:
    """Makes Nexmark events as dicts with a ``kind`` of person, auction or bid;
    :meth:`event` takes the random generator of the event's chunk."""

    def __init__(self, seed: int = SEED, step_ms: int = STEP_MS) -> None:
        self.seed = seed
        self.step_ms = step_ms
        self.modulus = expiry_modulus(step_ms)

    def _recent(self, rng: random.Random, last: int, hot_ratio: int, active: int) -> int:
        """A base-0 id among the recent ones up to ``last``: hot or one of ``active``."""
        if rng.randrange(hot_ratio) > 0:
            return (last // hot_ratio) * hot_ratio
        k = min(last + 1, active)
        return last + 1 - k + rng.randrange(k)

    def event(self, n: int, rng: random.Random) -> dict[str, Any]:
        epoch, offset = divmod(n, EPOCH)
        t = n * self.step_ms
        if offset < PERSON_PROPORTION:
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            card = " ".join(f"{rng.randrange(10000):04d}" for _ in range(4))
            return {
                "kind": "person",
                "id": FIRST_PERSON_ID + epoch,
                "name": f"{first} {last}",
                "email": f"{first.lower()}@{last.lower()}.com",
                "credit_card": card,
                "city": rng.choice(US_CITIES),
                "state": rng.choice(US_STATES),
                "date_time": t,
            }
        if offset < PERSON_PROPORTION + AUCTION_PROPORTION:
            a = epoch * AUCTION_PROPORTION + offset - PERSON_PROPORTION
            seller = self._recent(rng, epoch, HOT_SELLER_RATIO, NUM_ACTIVE_PEOPLE)
            initial = _price(rng)
            k = self.modulus
            expires = t + rng.randint(1, MAX_AUCTION_MS - k + 1)
            expires += (a - expires) % k  # unique: see expiry_modulus
            return {
                "kind": "auction",
                "id": FIRST_AUCTION_ID + a,
                "item_name": f"item-{rng.randrange(1000)}",
                "description": f"description-{rng.randrange(1000)}",
                "initial_bid": initial,
                "reserve": initial + _price(rng),
                "date_time": t,
                "expires": expires,
                "seller": FIRST_PERSON_ID + seller,
                "category": FIRST_CATEGORY_ID + rng.randrange(NUM_CATEGORIES),
            }
        last_auction = epoch * AUCTION_PROPORTION + AUCTION_PROPORTION - 1
        auction = self._recent(rng, last_auction, HOT_AUCTION_RATIO, NUM_IN_FLIGHT_AUCTIONS)
        bidder = self._recent(rng, epoch, HOT_BIDDER_RATIO, NUM_ACTIVE_PEOPLE)
        return {
            "kind": "bid",
            "auction": FIRST_AUCTION_ID + auction,
            "bidder": FIRST_PERSON_ID + bidder,
            "price": _price(rng),
            "channel": CHANNELS[rng.randrange(len(CHANNELS))],
            "url": f"https://www.nexmark.com/item.htm?query=1&channel_id={rng.randrange(1000)}",
            "date_time": t,
        }


def _price(rng: random.Random) -> int:
    return round(10 ** (rng.random() * 6) * 100)


def part_chunks(n: int, part: int = 0, parts: int = 1) -> range:
    """The chunks of part ``part`` of ``parts`` among the first ``n`` events."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}: give 0 <= part < parts")
    return range(part, -(-n // CHUNK), parts)


def part_size(n: int, part: int = 0, parts: int = 1) -> int:
    """How many of the first ``n`` events part ``part`` of ``parts`` holds."""
    return sum(min(CHUNK, n - c * CHUNK) for c in part_chunks(n, part, parts))


def events(
    n: int,
    seed: int = SEED,
    step_ms: int = STEP_MS,
    skip: int = 0,
    part: int = 0,
    parts: int = 1,
) -> Iterator[dict[str, Any]]:
    """Part ``part`` of ``parts`` of the first ``n`` events (the chunks ``c`` with
    ``c % parts == part``, in order), from its ``skip``-th event on. ``parts=1``:
    events 0 to ``n - 1`` in order."""
    g = Generator(seed, step_ms)
    event = g.event
    chunks = part_chunks(n, part, parts)
    first, drop = divmod(skip, CHUNK)
    for c in chunks[first:]:
        rng = chunk_rng(seed, c)
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        for i in range(lo, hi):
            e = event(i, rng)
            if drop:
                drop -= 1  # made for its randomness, not yielded
                continue
            yield e
