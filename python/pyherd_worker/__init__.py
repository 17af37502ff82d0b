"""pyherd_worker: the Python side of pyherd.

Write handlers with the ``handler`` decorator::

    from pyherd_worker import handler

    @handler
    def greet(args, ctx):
        return {"greeting": f"hello {args['name']}", "worker": ctx.worker_id}

and start pyherd with ``--handlers path/to/file.py`` (or a module name).
"""

from .handlers import Context, HandlerError, handler

PROTOCOL_VERSION = 1
__version__ = "0.1.0"

__all__ = ["Context", "HandlerError", "handler", "PROTOCOL_VERSION", "__version__"]
