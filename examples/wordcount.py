"""Word count: sentences, slowly and forever, split into words, counted per word.

Run it with ``streamctl up examples/wordcount.py``; the sink prints ``word count``.
"""

import asyncio

from hotwire import Topology

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "a stream of words flows through the graph",
    "the graph is rewired while the words keep flowing",
)


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
    print(f"{word} {n}", flush=True)


app = Topology("wordcount")
words = app.source("sentences", sentences).flat_map("words", split_words)
counts = words.key_by(lambda w: w).reduce("counts", count, parallelism=2)
counts.sink("print", show)
