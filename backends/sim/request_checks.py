"""What vLLM 0.32 refuses of a request whose fields are valid, checked in vLLM's order after parsing.

The renderer's checks (a chat template or multimodal kwargs of the request's own, ``suffix``, ``prompt_embeds``),
SamplingParams' (``n``, penalties, ``temperature``, ``top_p``...), beam search's own, the engine's (logprobs counts,
token ids within the vocabulary, structured outputs' content, a token-id prompt) and what its engine client
cannot encode (a lone surrogate, an integer past 64 bits). A check returns vLLM's answer (a 400 or 500; a
stream's one error event where vLLM's stream has already answered 200), or, for the engine's, what it says (a
message and the field it names, or that its client fails) for the server to answer whole or as a stream's event;
None where the request passes.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from aiohttp import web

from backends.sim.chat_messages import TOKENIZER_REFUSAL, MessageRefusal, check_parsed_messages, has_lone_surrogate
from backends.sim.options import SimEngineOptions
from backends.sim.request_fields import (MAX_JSON_NESTING, NESTING_REFUSAL, STRUCTURAL_TAG_NESTING, check_mm_kwargs,
                                         check_request_template, exceeds_json_nesting, extra_args)
from backends.sim.request_parsing import EMPTY_PROMPT, Parsed
from backends.sim.responses import (bad_request, engine_failure, engine_refusal, refusal_response, refused_by,
                                    validation_message)


MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's
MAX_N_SEQUENCES = 16384  # vLLM's VLLM_MAX_N_SEQUENCES default (the gateway allows 128, OpenAI's limit)


def tool_parser_refusal(choice: Any) -> web.Response:
    """The default ``vllm serve`` has no tool parser (no ``--enable-auto-tool-choice --tool-call-parser``), so its
    OnlineRenderer.render_chat (renderers/online_renderer.py) refuses every tool choice but "none"."""
    if choice == "auto":
        return bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
    described = f'function "{choice["function"]["name"]}"' if isinstance(choice, dict) else f'"{choice}"'
    return bad_request(f"tool_choice={described} requires --tool-call-parser to be set")


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
        return engine_refusal(refused, "temperature", stream=p.stream)
    if cap < 1:
        return None
    failure = logprobs_refusal("sample", "logprobs", 2 * n, options) or prompt_refused_in_engine(p, options.vocab_size)
    if failure is not None:
        return engine_refusal(*failure, stream=p.stream)
    session_id = p.extras.session_id if p.extras is not None else None
    if has_lone_surrogate((request_id,) if session_id is None else (request_id, session_id)):
        return engine_failure(stream=p.stream)
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


# transformers' apply_chat_template, which vLLM's renderer calls (its ValueError is vLLM's 400)
TEMPLATE_CONFLICT = ("continue_final_message and add_generation_prompt are not compatible. Use continue_final_message "
                     "when you want the model to continue the final message, and add_generation_prompt when you want "
                     "to add a header that will prompt it to start a new assistant message instead.")

EMPTY_CONVERSATION = "Cannot apply chat template to an empty conversation. Provide at least one message."


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
