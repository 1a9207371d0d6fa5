"""What a simulated answer holds, whole and streamed, in vLLM 0.32's shapes.

Its text (filler words, JSON for a ``response_format``, a forced tool call's JSON), its logprobs, a whole
answer's message, and the bytes of a stream's events (:class:`SseEvents` and the JSON and tool-call variants):
pre-encoded fragments (:class:`SseShape`) concatenated on the hot path, no dict and no JSON encoder per token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import orjson

from backends.sim.engine import SimRequest
from backends.sim.filler import filler_text
from backends.sim.logprobs import EOS_TOKEN, LogprobsPlan, merge_blocks
from backends.sim.prompt_tokens import PromptReturn, token_id
from backends.sim.request_parsing import Parsed
from backends.sim.responses import utf8_failure
from backends.sim.tool_calls import ToolCallPlan, new_tool_call_id


def chunk_interval(p: Parsed) -> int:
    """How many new tokens a stream's chunk waits for after the first (vLLM's ``stream_interval``: the request's,
    at least the engine's, 1)."""
    return (p.extras.stream_interval or 1) if p.extras is not None else 1


class SseEvents:
    """The events of one stream, as bytes: the role chunk, a chunk of new tokens, the end (usage chunk where
    asked for, ``[DONE]``). One builder for the one-answer and the several-answer writers, which differ only in
    which answers' chunks they send when."""

    __slots__ = ("head", "shape", "prompt", "total_prompt", "continuous_usage", "include_usage", "fingerprint",
                 "logprobs", "text_offset", "returned", "prompt_index", "parsed", "req")

    def __init__(self, head: bytes, shape: SseShape, p: Parsed, prompt: int, fingerprint_json: bytes,
                 total_prompt: int | None = None) -> None:
        self.head = head
        self.shape = shape
        self.prompt = prompt  # this answer's prompt (continuous usage)
        self.total_prompt = prompt if total_prompt is None else total_prompt  # every prompt once (the usage chunk)
        self.continuous_usage = p.continuous_usage
        self.include_usage = p.include_usage
        self.fingerprint = b',"system_fingerprint":' + fingerprint_json
        self.logprobs: LogprobsPlan | None = p.logprobs  # (an answer's own events where set: text_offset goes on)
        self.text_offset = 0
        # what the answer sends back of its prompt (an answer's own events where set), its prompt and request
        self.returned: PromptReturn | None = p.returned
        self.prompt_index = 0
        self.parsed = p
        self.req: SimRequest | None = None

    def role(self, role_choice: bytes) -> bytes:
        """Chat's first chunk of an answer (its role, empty content)."""
        role = self.head + role_choice
        usage = b',"usage":' + usage_json(self.prompt, 0, self.shape.usage_details) if self.continuous_usage else b""
        tail = self.shape.role_tail
        returned = self.returned
        if returned is None:
            return b"data: " + role + usage + tail + b"}\n\n"
        if returned.token_ids:
            tail = tail.replace(b'"prompt_token_ids":null', b'"prompt_token_ids":'
                                + orjson.dumps(returned.prompts[0].ids), 1)
        if returned.prompt_text is not None:
            tail = tail.replace(b'"prompt_text":null', b'"prompt_text":' + orjson.dumps(returned.prompt_text), 1)
        return b"data: " + role + usage + tail + b"}\n\n"

    def echo(self, index: int) -> bytes:
        """Chat's chunk of an answer's echo (the last message, where it is the answer's role), after every answer's
        role chunk; nothing where there is none."""
        echo = self.returned.echo_texts[0] if self.returned is not None else ""
        if not echo:
            return b""
        usage = b',"usage":' + usage_json(self.prompt, 0, self.shape.usage_details) if self.continuous_usage else b""
        return (b"data: " + self.head + b',"choices":[{"index":%d,"delta":{"content":' % index + orjson.dumps(echo)
                + b'},"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n")

    def tokens(self, open_choice: bytes, sent: int, count: int, finished: bool, finish_reason: str | None) -> bytes:
        """The chunk of an answer's ``count`` new tokens after its ``sent`` ones (the last one when ``finished``).
        An answer that ends by itself ("stop") ends with its end-of-sequence token, which writes no text: a last
        chunk with no other token has an empty text, or (chat behind a tool parser) an empty delta."""
        shape = self.shape
        if not finished:
            close = shape.close_running
            text = self.text(sent, count)
            if self.logprobs is not None:
                close = self._with_logprobs(close, sent, count, False)
            if self.returned is not None:
                text, close = self._with_prompt(text, close, sent, count, False)
            return self._event(self.head + open_choice + orjson.dumps(text) + close, sent + count, False)
        text = self.text(sent, count - 1) if finish_reason == "stop" else self.text(sent, count)
        close = shape.close_finished + orjson.dumps(finish_reason) + shape.finished_tail
        if self.logprobs is not None:
            close = self._with_logprobs(close, sent, count, finish_reason == "stop")
        if self.returned is not None:
            text, close = self._with_prompt(text, close, sent, count, finish_reason == "stop")
        if text or shape.empty_end is None:
            chunk = self.head + open_choice + orjson.dumps(text) + close
        else:  # open_choice ends in the delta's '{"content":', close_finished starts with its '}'
            chunk = self.head + open_choice[:open_choice.rindex(b"{")] + shape.empty_end + close[1:]
        return self._event(chunk, sent + count, True)

    def _with_logprobs(self, close: bytes, sent: int, count: int, ends: bool) -> bytes:
        """``close`` (a chunk's bytes after its text) with the logprobs of its tokens in place of ``null``."""
        plan: LogprobsPlan = self.logprobs  # type: ignore[assignment]
        tokens = ending([self.text(position, 1) for position in range(sent, sent + count)], ends)
        if plan.chat:
            logprobs: dict = {"content": plan.chat_entries(tokens, sent)}
        elif sent == 0 and self.returned is not None and self.returned.echo_logprobs:
            # an echo's first chunk: the prompt's tokens lead (alone, without generation)
            returned = self.returned
            logprobs, self.text_offset = plan.prompt_block(returned.prompts[self.prompt_index],
                                                           echo_alternatives(returned, plan), self.text_offset)
            if not returned.echo_only:
                block, self.text_offset = plan.completion_block(tokens, sent, self.text_offset)
                logprobs = merge_blocks(logprobs, block)
        else:
            logprobs, self.text_offset = plan.completion_block(tokens, sent, self.text_offset)
        return close.replace(b'"logprobs":null', b'"logprobs":' + orjson.dumps(logprobs), 1)

    def _with_prompt(self, text: str, close: bytes, sent: int, count: int, ends: bool) -> tuple[str, bytes]:
        """A chunk's ``text`` and ``close`` with what it sends back of the prompt: the chunk's token ids
        (``return_token_ids``); a legacy completion's first chunk starts with the prompt's echo (alone without
        generation) and names the prompt's ids (vLLM's stream does so for ``echo`` too)."""
        returned: PromptReturn = self.returned  # type: ignore[assignment]
        if returned.token_ids:
            ids = answer_token_ids(self.parsed, self.req, sent, count, ends, returned.vocab_size)
            close = close.replace(b'"token_ids":null', b'"token_ids":' + orjson.dumps(ids), 1)
        if sent == 0 and self.shape.role_choice is None:
            echo = returned.echo_texts[self.prompt_index]
            text = echo if returned.echo_only else echo + text
            if returned.stream_prompt_ids:
                close = close.replace(b'"prompt_token_ids":null', b'"prompt_token_ids":'
                                      + orjson.dumps(returned.prompts[self.prompt_index].ids), 1)
        return text, close

    def _event(self, chunk: bytes, so_far: int, finished: bool) -> bytes:
        """A chunk's event: its JSON (up to its choices) with what rides on it, the answer's ``so_far`` tokens."""
        if self.continuous_usage:  # this answer's tokens so far
            chunk += b',"usage":' + usage_json(self.prompt, so_far, self.shape.usage_details)
        if finished and not self.include_usage:  # the fingerprint rides on (each answer's) last message
            chunk += self.fingerprint
        return b"data: " + chunk + b"}\n\n"

    def text(self, sent: int, count: int) -> str:
        """The text of an answer's tokens ``sent .. sent+count-1`` (filler words; :class:`JsonEvents`' JSON)."""
        return filler_text(sent, count)

    def unencodable(self, sent: int, count: int) -> bytes:
        """The event of vLLM's stream where a chunk cannot be serialized (pydantic's UTF-8 encoding fails on a lone
        surrogate from the request: a forced tool call's name, a JSON answer's key), then [DONE]."""
        plan = self.parsed.tool_plan
        texts = (plan.name, plan.arguments_after(sent, count)) if plan is not None else (self.text(sent, count),)
        message = next((f"Error serializing to JSON: UnicodeEncodeError: {failure}"
                        for failure in map(utf8_failure, texts) if failure is not None), "Error serializing to JSON")
        event = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}})
        return f"data: {event}\n\ndata: [DONE]\n\n".encode()

    def end(self, completion: int) -> bytes:
        """After the last answer's last chunk: the usage chunk (all answers' tokens) where asked for, then [DONE]."""
        usage = b""
        if self.include_usage:
            usage = (b"data: " + self.head + b',"choices":[],"usage":' + usage_json(self.total_prompt, completion)
                     + self.fingerprint + b"}\n\n")
        return usage + b"data: [DONE]\n\n"


def answer_text(p: Parsed, req: SimRequest, start: int, count: int) -> str:
    """Tokens ``start .. start+count-1`` of an answer's text: filler words, JSON in JSON mode, or a forced tool
    call's JSON."""
    if p.tool_plan is not None:
        return p.tool_plan.text_after(start, count)
    if p.json_text is None:
        return filler_text(start, count)
    return p.json_text.text(req.target_tokens, req.natural_reason == "stop", start, count)


def whole_text(p: Parsed, req: SimRequest) -> str:
    """A whole answer's text: its tokens', less its end-of-sequence token's where it ended by itself."""
    return answer_text(p, req, 0, req.generated - 1 if req.finish_reason == "stop" else req.generated)


def ending(tokens: list[str], ends: bool) -> list[str]:
    """The texts of an answer's tokens (what its logprobs name), the last its end-of-sequence token where
    ``ends`` (the answer ended by itself with them)."""
    if ends and tokens:
        tokens[-1] = EOS_TOKEN
    return tokens


def answer_tokens(p: Parsed, req: SimRequest, start: int, count: int, ends: bool) -> list[str]:
    """The texts of an answer's tokens ``start .. start+count-1``, the last its end-of-sequence token where
    ``ends`` (the answer ended by itself with them)."""
    return ending([answer_text(p, req, position, 1) for position in range(start, start + count)], ends)


def answer_token_ids(p: Parsed, req: SimRequest, start: int, count: int, ends: bool, vocab_size: int) -> list[int]:
    """The ids of an answer's tokens ``start .. start+count-1`` (``return_token_ids``)."""
    return [token_id(token, vocab_size) for token in answer_tokens(p, req, start, count, ends)]


def echo_alternatives(returned: PromptReturn, plan: LogprobsPlan) -> int:
    """The alternatives an echoed prompt token lists in a legacy completion's ``logprobs``: as many as the prompt's
    logprobs hold, no more than ``logprobs`` asks for (vLLM keeps the first ``logprobs + 1`` of each entry)."""
    asked = returned.prompt_logprobs
    return plan.top if asked is None or asked < 0 else min(asked, plan.top)


def whole_logprobs(p: Parsed, req: SimRequest) -> dict | None:
    """A whole answer's ``logprobs`` (None where not asked for)."""
    plan = p.logprobs
    if plan is None:
        return None
    tokens = answer_tokens(p, req, 0, req.generated, req.finish_reason == "stop")
    if plan.chat:
        return {"content": plan.chat_entries(tokens, 0)}
    return plan.completion_block(tokens, 0, 0)[0]


def answer_message(p: Parsed, req: SimRequest) -> dict:
    """A whole chat answer's message: its text, or a forced tool call (vLLM's shape: ``content`` "" and
    ``tool_calls`` after ``function_call``, absent where the call did not parse)."""
    if p.tool_plan is None:
        return {"role": p.role, "content": whole_text(p, req), "refusal": None,
                "annotations": None, "audio": None, "function_call": None, "reasoning": None}
    message = {"role": p.role, "content": "", "refusal": None, "annotations": None, "audio": None,
               "function_call": None}
    calls = p.tool_plan.whole_calls(req.generated, cut=req.finish_reason != "stop")
    if calls is not None:
        message["tool_calls"] = calls
    message["reasoning"] = None
    return message


def answer_finish_reason(plan: ToolCallPlan | None, engine_reason: str | None) -> str | None:
    """An answer's finish_reason: the engine's, or for a forced tool call that ended by itself vLLM's "tool_calls"
    ("required") or "stop" (a named function)."""
    return plan.finish_reason if plan is not None and engine_reason == "stop" else engine_reason


class JsonEvents(SseEvents):
    """The chunks of one answer written as JSON (``response_format``: :mod:`backends.sim.json_answers`)."""

    __slots__ = ()

    def __init__(self, head: bytes, shape: SseShape, p: Parsed, req: SimRequest, fingerprint_json: bytes,
                 total_prompt: int | None = None) -> None:
        super().__init__(head, shape, p, req.prompt_tokens, fingerprint_json, total_prompt)
        self.req = req

    def text(self, sent: int, count: int) -> str:
        return answer_text(self.parsed, self.req, sent, count)


class ToolCallEvents(SseEvents):
    """The chunks of a streamed answer that is a forced tool call, as vLLM streams one: the arguments in
    ``delta.tool_calls`` pieces (the first with the call's id, type and name; after it a "required" call's
    pieces name ``null``), no chunk for tokens that write no arguments, and a last chunk without text (a named
    call's with an empty ``arguments``)."""

    __slots__ = ("plan", "open", "started")

    def __init__(self, head: bytes, shape: SseShape, p: Parsed, prompt: int, fingerprint_json: bytes,
                 total_prompt: int | None, index: int) -> None:
        super().__init__(head, shape, p, prompt, fingerprint_json, total_prompt)
        self.plan: ToolCallPlan = p.tool_plan  # type: ignore[assignment]
        self.open = b',"choices":[{"index":%d,"delta":' % index
        self.started = False

    def text(self, sent: int, count: int) -> str:
        """The call's JSON written by tokens ``sent .. sent+count-1`` (what their logprobs name)."""
        return self.plan.text_after(sent, count)

    def tokens(self, open_choice: bytes, sent: int, count: int, finished: bool, finish_reason: str | None) -> bytes:
        plan = self.plan
        text = plan.arguments_after(sent, count)
        ids = self.returned is not None and self.returned.token_ids
        if text:
            if not self.started:
                self.started = True
                call: dict = {"id": new_tool_call_id(), "type": "function", "index": 0,
                              "function": {"name": plan.name, "arguments": text}}
            elif plan.required:
                call = {"index": 0, "function": {"name": None, "arguments": text}}
            else:
                call = {"index": 0, "function": {"arguments": text}}
            delta = orjson.dumps({"tool_calls": [call]})
        elif not finished:
            if not ids and self.logprobs is None:  # (the JSON around a "required" call's arguments: vLLM's parser
                return b""  # sends nothing for it, but a chunk without a delta where ids or logprobs are asked for)
            delta = b"{}"
        elif finish_reason == "stop" and not plan.required:
            delta = b'{"tool_calls":[{"index":0,"function":{"arguments":""}}]}'
        else:
            delta = b"{}"
        if finished:
            close = (b',"logprobs":null,"finish_reason":' + orjson.dumps(answer_finish_reason(plan, finish_reason))
                     + b',"stop_reason":null,"token_ids":null}]')
        else:
            close = b',"logprobs":null,"finish_reason":null,"token_ids":null}]'
        if self.logprobs is not None:
            close = self._with_logprobs(close, sent, count, finished and finish_reason == "stop")
        if ids:
            token_ids = answer_token_ids(self.parsed, self.req, sent, count, finished and finish_reason == "stop",
                                         self.returned.vocab_size)
            close = close.replace(b'"token_ids":null', b'"token_ids":' + orjson.dumps(token_ids), 1)
        return self._event(self.head + self.open + delta + close, sent + count, finished)


@dataclass(frozen=True)
class SseShape:
    """The byte fragments in which vLLM's chat and completions stream chunks differ; everything else is shared.

    Kept as pre-encoded bytes because the writer builds every event by concatenation on the hot path (no dict,
    no JSON encoder per token). The fragments are vLLM's exactly, including its quirk that a running chat chunk
    has no ``stop_reason`` while a running completions chunk has one.
    """

    object_field: bytes  # ``,"object":...`` after the id
    open_choice: bytes  # up to the JSON string of new text
    close_running: bytes  # after the text while more tokens follow
    close_finished: bytes  # after the text on the last chunk, up to the finish_reason value
    finished_tail: bytes  # after the finish_reason value, closing the choices
    role_choice: bytes | None  # chat's first chunk (role, empty content); completions have none
    role_tail: bytes  # the first chunk's top-level extras after choices (and its running usage)
    usage_details: bool  # running usage carries "completion_tokens_details":null (chat sets it explicitly)
    # a last chunk without text: its delta (chat behind a tool parser, which drops empty content: b"{}"), or None
    # for the text field as usual ("content": "" / "text": "")
    empty_end: bytes | None = None


CHAT_SSE = SseShape(
    object_field=b',"object":"chat.completion.chunk"',
    open_choice=b',"choices":[{"index":0,"delta":{"content":',
    close_running=b'},"logprobs":null,"finish_reason":null,"token_ids":null}]',
    close_finished=b'},"logprobs":null,"finish_reason":',
    finished_tail=b',"stop_reason":null,"token_ids":null}]',
    role_choice=b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                b'"finish_reason":null}]',
    role_tail=b',"prompt_token_ids":null,"prompt_text":null',
    usage_details=True,
)
CHAT_SSE_TOOL_PARSER = replace(CHAT_SSE, empty_end=b"{}")  # a vLLM with --tool-call-parser
COMPLETION_SSE = SseShape(
    object_field=b',"object":"text_completion"',
    open_choice=b',"choices":[{"index":0,"text":',
    close_running=b',"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
                  b'"token_ids":null}]',
    close_finished=b',"logprobs":null,"finish_reason":',
    finished_tail=b',"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]',
    role_choice=None,
    role_tail=b"",
    usage_details=False,
)


def usage_json(prompt: int, completion: int, details: bool = False) -> bytes:
    return (b'{"prompt_tokens":' + str(prompt).encode() + b',"total_tokens":' + str(prompt + completion).encode()
            + b',"completion_tokens":' + str(completion).encode()
            + (b',"completion_tokens_details":null}' if details else b"}"))
