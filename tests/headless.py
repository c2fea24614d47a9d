"""Drive headless Chromium through the DevTools protocol with the standard library only: a
minimal WebSocket client (RFC 6455 text frames) over one page target. Enough to load a page,
wait on a condition in it, read values out of it and take a screenshot; no test dependency
beyond a ``chromium`` binary."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from typing import Any


class Chromium:
    """``with Chromium(binary) as c: c.goto(url); c.wait_for(js); c.evaluate(js)``."""

    def __init__(self, binary: str, width: int = 1280, height: int = 900, timeout: float = 60):
        self.profile = tempfile.TemporaryDirectory(prefix="retrolm-chromium-")
        self.width, self.timeout, self.next_id = width, timeout, 0
        self.events: list[str] = []  # names of the DevTools events received
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        flags += ["--disable-dev-shm-usage", "--remote-debugging-port=0"]
        flags += [f"--user-data-dir={self.profile.name}", f"--window-size={width},{height}"]
        self.proc = subprocess.Popen(
            [binary, *flags, "about:blank"], stderr=subprocess.PIPE, text=True, bufsize=1
        )
        try:
            port = self._devtools_port()
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
            url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
            self.sock = _connect(url)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self) -> int:
        deadline, seen = time.monotonic() + self.timeout, []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            seen.append(line)
            if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                return int(m.group(1))
        raise RuntimeError("chromium did not start its DevTools server:\n" + "".join(seen[-20:]))

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (the names of events in between are kept in
        ``self.events``)."""
        self.next_id += 1
        _send_text(self.sock, json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(_recv_text(self.sock))
            if "method" in msg:
                self.events.append(msg["method"])
            elif msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (a promise is awaited)."""
        r = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def goto(self, url: str) -> None:
        """Load ``url`` and wait for its load event (the old page is gone by then)."""
        self.send("Page.enable")
        self.events = []
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout
        while "Page.loadEventFired" not in self.events:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load within {self.timeout} s")
            msg = json.loads(_recv_text(self.sock))
            self.events.append(msg.get("method", ""))

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # the page is still loading
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{expression!r} stayed false for {timeout or self.timeout} s")

    def screenshot(self, path: str | os.PathLike) -> None:
        """The whole page (not only the window) as a PNG."""
        height = self.evaluate("document.documentElement.scrollHeight")
        clip = {"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1}
        r = self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(r["data"]))

    def close(self) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect(url: str) -> socket.socket:
    """Open a WebSocket (``ws://host:port/path``): the HTTP upgrade handshake."""
    m = re.fullmatch(r"ws://([^:/]+):(\d+)(/.*)", url)
    if m is None:
        raise ValueError(f"not a ws:// URL: {url}")
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    sock = socket.create_connection((host, port), timeout=60)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("the DevTools server closed the connection")
        head += chunk
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(f"WebSocket upgrade refused: {head!r}")
    return sock


def _send_text(sock: socket.socket, text: str) -> None:
    """One masked text frame (a client must mask what it sends)."""
    data, mask = text.encode(), os.urandom(4)
    n = len(data)
    if n < 126:
        header = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    sock.sendall(header + mask + masked)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the DevTools server closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_text(sock: socket.socket) -> str:
    """One whole message (its fragments joined); control frames are skipped."""
    parts = []
    while True:
        b0, b1 = _recv_exact(sock, 2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", _recv_exact(sock, 2))[0]
        elif n == 127:
            n = struct.unpack("!Q", _recv_exact(sock, 8))[0]
        mask = _recv_exact(sock, 4) if b1 & 0x80 else None
        data = _recv_exact(sock, n)
        if mask:
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        opcode = b0 & 0x0F
        if opcode == 0x8:
            raise ConnectionError("the DevTools server closed the WebSocket")
        if opcode in (0x9, 0xA):  # ping / pong
            continue
        parts.append(data)
        if b0 & 0x80:
            return b"".join(parts).decode()
