#!/usr/bin/env python3
"""A fake of Mistral's moderation API for `mistguard bench --moderation-url` (loopback only).

POST /v1/moderations and /v1/chat/moderations with `Authorization: Bearer <any key>`; answers
200 with model `mistral-moderation-2411` and every 2411 category, scored 0.97 when the text holds
`#cat:<category>`, else 0.01. HTTP/1.1 keep-alive, one thread per connection. It measures the
daemon's side of remote moderation, not Mistral's latency.

    python3 benches/fake_mistral.py 18080 &
    mistguard bench --moderation-url http://127.0.0.1:18080
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CATEGORIES = ["sexual", "hate_and_discrimination", "violence_and_threats",
              "dangerous_and_criminal_content", "selfharm", "health", "financial", "law", "pii"]


def result(text):
    scores = {c: (0.97 if f"#cat:{c}" in text else 0.01) for c in CATEGORIES}
    return {"categories": {c: s >= 0.5 for c, s in scores.items()}, "category_scores": scores}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body are two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK add 40 ms to every answer.
    disable_nagle_algorithm = True

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            return self.answer(401, {"message": "Unauthorized"})
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if self.path == "/v1/chat/moderations":
            if inputs and isinstance(inputs[0], dict):
                inputs = [inputs]
            inputs = [conv[-1]["content"] for conv in inputs]
        elif self.path != "/v1/moderations":
            return self.answer(404, {"message": "Not found"})
        self.answer(200, {"id": "fake", "model": "mistral-moderation-2411",
                          "results": [result(t) for t in inputs]})

    def answer(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 18080
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
