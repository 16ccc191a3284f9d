"""The local search page: the standard library's HTTP server, one page with no external resources.

GET /            the page (a text box, k, the index it answers from, the ranked images); /?q=TEXT&k=N answers
                 on opening
GET /api/search  ?q=TEXT&k=N -> the CLI's --json answer, plus each image's URL; 400 with {"error"} on bad input
GET /image/KEY   a gallery image's bytes
"""

from __future__ import annotations

import errno
import html
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlparse

from .embed import SearchError

log = logging.getLogger("pipeline.search.serve")


class PortInUse(OSError):
    """The port is taken: the message says which and what to do."""


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Person search: __VARIANT__</title>
<style>
body{font-family:sans-serif;margin:1.5em;background:#fafafa;color:#222}
form{display:flex;gap:.5em;margin-bottom:.6em}
#q{flex:1;font-size:1.05em;padding:.4em}
#k{width:4em}
#index{color:#555;font-size:.85em;margin-bottom:1em}
#status{color:#555;font-size:.9em;min-height:1.2em}
#error{color:#b00020}
#results{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:.4em;text-align:center;font-size:.75em}
figure img{height:160px;image-rendering:pixelated;display:block;margin:auto}
</style></head>
<body>
<h2>Find a person from a description</h2>
<form id="form"><input id="q" name="q" placeholder="a woman in a red coat with a black backpack" autofocus>
<input id="k" name="k" type="number" min="1" value="__TOPK__"><button id="go" type="submit">Search</button></form>
<div id="index">index: __INDEX__</div>
<div id="status"></div><div id="error"></div>
<div id="results"></div>
<script>
const form = document.getElementById("form"), results = document.getElementById("results");
const status = document.getElementById("status"), error = document.getElementById("error");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const q = document.getElementById("q").value, k = document.getElementById("k").value;
  status.textContent = "searching..."; error.textContent = "";
  const response = await fetch("/api/search?q=" + encodeURIComponent(q) + "&k=" + encodeURIComponent(k));
  const answer = await response.json();
  results.replaceChildren();
  if (!response.ok) { status.textContent = ""; error.textContent = answer.error; return; }
  for (const hit of answer.results) {
    const figure = document.createElement("figure");
    figure.className = "hit"; figure.dataset.key = hit.key; figure.dataset.rank = hit.rank;
    const img = document.createElement("img"); img.src = hit.image; img.alt = hit.key;
    const caption = document.createElement("figcaption");
    caption.textContent = "#" + hit.rank + "  " + hit.score.toFixed(4) +
      (hit.person_id === null ? "" : "  id " + hit.person_id);
    const key = document.createElement("div"); key.textContent = hit.key;
    figure.append(img, caption, key); results.append(figure);
  }
  status.textContent = answer.results.length + " results in " + (answer.seconds * 1000).toFixed(0) + " ms" +
    (answer.truncated_tokens ? " (query truncated: " + answer.truncated_tokens + " tokens)" : "");
  status.dataset.done = "1";
  history.replaceState(null, "", "?q=" + encodeURIComponent(q) + "&k=" + encodeURIComponent(k));
});
// a link with ?q=...&k=... answers on opening
const asked = new URLSearchParams(location.search);
if (asked.get("q")) {
  document.getElementById("q").value = asked.get("q");
  if (asked.get("k")) document.getElementById("k").value = asked.get("k");
  form.requestSubmit();
}
</script></body></html>
"""


def page(searcher, top_k: int) -> str:
    described = searcher.index.describe()
    text = (f"{described['folder']} ({described['kind']}, {described['size']} images, dim {described['dim']}), "
            f"gallery {described['gallery']['name']}, model {described['model']['folder']}")
    return (_PAGE.replace("__VARIANT__", html.escape(searcher.variant)).replace("__TOPK__", str(top_k))
            .replace("__INDEX__", html.escape(text)))


def _content_type(payload: bytes) -> str:
    if payload.startswith(b"\x89PNG"):
        return "image/png"
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return "image/webp"
    return "image/jpeg"


def make_server(searcher, top_k: int, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: a free one) answering from `searcher`; PortInUse when taken."""
    lock = threading.Lock()  # one query through the model at a time
    body = page(searcher, min(top_k, len(searcher.index))).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            log.debug("%s %s", self.address_string(), format % args)

        def _send(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self):  # noqa: N802 - the base class's name
            url = urlparse(self.path)
            if url.path == "/":
                return self._send(HTTPStatus.OK, body, "text/html; charset=utf-8")
            if url.path == "/api/search":
                return self._search(parse_qs(url.query))
            if url.path.startswith("/image/"):
                key = unquote(url.path[len("/image/"):])
                try:
                    payload = searcher.image_bytes(key)
                except KeyError:
                    return self._json(HTTPStatus.NOT_FOUND, {"error": f"no image {key} in the gallery"})
                return self._send(HTTPStatus.OK, payload, _content_type(payload))
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {url.path}"})

        def _search(self, query: dict) -> None:
            text = query.get("q", [""])[0]
            try:
                k = int(query.get("k", [str(top_k)])[0])
            except ValueError:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "k must be a whole number"})
            try:
                with lock:
                    answer = searcher.search([text], k)[0]
            except SearchError as err:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            result = answer.to_json()
            for hit in result["results"]:
                hit["image"] = "/image/" + quote(hit["key"], safe="")
            self._json(HTTPStatus.OK, {"index": searcher.index.describe(), **result})

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is in use: stop what holds it, or pick another with --port") from None
        raise
