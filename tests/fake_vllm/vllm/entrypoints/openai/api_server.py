"""A stand-in for vLLM's OpenAI server, for the fast tests of the server
lifecycle (tests/test_serving.py): the same command line, /v1/models,
/health, chat completions that answer with the weights they hold (the name
of the loaded folder's `weights.txt`), and the dev-mode /collective_rpc
reload_weights and /reset_prefix_cache, and with --enable-lora the runtime
/v1/load_lora_adapter (an adapter answers with the base's weights followed by
its folder's `weights.txt`). The real server is in
tests/test_vllm_server.py."""

from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--served-model-name", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--enable-lora", action="store_true")
    args, _ = ap.parse_known_args()
    state = {"weights": Path(args.model, "weights.txt").read_text().strip(), "root": args.model, "resets": 0}
    adapters: dict[str, str] = {}  # name -> folder
    runtime_lora = args.enable_lora and os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self._send(200, {})
            if self.path == "/v1/models":
                cards = [{"id": n, "root": p, "parent": args.served_model_name} for n, p in adapters.items()]
                return self._send(200, {"data": [{"id": args.served_model_name, "root": state["root"]}, *cards]})
            self._send(404, {"error": "not found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.path == "/v1/chat/completions":
                name = body.get("model")
                if name != args.served_model_name and name not in adapters:
                    return self._send(404, {"error": f"model {body.get('model')!r} does not exist"})
                seed = body.get("seed", "none")
                weights = state["weights"] + (f"+{Path(adapters[name], 'weights.txt').read_text().strip()}" if name in adapters else "")
                text = f"Thought: {weights}\nAction: {weights}-{seed}"
                return self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
            if self.path == "/collective_rpc" and os.environ.get("VLLM_SERVER_DEV_MODE") == "1":
                path = body["kwargs"]["weights_path"]
                state["weights"] = Path(path, "weights.txt").read_text().strip()
                return self._send(200, {"results": [None]})
            if self.path == "/v1/load_lora_adapter" and runtime_lora:
                if body["lora_name"] in adapters:
                    return self._send(400, {"error": f"The lora adapter {body['lora_name']!r} has already been loaded."})
                adapters[body["lora_name"]] = body["lora_path"]
                return self._send(200, {})
            if self.path == "/reset_prefix_cache" and os.environ.get("VLLM_SERVER_DEV_MODE") == "1":
                state["resets"] += 1
                return self._send(200, {})
            self._send(404, {"error": "not found"})

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
