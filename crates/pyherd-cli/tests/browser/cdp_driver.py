"""Drives one page of a running headless Chromium over the DevTools protocol.

Usage: python3 cdp_driver.py DEVTOOLS_HTTP  (e.g. http://127.0.0.1:9222)

Reads one JSON command per line on stdin and answers one JSON line on stdout:
  {"cmd": "navigate", "url": "..."}                    -> {"ok": true} once loaded
  {"cmd": "eval", "expr": "..."}                       -> {"ok": true, "value": ...}
  {"cmd": "screenshot", "path": "...", "width": 1280, "height": 900}
                                                       -> {"ok": true, "bytes": n}
Any failure answers {"ok": false, "error": "..."}; EOF on stdin ends the script.
"""

import base64
import json
import sys
import time
import urllib.request

from websockets.sync.client import connect

TIMEOUT_S = 20.0


class Page:
    def __init__(self, devtools_http: str) -> None:
        with urllib.request.urlopen(devtools_http + "/json/list", timeout=TIMEOUT_S) as r:
            targets = json.load(r)
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=TIMEOUT_S)
        self.next_id = 0
        self.events = []
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, params=None) -> dict:
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{method}: no answer within {TIMEOUT_S} s")
            message = json.loads(self.ws.recv(timeout=left))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message.get("method"))

    def wait_event(self, name: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while name not in self.events:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} within {TIMEOUT_S} s")
            message = json.loads(self.ws.recv(timeout=left))
            self.events.append(message.get("method"))

    def navigate(self, url: str) -> dict:
        self.events.clear()
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"navigation failed: {result['errorText']}")
        self.wait_event("Page.loadEventFired")
        return {}

    def evaluate(self, expr: str) -> dict:
        result = self.send(
            "Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"exception: {result['exceptionDetails'].get('text')}")
        return {"value": result["result"].get("value")}

    def screenshot(self, path: str, width: int, height: int) -> dict:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        with open(path, "wb") as f:
            f.write(data)
        return {"bytes": len(data)}


def main() -> None:
    page = Page(sys.argv[1])
    for line in sys.stdin:
        command = json.loads(line)
        try:
            name = command["cmd"]
            if name == "navigate":
                answer = page.navigate(command["url"])
            elif name == "eval":
                answer = page.evaluate(command["expr"])
            elif name == "screenshot":
                answer = page.screenshot(
                    command["path"], command.get("width", 1280), command.get("height", 900)
                )
            else:
                raise ValueError(f"unknown command {name!r}")
            answer["ok"] = True
        except Exception as e:  # every failure is reported to the test, which decides
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
