"""The proxy's SSE usage filter on its own: whatever way the engine's bytes are cut into reads, the client gets
the same events, and the usage chunk the gateway asked for is captured (and dropped when the client did not ask,
its ``system_fingerprint`` then put on the answers' last chunks, where vLLM puts it for such a client).

The live tests only ever see whole events per read; TCP does not promise that."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import SSEUsageFilter

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
FINGERPRINT = "vllm-0.32.0-e40258e8"


def chunk(text: str, finish: str | None = None, index: int = 0, fingerprint: str | None = None) -> bytes:
    """A vLLM chat chunk as vLLM 0.32 writes it (``system_fingerprint`` last, where it is set)."""
    payload = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}]}
    if fingerprint is not None:
        payload["system_fingerprint"] = fingerprint
    return orjson.dumps(payload)


def usage_event(sep: bytes = b"\n\n", fingerprint: str | None = FINGERPRINT) -> bytes:
    payload = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
               "usage": USAGE}
    if fingerprint is not None:
        payload["system_fingerprint"] = fingerprint
    return b"data: " + orjson.dumps(payload) + sep


def stream(texts: list[str], sep: bytes, with_usage: bool) -> tuple[list[bytes], bytes]:
    """The events of a vLLM chat stream asked for usage (its last chunk ends the answer, and the usage chunk
    carries the fingerprint), and the usage event among them (b"" when there is none)."""
    usage = usage_event(sep) if with_usage else b""
    events = [b"data: " + chunk(text, "stop" if i == len(texts) - 1 else None) + sep for i, text in enumerate(texts)]
    return events + ([usage] if usage else []) + [b"data: [DONE]" + sep], usage


def without_usage(texts: list[str], sep: bytes) -> bytes:
    """What vLLM sends a client that did not ask for usage: the same, its fingerprint on the last chunk."""
    events = [b"data: " + chunk(text, *(("stop", 0, FINGERPRINT) if i == len(texts) - 1 else ())) + sep
              for i, text in enumerate(texts)]
    return b"".join(events) + b"data: [DONE]" + sep


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
    assert out == (without_usage(texts, sep) if strip and usage else data)
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


def test_the_fingerprint_goes_on_every_answer_that_ends_with_the_stream():
    """vLLM stamps ``system_fingerprint`` on each answer's last chunk for a client that did not ask for usage, and
    on the usage chunk instead when usage is asked for (which the gateway always does). The answers that end in
    the engine's last step come right before the usage chunk and get its fingerprint; an answer that ended
    earlier is not held back for the rest of the stream, and goes as it came at the next event."""
    sep = b"\n\n"
    early_end, later, last_a, last_b = (chunk("x", "length", 0), chunk("y", None, 1), chunk("z", "length", 1),
                                        chunk("w", "stop", 2))
    data = (b"".join(b"data: " + c + sep for c in (early_end, later, last_a, last_b)) + usage_event()
            + b"data: [DONE]\n\n")
    out, sse = relay(data, [], strip=True)
    stamped = [chunk("z", "length", 1, FINGERPRINT), chunk("w", "stop", 2, FINGERPRINT)]
    assert out == b"".join(b"data: " + c + sep for c in (early_end, later, *stamped)) + b"data: [DONE]\n\n"
    assert [orjson.loads(e[6:]) for e in out.split(sep)[2:4]] == [orjson.loads(c) for c in stamped]  # valid JSON
    assert sse.usage == USAGE
    # asked for usage: the engine's bytes as they came, the fingerprint on the usage chunk
    assert relay(data, [], strip=False)[0] == data


def test_a_last_chunk_waits_for_the_next_event_only():
    """Held until the next whole event, and no longer: nothing of a stream without a usage chunk (an engine that
    sends none, or an error event) is lost or reordered, and ``release`` gives what is held when the stream ends
    without another event."""
    sse = SSEUsageFilter(strip=True)
    last = b"data: " + chunk("z", "stop") + b"\n\n"
    assert sse.feed(b"data: " + chunk("a") + b"\n\n" + last) == b"data: " + chunk("a") + b"\n\n"
    error = b'data: {"error": {"message": "boom", "code": 500}}\n\n'
    assert sse.feed(error) == last + error
    assert sse.feed(last) == b"" and sse.release() == last and sse.release() == b""
    assert sse.feed(last) == b"" and sse.feed(b"data: [DONE]\n\n") == last + b"data: [DONE]\n\n"
    # an engine without a fingerprint (vLLM's --fingerprint-mode none): the chunk as it came, the usage dropped
    assert sse.feed(last + usage_event(fingerprint=None)) == last and sse.usage == USAGE
    # a chunk that has its own fingerprint is not held, and not stamped twice
    own = b"data: " + chunk("z", "stop", 0, "other") + b"\n\n"
    assert sse.feed(own) == own and sse.feed(usage_event()) == b""


def test_a_fingerprint_goes_only_on_a_chunk_it_can_be_appended_to():
    """The fingerprint is appended to the event's JSON object; an event written over several data lines, or
    whose data is no object, goes as it came (still valid, just unstamped)."""
    sse = SSEUsageFilter(strip=True)
    multi = b'data: {"choices": [{"index": 0,\ndata: "finish_reason": "stop"}]}\n\n'
    assert sse.feed(multi + usage_event()) == multi
    crlf = b"data: " + chunk("z", "stop") + b"\r\n\r\n"
    sse = SSEUsageFilter(strip=True)
    assert sse.feed(crlf + usage_event(b"\r\n\r\n")) == b"data: " + chunk("z", "stop", 0, FINGERPRINT) + b"\r\n\r\n"


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
    from gateway.sse import event_data, first_data

    assert event_data(b'data:{"a":1}') == b'{"a":1}'
    assert event_data(b"data: x\ndata:y\ndata:  z") == b"x\ny\n z"
    assert event_data(b": keep-alive") is None and event_data(b"id: 7") is None
    assert first_data(b": ping\n\nid: 1\n\ndata:{\"b\":2}\n\ndata: later\n\n") == b'{"b":2}'
    assert first_data(b"data: not whole yet") is None


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
