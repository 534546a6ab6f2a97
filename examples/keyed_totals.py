"""Keyed totals: orders for a few SKUs, the running amount per SKU."""

import asyncio

from hotwire import Topology

SKUS = ("apple", "pear", "plum", "fig")


async def orders(ctx):
    """Endless orders, ten a second per instance; seq resumes from ctx.position."""
    seq = ctx.position
    while True:
        yield {"seq": seq, "sku": SKUS[seq % len(SKUS)], "amount": 1 + seq % 7}
        seq += 1
        await asyncio.sleep(0.1)


def add_amount(total, order):
    return (total or 0) + order["amount"]


def show(record):
    sku, total = record
    print(f"{sku} {total}", flush=True)


app = Topology("keyed_totals")
totals = (
    app.source("orders", orders)
    .filter("valid", lambda o: o["amount"] > 0)
    .key_by(lambda o: o["sku"])
    .reduce("totals", add_amount, parallelism=2)
)
totals.sink("print", show)
