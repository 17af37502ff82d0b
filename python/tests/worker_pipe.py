"""A worker whose request stream is a real pipe (read through a buffered reader, as the
worker's is) and whose replies are in memory."""

import io
import json
import os

from pyherd_worker import protocol, runtime


class Pipe:
    def __init__(self, codec, limit, idle_spin_us=0):
        self.codec = codec
        read_end, self.write_end = os.pipe()
        self.requests = os.fdopen(read_end, "rb", buffering=1 << 16)
        self.replies = io.BytesIO()
        self.worker = runtime.Worker(self.requests, self.replies, "w1", limit, codec, idle_spin_us=idle_spin_us)

    def send(self, *messages):
        """Writes `messages` to the pipe in one write."""
        data = io.BytesIO()
        for message in messages:
            protocol.write_frame(data, self.codec[1](message))
        os.write(self.write_end, data.getvalue())

    def close_writer(self):
        """Closes the host's end: the worker then reads the end of the stream."""
        if self.write_end is not None:
            os.close(self.write_end)
            self.write_end = None

    def frames(self):
        """The replies written since the last look."""
        self.replies.seek(0)
        out = []
        while (body := protocol.read_frame(self.replies)) is not None:
            out.append(json.loads(body))
        self.replies.seek(0)
        self.replies.truncate()
        return out

    def close(self):
        self.close_writer()
        self.requests.close()
