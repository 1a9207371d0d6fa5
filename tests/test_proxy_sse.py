"""The proxy's SSE usage filter on its own: whatever way the engine's bytes are cut into reads, the client gets
the same events, and the usage chunk the gateway asked for is captured (and dropped when the client did not ask).

The live tests only ever see whole events per read; TCP does not promise that."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proxy import SSEUsageFilter

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def chunk(text: str) -> bytes:
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
                         "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def stream(texts: list[str], sep: bytes, with_usage: bool) -> tuple[list[bytes], bytes]:
    """The events of a vLLM chat stream, and the usage event among them (b"" when there is none)."""
    usage = (b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
                                       "choices": [], "usage": USAGE}) + sep) if with_usage else b""
    events = [b"data: " + chunk(text) + sep for text in texts]
    return events + ([usage] if usage else []) + [b"data: [DONE]" + sep], usage


def relay(data: bytes, cuts: list[int], strip: bool) -> tuple[bytes, SSEUsageFilter]:
    sse = SSEUsageFilter(strip)
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    out = b"".join(sse.feed(data[a:b]) for a, b in zip(bounds, bounds[1:]))
    return out + sse.flush(), sse


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.text(max_size=12), max_size=6), sep=st.sampled_from([b"\n\n", b"\r\n\r\n"]),
       with_usage=st.booleans(), strip=st.booleans(), cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_any_cut_of_the_stream_relays_the_same_events(texts, sep, with_usage, strip, cuts):
    events, usage = stream(texts, sep, with_usage)
    data = b"".join(events)
    out, sse = relay(data, cuts, strip)
    assert out == (data.replace(usage, b"") if strip and usage else data)
    assert sse.usage == (USAGE if with_usage else None)


def test_nothing_passes_before_an_event_is_whole():
    sse = SSEUsageFilter(strip=True)
    event = b"data: " + chunk("hi") + b"\n\n"
    assert sse.feed(event[:10]) == b""
    assert sse.feed(event[10:-1]) == b""
    assert sse.feed(event[-1:]) == event


def test_a_usage_event_cut_in_two_is_still_recognised_and_dropped():
    events, usage = stream(["a", "b"], b"\n\n", with_usage=True)
    data = b"".join(events)
    middle = data.index(usage) + len(usage) // 2
    out, sse = relay(data, [middle], strip=True)
    assert sse.usage == USAGE and b'"usage"' not in out and out.endswith(b"data: [DONE]\n\n")


def test_content_chunks_that_carry_usage_are_kept():
    """Only the final usage chunk (usage, no choices) is dropped. With vLLM's ``continuous_usage_stats`` every
    content chunk carries a running usage too; those are the client's answer and pass untouched."""
    content = orjson.loads(chunk("hi"))
    running = b"data: " + orjson.dumps({**content, "usage": {"prompt_tokens": 9, "completion_tokens": 1,
                                                              "total_tokens": 10}}) + b"\n\n"
    out, sse = relay(running + b"data: [DONE]\n\n", [len(running) - 3], strip=True)
    assert out == running + b"data: [DONE]\n\n" and sse.usage is None


def test_an_unfinished_tail_is_flushed_as_it_came():
    sse = SSEUsageFilter(strip=True)
    assert sse.feed(b"data: {\"partial") == b""
    assert sse.flush() == b"data: {\"partial"
    assert sse.flush() == b""


def test_an_events_data_is_read_as_the_sse_spec_says():
    """The space after ``data:`` is optional (one is taken off, no more), several data lines join with newlines,
    and an event with no data line (a comment, ``id:`` alone) has none: vLLM writes ``data: ``, but an engine
    behind another server may not, and its first event decides a 503-as-event retry and its usage the ledger."""
    from gateway.proxy import _event_data, _first_data

    assert _event_data(b'data:{"a":1}') == b'{"a":1}'
    assert _event_data(b"data: x\ndata:y\ndata:  z") == b"x\ny\n z"
    assert _event_data(b": keep-alive") is None and _event_data(b"id: 7") is None
    assert _first_data(b": ping\n\nid: 1\n\ndata:{\"b\":2}\n\ndata: later\n\n") == b'{"b":2}'
    assert _first_data(b"data: not whole yet") is None


def test_a_streams_usage_is_counted_once_however_often_its_end_is_seen():
    """A stream's end can be seen twice (its [DONE] relayed, then the client leaving as the engine closes): its
    tokens go into the metrics and the request once."""
    from types import SimpleNamespace

    from gateway.config import default_config
    from gateway.metrics import GatewayMetrics
    from gateway.proxy import Proxy
    from gateway.registry import EngineRegistry

    metrics = GatewayMetrics()
    config = default_config()
    proxy = Proxy(config, EngineRegistry(config, []), metrics)
    job = SimpleNamespace(usage=None, model="m")
    seen = SimpleNamespace(usage={"prompt_tokens": 3, "completion_tokens": 5})
    proxy._count_stream_usage(job, seen)
    proxy._count_stream_usage(job, seen)
    assert job.usage == seen.usage
    text = metrics.render().decode()
    assert 'maestro_tokens_total{kind="completion",model="m"} 5.0' in text
    assert 'maestro_tokens_total{kind="prompt",model="m"} 3.0' in text
