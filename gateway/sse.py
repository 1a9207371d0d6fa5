"""An engine's Server-Sent Events as the gateway reads them, on the bytes, without re-encoding what it relays.

Where an event ends (a blank line, in any line ending SSE allows), the stream's ``data: [DONE]``, an event's data,
an engine's error event and the status it stands for, an answer that ended without finishing (``finish_reason``
"abort" or "error"), and :class:`SSEUsageFilter`, which passes whole events on, takes the usage the gateway asked
for, drops its chunk where the client did not ask for it, and moves its ``system_fingerprint`` to the answers'
last chunks, as vLLM places it then. An event is held whole until its end, up to ``MAX_SSE_EVENT_BYTES``.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE_LINES = (b"data: [DONE]", b"data:[DONE]")  # SSE takes the space after the colon as optional
EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")  # a blank line, in each line ending SSE allows (vLLM writes LF)


def through_done(out: bytes) -> bytes | None:
    """``out`` up to the end of its ``data: [DONE]`` line and the blank line after it, where such a line starts
    a line in it (not the words inside an event's JSON, whose line breaks are escaped), else None."""
    for line in DONE_LINES:
        at = out.find(line)
        while at > 0 and out[at - 1] not in b"\r\n":
            at = out.find(line, at + 1)
        if at >= 0:
            end = at + len(line)
            while end < len(out) and out[end] in b"\r\n":
                end += 1
            return out[:end]
    return None


def ends_stream(out: bytes) -> bool:
    """Whether relayed bytes end with the stream's last event, ``data: [DONE]`` (its last bytes only: a chunk may
    be large)."""
    return out[-32:].rstrip().endswith(DONE_LINES)


# The largest SSE event the gateway holds while it waits for the event's end: an engine's runaway event (or one
# framed in no way the gateway knows) grew the gateway by twice its size, 650 MB for a 300 MB event. vLLM's largest
# is a first chunk with a long prompt's prompt_logprobs, tens of MB.
MAX_SSE_EVENT_BYTES = 128 * 2**20


class EventTooLarge(Exception):
    """An engine's SSE event passed ``MAX_SSE_EVENT_BYTES`` before its end."""


_FINISH_MARKERS = (b'"finish_reason":"', b'"finish_reason": "')  # a chunk that ends an answer (else null)


def _names_a_finish(data: bytes) -> bool:
    """Whether ``data`` holds a string ``finish_reason`` (in JSON these bytes are a key and its value, never text
    inside a string, whose quotes are escaped)."""
    return _FINISH_MARKERS[0] in data or _FINISH_MARKERS[1] in data


class SSEUsageFilter:
    """Split an SSE byte stream into whole events; capture the final usage and optionally drop its chunk.

    Only complete events are passed on (a partial event is useless to a client anyway), so a usage chunk split
    across TCP reads is still recognised. The common chunk carries no ``"usage"`` and costs one ``in`` test.

    Where the usage chunk is dropped (``strip``), its ``system_fingerprint`` is put back where vLLM puts it for a
    client that did not ask for usage: on each answer's last chunk (vLLM stamps the usage chunk instead when usage
    is asked for, and the gateway always asks). A chunk that ends an answer is held until the next event: the
    usage chunk, which follows the answers that end in the engine's last step at once, gives them its
    fingerprint; any other event (another answer's chunk: it ended earlier, and its text is not held back for
    the rest of the stream) lets them go as they came.
    """

    __slots__ = ("strip", "usage", "_buffer", "_sep", "_held")

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.usage: dict[str, Any] | None = None
        self._buffer = b""
        self._sep = EVENT_ENDS[0]
        self._held: list[bytes] = []  # whole events (separator included) that end an answer, waiting (strip only)

    def feed(self, data: bytes) -> bytes:
        """The whole events completed by ``data`` (usage chunk removed when asked); keeps the partial rest.

        A partial event grows in place and only the new bytes are searched (with the three before them, where
        a separator may straddle two reads): re-joining and re-searching the whole buffer on every read cost
        quadratic time, 11 s of the event loop for one 16 MB event arriving in 16 KB reads."""
        buffer = self._buffer
        if buffer:
            start = len(buffer) - 3
            buffer += data  # the bytearray, in place
        else:
            start = 0
            buffer = data
        end = buffer.rfind(self._sep, max(start, 0))
        if end < 0 and self._sep == EVENT_ENDS[0]:  # the other framings SSE allows, told by their first event's end
            for sep in EVENT_ENDS[1:]:
                if buffer.find(sep, max(start, 0)) >= 0:
                    self._sep = sep
                    end = buffer.rfind(sep, max(start, 0))
                    break
        if end < 0:
            if len(buffer) > MAX_SSE_EVENT_BYTES:
                raise EventTooLarge(f"an event larger than {MAX_SSE_EVENT_BYTES // 2**20} MiB")
            if buffer is data:
                self._buffer = bytearray(data)
            return b""
        end += len(self._sep)
        if buffer is data:
            complete, rest = data[:end], data[end:]
        else:
            complete, rest = bytes(buffer[:end]), buffer[end:]
        self._buffer = bytearray(rest) if rest else b""
        if self.strip and (self._held or _names_a_finish(complete)):
            return self._filter_events(complete)
        if b'"usage"' not in complete:
            return complete
        return self._filter_events(complete)

    def _filter_events(self, complete: bytes) -> bytes:
        kept = []
        sep = self._sep
        strip = self.strip
        for event in complete.split(sep)[:-1]:
            whole = event + sep
            if b'"usage"' in event:
                data = event_data(_lf_lines(event))
                try:
                    payload = orjson.loads(data) if data is not None else None
                except orjson.JSONDecodeError:
                    payload = None
                if isinstance(payload, dict) and isinstance(payload.get("usage"), dict) and payload["usage"] \
                        and not payload.get("choices"):
                    self.usage = payload["usage"]
                    if strip:
                        fingerprint = payload.get("system_fingerprint")
                        kept.extend(_with_fingerprint(held, fingerprint) for held in self._held)
                        self._held.clear()
                        continue
            elif strip and _ends_an_answer(event):
                self._held.append(whole)
                continue
            if self._held:  # the stream went on without the usage chunk: the held chunks go as they came
                kept.extend(self._held)
                self._held.clear()
            kept.append(whole)
        return b"".join(kept)

    def release(self) -> bytes:
        """The held chunks that end answers, as they came: the stream ends without its usage chunk (the engine
        failed, or the gateway cuts it), and they are the client's answer."""
        held = b"".join(self._held)
        self._held.clear()
        return held

    def flush(self) -> bytes:
        rest, self._buffer = bytes(self._buffer), b""
        return rest


def _ends_an_answer(event: bytes) -> bool:
    """Whether an event is a chunk that ends an answer (a string ``finish_reason``) and carries no
    ``system_fingerprint`` of its own, so that one may be put on it. Bytes only: no parse on the relay's path."""
    return _names_a_finish(event) and b'"system_fingerprint"' not in event


def _with_fingerprint(event: bytes, fingerprint: Any) -> bytes:
    """``event`` (one ``data: {...}`` line and its separator) with ``"system_fingerprint"`` added as its JSON
    object's last member, where vLLM writes it on a chunk that ends an answer (its model's fields after
    ``choices`` are unset there). An event of another form, or no fingerprint, is left as it came."""
    if not isinstance(fingerprint, str):
        return event
    body = event.rstrip(b"\r\n")
    if not body.endswith(b"}") or b"\n" in body or b"\r" in body:  # one data line, as vLLM writes an event
        return event
    return body[:-1] + b',"system_fingerprint":' + orjson.dumps(fingerprint) + b"}" + event[len(body):]


CUT_REASONS = ("abort", "error")  # finish reasons of an answer the engine did not finish (e.g. put to sleep)
_CUT_MARKERS = tuple(f'"finish_reason":{space}"{reason}"'.encode() for reason in CUT_REASONS for space in ("", " "))


def cut_short(events: bytes) -> bool:
    """Whether relayed events end an answer without finishing it: an error event, or a finish_reason of
    "abort" / "error". A cheap byte test (called only on chunks holding one of the two words)."""
    return b'{"error"' in events or any(marker in events for marker in _CUT_MARKERS)


_FINISH_ERROR_MARKERS = tuple(f'"finish_reason":{space}"error"'.encode() for space in ("", " "))


def _sse_events(events: bytes) -> list[bytes]:
    """Whole SSE events as SSE defines them: lines end with CRLF, LF or CR, and a blank line ends an event (vLLM
    writes LF; an engine that wrote CRLF, or an ``event:`` line before its data, had its error event missed)."""
    return _lf_lines(events).split(b"\n\n")


def _lf_lines(events: bytes) -> bytes:
    """``events`` with every line ending (CRLF, LF or CR, as SSE allows) written as LF."""
    return events.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def event_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its ``data:`` lines, one leading space each taken off, joined by newlines), or
    None where it has none (a comment, or ``event:`` / ``id:`` / ``retry:`` alone)."""
    data = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


def first_data(events: bytes) -> bytes | None:
    """The data of the first whole event of ``events`` that has any (comments and field lines alone are no answer
    yet; a part of an event after the last blank line is not read)."""
    return next((data for event in _sse_events(events)[:-1] if (data := event_data(event)) is not None), None)


def _error_event(event: bytes) -> tuple[int, dict] | None:
    """(its code, the error object) for one SSE event (as :func:`_sse_events` gives it) that is an engine's error
    event (``data: {"error": {...}}``), else None; the code is 0 where the event gives none that is a number."""
    return _error_of(event_data(event))


def _error_of(data: bytes | None) -> tuple[int, dict] | None:
    """:func:`_error_event` from an event's data."""
    if data is None or b'"error"' not in data:
        return None
    try:
        error = orjson.loads(data).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    return int(code) if isinstance(code, (int, str)) and str(code).isascii() and str(code).isdigit() else 0, error


def stream_failure(events: bytes) -> tuple[int, str] | None:
    """(status to count, upstream-error reason) for relayed events in which the engine failed the answer: an error
    event (vLLM's EngineCore dying mid-stream sends one with code 500, then ``[DONE]``) counts as the 502 a
    failure before the stream would have been answered, or as the event's own 4xx; a finish_reason "error" as a
    502. None where nothing failed ("abort": put to sleep, or aborted by whoever asked)."""
    for event in _sse_events(events):
        if (failed := _error_event(event)) is not None:
            code = failed[0]
            if 400 <= code <= 499:
                return code, f"http_{code}"
            return 502, f"http_{code}" if 500 <= code <= 599 else "stream_error"
    if any(marker in events for marker in _FINISH_ERROR_MARKERS):
        return 502, "finish_error"
    return None


def first_event_error(head: bytes) -> tuple[int, str, bytes] | None:
    """(status, message, error body) when the stream's first event is an engine's error, else None. vLLM sends
    its 200 at once and reports what fails after it as an error event with the HTTP code it would have answered:
    503 for its back-pressure refusal at add_request, 400 for a request it refuses late, 500 when it failed."""
    if b'"error"' not in head:
        return None
    data = first_data(head)
    failed = _error_of(data)
    if failed is None or not 400 <= failed[0] <= 599:
        return None
    status, error = failed
    return status, str(error.get("message") or "error")[:300], data.strip()  # type: ignore[union-attr]
