"""Example handlers: run with `--handlers examples/handlers.py`."""

from pyherd_worker import handler


@handler
def greet(args, ctx):
    """Say hello; `ctx` tells which worker answered."""
    return {"greeting": f"hello, {args.get('name', 'world')}", "worker": ctx.worker_id}


@handler("word_count")
def count_words(args):
    """Count the words of `text` (a handler may take just `args`)."""
    words = args["text"].split()
    return {"words": len(words), "unique": len(set(words))}


@handler
def count(args):
    """Stream {"i": 0} … up to `to` (a generator handler: one chunk per yield)."""
    for i in range(int(args.get("to", 3))):
        yield {"i": i}
