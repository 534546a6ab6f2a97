"""Word count, version 2: the online upgrade of examples/wordcount.py.

Compared with version 1 it inserts a PE that drops stop words between the
splitter and the counter, and the sink prints in a new format. The counts go on
from where version 1 left them: keyed state moves with the upgrade.

    streamctl upgrade examples/wordcount_v2.py
"""

import asyncio

from hotwire import Topology

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "a stream of words flows through the graph",
    "the graph is rewired while the words keep flowing",
)
STOP_WORDS = {"the", "a", "of", "is", "over", "while"}


async def sentences(ctx):
    """One sentence every half second, resuming where an earlier generation stopped."""
    i = ctx.position
    while True:
        yield SENTENCES[i % len(SENTENCES)]
        i += 1
        await asyncio.sleep(0.5)


def split_words(sentence):
    return sentence.split()


def count(acc, word):
    return (acc or 0) + 1


def show(record):
    word, n = record
    print(f"v2 {word:>10} = {n}", flush=True)


app = Topology("wordcount")
words = app.source("sentences", sentences).flat_map("words", split_words)
kept = words.filter("no_stop_words", lambda w: w not in STOP_WORDS)
counts = kept.key_by(lambda w: w).reduce("counts", count, parallelism=2)
counts.sink("print", show)
