"""The Nexmark event generator: persons, auctions and bids of an online auction site.

Deterministic: event ``n`` depends only on ``n``'s predecessors and the seed, so
any run (and any resumed source) sees the same events. As in Nexmark, events
come in epochs of 50: 1 person, 3 auctions, 46 bids. Event ``n`` happens at
``n * step_ms`` milliseconds (event time starts at 0), so events are in order.
Auctions are sold by recent persons (a hot seller 3 times in 4, else one of the
last ``NUM_ACTIVE_PEOPLE``); bids go to recent auctions (a hot auction every
other bid, else one of the last ``NUM_IN_FLIGHT_AUCTIONS``) by recent persons
(a hot bidder 3 times in 4). Ids start at 1000, categories at 10, prices are
cents (``round(10 ** (6 * u) * 100)``, u uniform), as in Nexmark. Nexmark's
padding field ``extra`` is left out. Two auctions never close in the same
millisecond (a clash moves the later one's ``expires`` on by 1 ms), so "the
last ten closed auctions" of a seller has a single order.
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


class Generator:
    """Yields Nexmark events as dicts with a ``kind`` of person, auction or bid."""

    def __init__(self, seed: int = SEED, step_ms: int = STEP_MS) -> None:
        self.rng = random.Random(seed)
        self.step_ms = step_ms
        self.closing: set[int] = set()  # expires of auctions still open

    def price(self) -> int:
        return round(10 ** (self.rng.random() * 6) * 100)

    def _recent(self, last: int, hot_ratio: int, active: int) -> int:
        """A base-0 id among the recent ones up to ``last``: hot or one of ``active``."""
        rng = self.rng
        if rng.randrange(hot_ratio) > 0:
            return (last // hot_ratio) * hot_ratio
        k = min(last + 1, active)
        return last + 1 - k + rng.randrange(k)

    def event(self, n: int) -> dict[str, Any]:
        epoch, offset = divmod(n, EPOCH)
        t = n * self.step_ms
        rng = self.rng
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
            seller = self._recent(epoch, HOT_SELLER_RATIO, NUM_ACTIVE_PEOPLE)
            initial = self.price()
            expires = t + rng.randint(1, MAX_AUCTION_MS)
            if len(self.closing) > 4 * MAX_AUCTION_MS // self.step_ms:
                self.closing = {e for e in self.closing if e > t}
            while expires in self.closing:
                expires += 1
            self.closing.add(expires)
            return {
                "kind": "auction",
                "id": FIRST_AUCTION_ID + a,
                "item_name": f"item-{rng.randrange(1000)}",
                "description": f"description-{rng.randrange(1000)}",
                "initial_bid": initial,
                "reserve": initial + self.price(),
                "date_time": t,
                "expires": expires,
                "seller": FIRST_PERSON_ID + seller,
                "category": FIRST_CATEGORY_ID + rng.randrange(NUM_CATEGORIES),
            }
        last_auction = epoch * AUCTION_PROPORTION + AUCTION_PROPORTION - 1
        auction = self._recent(last_auction, HOT_AUCTION_RATIO, NUM_IN_FLIGHT_AUCTIONS)
        bidder = self._recent(epoch, HOT_BIDDER_RATIO, NUM_ACTIVE_PEOPLE)
        return {
            "kind": "bid",
            "auction": FIRST_AUCTION_ID + auction,
            "bidder": FIRST_PERSON_ID + bidder,
            "price": self.price(),
            "channel": CHANNELS[rng.randrange(len(CHANNELS))],
            "url": f"https://www.nexmark.com/item.htm?query=1&channel_id={rng.randrange(1000)}",
            "date_time": t,
        }


def events(
    n: int, seed: int = SEED, step_ms: int = STEP_MS, skip: int = 0
) -> Iterator[dict[str, Any]]:
    """Events ``skip`` to ``n - 1`` of the sequence (the first ``skip`` are made and dropped,
    so the generator's random state is the same as in an uninterrupted run)."""
    g = Generator(seed, step_ms)
    event = g.event
    for i in range(n):
        e = event(i)
        if i >= skip:
            yield e
