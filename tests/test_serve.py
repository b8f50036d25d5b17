"""``specdec serve`` end to end on a tiny model over loopback: OpenAI's own client on both endpoints, streamed and
not; greedy output equal to SpecEngine.generate; seeded sampling reproducible; 64 concurrent clients (each checked
against its own expected text), 429 exactly past the queue bound; a disconnect mid-stream stops the generation;
every bad input answered with an OpenAI-style error naming the field, and the server serving on afterwards."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette", reason="the serve extra (make test installs it)")
openai = pytest.importorskip("openai", reason="the test extra (make test installs it)")

from serve_helpers import EOS, MODEL, LiveServer, chat_tokenizer, expected_text, new_engine, words  # noqa: E402
from specdec.serve import GenerationService, create_app  # noqa: E402
from specdec.serve.generation import GenerationCancelled  # noqa: E402

MAX_WAITING = 64  # the main server: the load test's 64 clients all fit
BODY_LIMIT = 64 * 1024


def start(max_waiting: int = MAX_WAITING, engine=None) -> LiveServer:
    service = GenerationService(engine or new_engine(), chat_tokenizer(), MODEL, default_max_tokens=16)
    return LiveServer(create_app(service, max_waiting=max_waiting, max_body_bytes=BODY_LIMIT))


@pytest.fixture(scope="module")
def live():
    server = start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ref():
    """A second engine on the same models: the reference outputs."""
    return new_engine()


def post(server: LiveServer, path: str, body: bytes | dict, method: str = "POST") -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(payload) if payload else {}


def get_text(server: LiveServer, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", path)
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def metric(text: str, name: str, **labels) -> float:
    """One sample of a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        m = re.match(rf"specdec_{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def test_models_and_health(live):
    client = live.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, _, body = post(live, "/health", b"", method="GET")
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL


@pytest.mark.parametrize("stream", [False, True])
def test_completion_greedy_equals_engine(live, ref, stream):
    prompt = words(1, 10)
    want = expected_text(ref, chat_tokenizer(), prompt, 24)
    client = live.client()
    if not stream:
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert out.choices[0].text == want
        assert out.object == "text_completion" and out.model == MODEL
        assert out.usage.prompt_tokens == 10 and out.usage.completion_tokens == len(want.split())
        spec = out.model_extra["spec"]
        assert spec["tau"] >= 1 and spec["draft_forwards"] > 0 and spec["target_forwards"] > 0
        return
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.split())


@pytest.mark.parametrize("stream", [False, True])
def test_chat_applies_the_template(live, ref, stream):
    content = words(2, 8)
    want = expected_text(ref, chat_tokenizer(), content, 20, chat=True)
    client = live.client()
    messages = [{"role": "user", "content": content}]
    if not stream:
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
        assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want
        assert out.usage.prompt_tokens == 9  # the 8 words and the template's generation prompt
        return
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and chunks[-1].model_extra["spec"]["tau"] >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_it(live, ref, stream):
    prompt = words(3, 10)
    full = expected_text(ref, chat_tokenizer(), prompt, 24)
    stop = " " + full.split()[6]  # a word the output reaches: the text ends before its first occurrence
    want = full[:full.find(stop)]
    client = live.client()
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                                    stream=stream)
    if stream:
        chunks = list(out)
        assert "".join(c.choices[0].text for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_the_engine_with_the_same_generator(live):
    import torch

    prompt = words(4, 10)
    want = expected_text(new_engine("rejection"), chat_tokenizer(), prompt, 16, do_sample=True, temperature=0.8,
                         generator=torch.Generator().manual_seed(7))
    client = live.client()
    texts = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.8, seed=7)
             .choices[0].text for _ in range(2)]
    assert texts == [want, want]
    greedy = expected_text(new_engine(), chat_tokenizer(), prompt, 16)
    assert want != greedy  # the request did sample (a wrong verifier choice would decode greedily)


def _one_client(live, i: int):
    """Request i of the load test: endpoint, streaming and length vary with i."""
    client = live.client()
    text, n = words(100 + i, 4 + i % 4), 4 + i % 5  # short: 64 of them, and their references, on 2 busy cores
    chat, stream = i % 2 == 1, i % 4 >= 2
    if chat:
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                             max_tokens=n, temperature=0, stream=stream)
        got = "".join(c.choices[0].delta.content or "" for c in out) if stream else out.choices[0].message.content
    else:
        out = client.completions.create(model=MODEL, prompt=text, max_tokens=n, temperature=0, stream=stream)
        got = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
    return text, n, chat, got


def _watch_overlap(service) -> dict:
    """Wrap the engine's generate to record the most calls ever running at once."""
    seen = {"now": 0, "max": 0}
    lock = threading.Lock()
    inner = service.engine.generate

    def generate(*args, **kwargs):
        with lock:
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
        try:
            return inner(*args, **kwargs)
        finally:
            with lock:
                seen["now"] -= 1

    service.engine.generate = generate
    return seen


def test_64_concurrent_clients_each_get_their_own_answer(live, ref):
    seen = _watch_overlap(live.state.service)
    try:
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda i: _one_client(live, i), range(64)))
    finally:
        del live.state.service.engine.generate  # back to the class's method
    assert len(results) == 64
    tok = chat_tokenizer()
    for text, n, chat, got in results:
        assert got == expected_text(ref, tok, text, n, chat=chat), (text, n, chat)
    assert seen["max"] == 1  # never two generations on the engine at once


def test_a_full_queue_answers_429_with_retry_after_and_loses_nothing(ref):
    bound = 4
    server = start(max_waiting=bound)
    try:
        gate = threading.Event()
        blocker = server.state.queue.submit(gate.wait)  # occupies the worker: requests can only wait
        outcomes: list = [None] * 64

        def call(i):
            try:
                outcomes[i] = _one_client(server, i)
            except openai.RateLimitError as exc:
                outcomes[i] = exc

        with ThreadPoolExecutor(64) as pool:
            futures = [pool.submit(call, i) for i in range(64)]
            deadline = time.monotonic() + 30
            while sum(isinstance(o, openai.RateLimitError) for o in outcomes) < 64 - bound:
                assert time.monotonic() < deadline, "the requests past the bound were not refused"
                time.sleep(0.02)
            assert server.state.queue.waiting == bound  # exactly the bound waits; everyone else was told to retry
            gate.set()
            for f in futures:
                f.result()
        blocker.result()
    finally:
        server.stop()
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    served = [o for o in outcomes if isinstance(o, tuple)]
    assert len(refused) == 64 - bound and len(served) == bound
    for exc in refused:
        assert int(exc.response.headers["retry-after"]) >= 1 and exc.body["code"] == "queue_full"
    tok = chat_tokenizer()
    for text, n, chat, got in served:
        assert got == expected_text(ref, tok, text, n, chat=chat)


def test_a_client_that_disconnects_stops_its_generation(ref):
    engine = new_engine()
    steps = {"n": 0}
    propose = engine.drafter.propose

    def slow_propose(state):  # 20 ms a step: a 200-token generation would take seconds
        steps["n"] += 1
        time.sleep(0.02)
        return propose(state)

    engine.drafter.propose = slow_propose
    server = start(engine=engine)
    outcome = {}
    run = server.state.service.run

    def recording_run(*args):
        try:
            return run(*args)
        except GenerationCancelled:
            outcome["cancelled_after_steps"] = steps["n"]
            raise

    server.state.service.run = recording_run
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = {"model": MODEL, "prompt": words(5, 8), "max_tokens": 200, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.read1(4096)  # the first event(s)
        assert first.startswith(b"data: {")
        conn.sock.shutdown(2)
        conn.close()
        deadline = time.monotonic() + 20
        while "cancelled_after_steps" not in outcome:
            assert time.monotonic() < deadline, "the generation went on after the client left"
            time.sleep(0.02)
        assert outcome["cancelled_after_steps"] < 30  # stopped within a few steps, far from 200 tokens
        page = get_text(server, "/metrics")
        assert metric(page, "requests_cancelled_total") == 1
        # the engine is left clean: the next request is exact
        prompt = words(6, 9)
        out = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == expected_text(ref, chat_tokenizer(), prompt, 12)
    finally:
        server.stop()


LONG = " ".join(["t7"] * 300)  # longer than the tiny model's 256-position context
BAD_INPUTS = [
    # (endpoint, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2", 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "t5"}, 404, "model"),
    ("/v1/completions", {"prompt": "t5"}, 422, "model"),
    ("/v1/chat/completions", {"model": MODEL}, 422, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "t5 t6"}, 422, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 422,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "t5"}]}, 422,
     "messages[0].role"),
    ("/v1/completions", {"model": MODEL}, 422, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 422, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "max_tokens": "ten"}, 422, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "max_tokens": 2.5}, 422, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "temperature": "hot"}, 422, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "stream": "yes"}, 422, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "stop": 7}, 422, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "t5"}], "max_tokens": -3},
     400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "t5", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 500]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/completions", b'{"model": "x", "prompt": "' + b"t5 " * BODY_LIMIT + b'"}', 413, None),
    ("/v1/nothing", {"model": MODEL}, 404, None),
]


def test_every_bad_input_gets_an_openai_error_naming_the_field(live, ref):
    for path, body, status, param in BAD_INPUTS:
        got, _, answer = post(live, path, body)
        assert got == status, (path, body if isinstance(body, dict) else body[:40], answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"]
        assert error["param"] == param, error
        if param is not None:
            assert param.split("[")[0] in error["message"], error
    got, _, answer = post(live, "/v1/completions", {"model": MODEL, "prompt": "t5"}, method="GET")
    assert got == 405 and "error" in answer
    prompt = words(7, 9)  # nothing broke: the next request is served normally
    out = live.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected_text(ref, chat_tokenizer(), prompt, 12)


def test_metrics_count_requests_tokens_and_acceptance_by_depth():
    server = start()
    try:
        client = server.client()
        outs = [client.completions.create(model=MODEL, prompt=words(8, 10), max_tokens=20, temperature=0)]
        post(server, "/v1/completions", {"model": MODEL, "prompt": "t5", "max_tokens": 0})
        page = get_text(server, "/metrics")
    finally:
        server.stop()
    spec = outs[0].model_extra["spec"]
    assert metric(page, "requests_total", endpoint="/v1/completions", status="200") == 1
    assert metric(page, "requests_total", endpoint="/v1/completions", status="400") == 1
    assert metric(page, "generation_tokens_total") == outs[0].usage.completion_tokens
    assert metric(page, "prompt_tokens_total") == 10
    assert metric(page, "spec_decode_num_drafts_total") == spec["target_forwards"]
    assert metric(page, "spec_decode_draft_forwards_total") == spec["draft_forwards"]
    assert metric(page, "spec_decode_mean_accepted_length") == pytest.approx(spec["tau"], abs=1e-4)
    for depth, rate in enumerate(spec["acceptance_by_depth"], start=1):
        drafted = metric(page, "spec_decode_num_drafted_by_depth_total", depth=depth)
        accepted = metric(page, "spec_decode_num_accepted_by_depth_total", depth=depth)
        assert (rate is None and drafted == 0) or accepted / drafted == pytest.approx(rate, abs=1e-4)
    assert metric(page, "phase_seconds_total", phase="verify") > 0
    assert "# TYPE specdec_requests_total counter" in page


def test_serve_cli_loads_a_folder_and_refuses_per_request_flags(tmp_path):
    import torch

    from specdec.cli import build_parser, main, settings
    from specdec.serve.cli import build_service
    from tiny_models import tiny_model

    tiny_model("qwen2").save_pretrained(tmp_path / "tiny")
    chat_tokenizer().save_pretrained(tmp_path / "tiny")
    args = build_parser().parse_args(["serve", "--target", str(tmp_path / "tiny"), "--draft", str(tmp_path / "tiny"),
                                      "--drafter", "draft-model", "--dtype", "float32", "--max-new-tokens", "9"])
    service = build_service(settings(args))
    assert service.model_name == "tiny" and service.default_max_tokens == 9
    assert service.engine.drafter.name == "draft-model" and service.sampling_verifier.name == "rejection"
    assert service.engine.target.dtype == torch.float32
    assert main(["serve", "--target", str(tmp_path / "tiny"), "--temperature", "0.7"]) == 2


def test_the_queue_runs_jobs_one_at_a_time_in_arrival_order():
    from specdec.serve.queue import GenerationQueue, QueueFull

    queue = GenerationQueue(max_waiting=3)
    gate, order = threading.Event(), []
    first = queue.submit(gate.wait)
    while not queue.running:
        time.sleep(0.005)
    jobs = [queue.submit(lambda i=i: order.append(i) or i) for i in range(3)]
    with pytest.raises(QueueFull):
        queue.submit(lambda: None)
    gate.set()
    assert [j.result(timeout=10) for j in jobs] == [0, 1, 2] and order == [0, 1, 2] and first.result()
    failing = queue.submit(lambda: 1 / 0)  # a failing job reaches its submitter; the worker goes on
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    assert queue.submit(lambda: "next").result(timeout=10) == "next"
    queue.close()


def test_streamed_text_holds_back_a_possible_stop_string_and_joins_to_the_final_text():
    from specdec.serve.text import TextStream

    tok = chat_tokenizer()
    stream = TextStream(tok, [" t5 t6"])
    assert stream.add([3]) == "t3"
    assert stream.add([5]) == ""  # " t5" may start the stop string
    assert stream.add([7]) == " t5 t7"  # it did not
    assert stream.add([5, 6, 9]) == "" and stream.stopped_by_string
    assert stream.finish() == "" and stream.text == "t3 t5 t7"
    plain = TextStream(tok, [])
    assert "".join([plain.add([3]), plain.add([4, 5]), plain.finish()]) == tok.decode([3, 4, 5])


def test_a_waiting_request_whose_client_left_never_runs():
    server = start()
    calls = {"generate": 0}
    service = server.state.service
    inner = service.engine.generate

    def counting(*args, **kwargs):
        calls["generate"] += 1
        return inner(*args, **kwargs)

    service.engine.generate = counting
    try:
        gate = threading.Event()
        blocker = server.state.queue.submit(gate.wait)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = {"model": MODEL, "prompt": words(9, 6), "max_tokens": 8, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        conn.sock.shutdown(2)
        conn.close()
        deadline = time.monotonic() + 20
        while metric(get_text(server, "/metrics"), "requests_cancelled_total") < 1:
            assert time.monotonic() < deadline, "the disconnect was not noticed"
            time.sleep(0.05)
        assert server.state.queue.waiting == 1
        gate.set()
        blocker.result(timeout=10)
        while server.state.queue.waiting or server.state.queue.running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert calls["generate"] == 0  # skipped: its client was gone before its turn
    finally:
        server.stop()


def test_a_whole_response_request_whose_client_left_is_cancelled():
    engine = new_engine()
    propose = engine.drafter.propose
    engine.drafter.propose = lambda state: time.sleep(0.02) or propose(state)  # seconds for 200 tokens
    server = start(engine=engine)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = {"model": MODEL, "prompt": words(5, 8), "max_tokens": 200, "temperature": 0}  # no early EOS
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 20
        while not server.state.queue.running:
            assert time.monotonic() < deadline, "the request did not start"
            time.sleep(0.01)
        conn.sock.shutdown(2)
        conn.close()
        page = ""
        while metric(page, "requests_cancelled_total") < 1:  # polled every 0.25 s, cancelled at the next step
            assert time.monotonic() < deadline, "the generation went on after the client left"
            time.sleep(0.05)
            page = get_text(server, "/metrics")
        assert metric(page, "generation_tokens_total") == 0  # stopped, not finished
        assert metric(page, "requests_total", endpoint="/v1/completions", status="499") == 1
    finally:
        server.stop()


def test_a_chat_template_error_is_a_400_naming_messages(live):
    strict = chat_tokenizer()
    strict.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}t4"
    service = live.state.service
    before, service.tokenizer = service.tokenizer, strict
    try:
        status, _, answer = post(live, "/v1/chat/completions",
                                 {"model": MODEL, "messages": [{"role": "assistant", "content": "t5"}]})
    finally:
        service.tokenizer = before
    assert status == 400 and answer["error"]["param"] == "messages" and "user first" in answer["error"]["message"]
