"""An OpenAI-compatible chat endpoint served from the current policy, for agents that run as their own process
(plumbing: nothing here changes a loss). Standard library http.server, loopback by default; one request samples at a
time (HF generate on the live model).

    server = PolicyServer(model, tokenizer, max_new_tokens=64).start()      # server.url = http://127.0.0.1:PORT/v1
    # the agent: POST {url}/chat/completions {"messages": [...], "episode_id": "e1", "max_tokens": 32, "temperature": 1}
    #            (or the X-Episode-Id header), as many turns as it likes, then POST {url}/episodes/e1/reward {"reward": 1}
    trajectories = server.trajectories()   # {episode_id: {prompt_ids, completion_ids, policy_mask, reward, requests}}
    server.stop()

Token bookkeeping (no re-tokenisation drift): an episode keeps the token ids it has seen. The first request's
rendered prompt (chat template, generation prompt) is tokenised once; every later request must repeat the
conversation so far (with the assistant replies as returned): only the new text after it (the next tool / user turn
and the assistant header) is tokenised and appended with policy_mask 0, and the sampled ids are appended as sampled
with policy_mask 1. A request whose history differs from the episode's gets HTTP 409 and changes nothing.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class _Episode:
    def __init__(self, prompt_ids: list[int], prompt_text: str):
        self.prompt_ids, self.text = prompt_ids, prompt_text  # text: what ids render as, up to the last reply
        self.ids: list[int] = []  # completion ids after the prompt
        self.policy: list[int] = []
        self.reward: float | None = None
        self.requests: list[dict] = []


class PolicyServer:
    def __init__(self, model, tokenizer, max_new_tokens: int = 64, temperature: float = 1.0, host: str = "127.0.0.1",
                 port: int = 0, model_name: str = "policy"):
        if tokenizer.chat_template is None:
            raise ValueError("the chat endpoint needs a tokenizer with a chat template")
        self.model, self.tok, self.max_new_tokens, self.temperature = model, tokenizer, max_new_tokens, temperature
        self.host, self.port, self.model_name = host, port, model_name
        self.episodes: dict[str, _Episode] = {}
        self._lock = threading.Lock()
        self._httpd = None

    # ------------------------------------------------------------------ sampling and bookkeeping
    def _render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _sample(self, ids: list[int], max_new_tokens: int, temperature: float) -> tuple[list[int], bool]:
        m = self.model
        device = next(m.parameters()).device
        was_training = m.training
        m.eval()
        x = torch.tensor([ids], device=device)
        out = m.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=temperature > 0,
                         temperature=temperature if temperature > 0 else 1.0, top_k=None, top_p=1.0,
                         max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id,
                         eos_token_id=self.tok.eos_token_id)
        if was_training:
            m.train()
        new = out[0, len(ids):].tolist()
        eos = self.tok.eos_token_id
        if eos in new:
            return new[:new.index(eos) + 1], True
        return new, False

    def chat(self, body: dict, episode_id: str | None) -> tuple[int, dict]:
        """(HTTP status, response body) of one chat-completions request."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, {"error": {"message": "'messages' must be a non-empty list of {role, content}"}}
        episode_id = str(episode_id or body.get("episode_id") or f"anon-{time.time_ns()}")
        text = self._render(messages)
        with self._lock:
            ep = self.episodes.get(episode_id)
            if ep is None:
                ep = _Episode(self._encode(text), text)
                new_obs: list[int] = []
            else:
                if not text.startswith(ep.text):
                    return 409, {"error": {"message": f"episode {episode_id}: the messages do not continue the "
                                           "episode's conversation (send the history with the replies as returned)"}}
                delta = text[len(ep.text):]
                eos = self.tok.eos_token or ""
                if ep.ids and ep.ids[-1] == self.tok.eos_token_id and eos and delta.startswith(eos):
                    delta = delta[len(eos):]  # the sampled EOS is already in the ids
                new_obs = self._encode(delta)
            context = ep.prompt_ids + ep.ids + new_obs
            sampled, ended = self._sample(context, int(body.get("max_tokens") or self.max_new_tokens),
                                          float(body.get("temperature", self.temperature)))
            self.episodes[episode_id] = ep
            ep.ids += new_obs + sampled
            ep.policy += [0] * len(new_obs) + [1] * len(sampled)
            content = self.tok.decode(sampled, skip_special_tokens=True)
            ep.text = text + content
            ep.requests.append({"messages": messages, "response": content, "finish_reason": "stop" if ended
                                else "length"})
        return 200, {"id": f"chatcmpl-{episode_id}-{len(ep.requests)}", "object": "chat.completion",
                     "created": int(time.time()), "model": self.model_name, "episode_id": episode_id,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop" if ended else "length"}],
                     "usage": {"prompt_tokens": len(context), "completion_tokens": len(sampled),
                               "total_tokens": len(context) + len(sampled)}}

    def open_episode(self, episode_id: str, prompt_ids: list[int], prompt_text: str):
        """Register an episode whose prompt the trainer already tokenised (so its trajectory starts with exactly
        those ids); the agent's first request must render to prompt_text (plus anything it appends)."""
        with self._lock:
            self.episodes[episode_id] = _Episode(list(prompt_ids), prompt_text)

    def set_reward(self, episode_id: str, body: dict) -> tuple[int, dict]:
        try:
            reward = float(body["reward"])
        except (KeyError, TypeError, ValueError):
            return 400, {"error": {"message": "send {\"reward\": <number>}"}}
        with self._lock:
            if episode_id not in self.episodes:
                return 404, {"error": {"message": f"no episode {episode_id}"}}
            self.episodes[episode_id].reward = reward
        return 200, {"episode_id": episode_id, "reward": reward}

    def trajectories(self, clear: bool = False) -> dict:
        """{episode_id: {prompt_ids, completion_ids, policy_mask, reward, requests}}; clear: forget them after."""
        with self._lock:
            out = {k: {"prompt_ids": list(e.prompt_ids), "completion_ids": list(e.ids), "policy_mask": list(e.policy),
                       "reward": e.reward, "requests": list(e.requests)} for k, e in self.episodes.items()}
            if clear:
                self.episodes = {}
        return out

    # ------------------------------------------------------------------ HTTP
    def start(self) -> "PolicyServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    return self._reply(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
                self._reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                except json.JSONDecodeError:
                    return self._reply(400, {"error": {"message": "the body is not JSON"}})
                path = self.path.rstrip("/")
                if path == "/v1/chat/completions":
                    return self._reply(*server.chat(body, self.headers.get("X-Episode-Id")))
                parts = path.split("/")
                if len(parts) == 5 and parts[:3] == ["", "v1", "episodes"] and parts[4] == "reward":
                    return self._reply(*server.set_reward(parts[3], body))
                self._reply(404, {"error": {"message": f"no route {self.path}"}})

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
