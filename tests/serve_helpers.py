"""A tiny-model server for tests: the engine, its expected outputs, and a uvicorn server on a free loopback port."""

from __future__ import annotations

import copy
import socket
import threading
import time

import torch

from specdec import SpecEngine
from specdec.drafters import create_drafter
from tiny_models import VOCAB, tiny_model, word_tokenizer

MODEL = "tiny-qwen2"
EOS = 1
# every message's content followed by a space: the word tokenizer reads it back word for word
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t4{% endif %}"


def chat_tokenizer():
    tokenizer = copy.deepcopy(word_tokenizer())
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def new_engine(verifier: str = "greedy") -> SpecEngine:
    """A draft-model tree engine over the tiny Qwen2 (a different random model drafts: mixed acceptance)."""
    target = tiny_model("qwen2")
    drafter = create_drafter("draft-model", target=target, model=tiny_model("qwen2", seed=1), mode="tree",
                             min_prob=0.0, budget=12)
    return SpecEngine(target, drafter, verifier)


def words(seed: int, n: int) -> str:
    """A prompt of ``n`` random words of the tiny vocabulary (no bos/eos/pad)."""
    ids = torch.randint(5, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return " ".join(f"t{i}" for i in ids)


def expected_text(engine: SpecEngine, tokenizer, text: str, max_tokens: int, chat: bool = False, stop=None,
                  **sampling) -> str:
    """What SpecEngine.generate gives for the same prompt, decoded as the server decodes it (stop string cut)."""
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    result = engine.generate(ids, max_new_tokens=max_tokens, eos_token_id=EOS, **sampling)
    out = tokenizer.decode(result.new_tokens[0].tolist(), skip_special_tokens=True)
    cuts = [i for i in (out.find(s) for s in (stop or [])) if i >= 0]
    return out[:min(cuts)] if cuts else out


class LiveServer:
    """``app`` under uvicorn in a thread, on a port the OS picked on 127.0.0.1."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    @property
    def state(self):
        return self.app.state.server

    def client(self):
        import openai

        # no retries: a 429 must reach the test, not be retried away
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()
