"""A chat request's ``messages`` as vLLM 0.32 reads them, so that the simulated engine refuses the messages vLLM
refuses, with vLLM's errors, and serves the ones it serves.

vLLM reads messages in four steps, each mirrored here:

1. **Its request model's validators** (``chat_completion/protocol.py``). Before the fields are read,
   ``check_system_message_content_type`` loops over ``messages`` (a number or null there is Python's TypeError,
   ``'int' object is not iterable``, vLLM's 400; so is a system part whose ``type`` is a list or an object, which
   it logs through a cache) and ``_normalize_messages_before`` turns a message's
   ``tool_calls`` into a list (the same TypeError for a number) and renames ``reasoning_content`` to
   ``reasoning``. Then pydantic reads ``messages`` as ``list[ChatCompletionMessageParam]``: a union of the
   OpenAI SDK's six message types, vLLM's custom message (any role) and openai-harmony's ``Message``. The copies
   below are of those exact types (the SDK's ``openai.types.chat`` as vLLM 0.32 installs it, 3.63, and
   ``renderers/chat_utils.py``), so pydantic's smart union picks the same member and reports the same errors
   (every member's, ``body.messages.0.ChatCompletionUserMessageParam.role`` and so on). The request model allows
   extra fields, and so do the message types read inside it. Last, ``_materialize_tool_calls_after`` reads an
   assistant message's ``tool_calls``, which the SDK's type declares ``Iterable`` and pydantic reads lazily: a bad
   call is only found then, with a ``loc`` from the call's index (``body.0...``).
2. **Its message parser** (``renderers/chat_utils.py``, ``parse_chat_messages``), message by message and part by
   part: content the SDK types declare ``Iterable`` is validated as it is read (pydantic's "validation errors for
   ValidatorIterator", vLLM's 400 ``BadRequestError``); each part is then read by its ``type``
   (``_parse_chat_message_content_mm_part``): image, audio and video parts are validated again, media are refused
   by a text model (every simulated model is one) as they are met (audio that is no object fails in vLLM's own
   code first, its 500), and a part of no known type is refused. A system message first loses Claude Code's
   billing header. A message's texts are joined by new lines, as for a chat template that takes text (vLLM's
   "string" content format, Llama 3's and the test models'): a text that is no string is Python's TypeError
   there. A harmony ``Message`` is not subscriptable, vLLM's 400 too. Then an assistant's tool calls must be
   functions (``_postprocess_messages``).
3. **The chat template** (transformers' ``apply_chat_template``): an empty conversation is refused; then the
   tokenizer, which cannot take a lone surrogate in a role or a text.
4. **The chat serving**, after the prompt's length is checked, reads the content lists of messages read as vLLM's
   custom message for a default LoRA per modality (``_get_message_types``): a string part holding "type", or a
   part whose type is no string, fails there.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Dict, Iterable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import Required, TypedDict

from backends.sim.request_fields import Refusal
from backends.sim.request_models import reported_errors

# ---------------------------------------------------------------------------------------- the OpenAI SDK's types


class PromptCacheBreakpoint(TypedDict, total=False):
    mode: Required[Literal["explicit"]]
    ttl: Literal["30m", "12h"]


class ChatCompletionContentPartTextParam(TypedDict, total=False):
    text: Required[str]
    type: Required[Literal["text"]]
    prompt_cache_breakpoint: PromptCacheBreakpoint


class ImageURL(TypedDict, total=False):
    url: Required[str]
    detail: Literal["auto", "low", "high", "original"]


class ChatCompletionContentPartImageParam(TypedDict, total=False):
    image_url: Required[ImageURL]
    type: Required[Literal["image_url"]]
    prompt_cache_breakpoint: PromptCacheBreakpoint


class InputAudio(TypedDict, total=False):
    data: Required[str]
    format: Required[Literal["wav", "mp3"]]


class ChatCompletionContentPartInputAudioParam(TypedDict, total=False):
    input_audio: Required[InputAudio]
    type: Required[Literal["input_audio"]]
    prompt_cache_breakpoint: PromptCacheBreakpoint


class FileFile(TypedDict, total=False):
    file_data: str
    file_id: str
    filename: str


class File(TypedDict, total=False):
    file: Required[FileFile]
    type: Required[Literal["file"]]
    prompt_cache_breakpoint: PromptCacheBreakpoint


ChatCompletionContentPartParam = Union[ChatCompletionContentPartTextParam, ChatCompletionContentPartImageParam,
                                       ChatCompletionContentPartInputAudioParam, File]


class ChatCompletionContentPartRefusalParam(TypedDict, total=False):
    refusal: Required[str]
    type: Required[Literal["refusal"]]


class ChatCompletionDeveloperMessageParam(TypedDict, total=False):
    content: Required[Union[str, Iterable[ChatCompletionContentPartTextParam]]]
    role: Required[Literal["developer"]]
    name: str


class ChatCompletionSystemMessageParam(TypedDict, total=False):
    content: Required[Union[str, Iterable[ChatCompletionContentPartTextParam]]]
    role: Required[Literal["system"]]
    name: str


class ChatCompletionUserMessageParam(TypedDict, total=False):
    content: Required[Union[str, Iterable[ChatCompletionContentPartParam]]]
    role: Required[Literal["user"]]
    name: str


class Audio(TypedDict, total=False):
    id: Required[str]


class Function(TypedDict, total=False):
    arguments: Required[str]
    name: Required[str]


FunctionCall = Function  # the SDK's assistant ``function_call``: the same fields (a nested type's name is in no error)


class ChatCompletionMessageFunctionToolCallParam(TypedDict, total=False):
    id: Required[str]
    function: Required[Function]
    type: Required[Literal["function"]]


class Custom(TypedDict, total=False):
    input: Required[str]
    name: Required[str]


class ChatCompletionMessageCustomToolCallParam(TypedDict, total=False):
    id: Required[str]
    custom: Required[Custom]
    type: Required[Literal["custom"]]


class ChatCompletionAssistantMessageParam(TypedDict, total=False):
    role: Required[Literal["assistant"]]
    audio: Optional[Audio]
    content: Union[str, Iterable[Union[ChatCompletionContentPartTextParam, ChatCompletionContentPartRefusalParam]],
                   None]
    function_call: Optional[FunctionCall]
    name: str
    refusal: Optional[str]
    tool_calls: Iterable[Union[ChatCompletionMessageFunctionToolCallParam, ChatCompletionMessageCustomToolCallParam]]


class ChatCompletionToolMessageParam(TypedDict, total=False):
    content: Required[Union[str, Iterable[ChatCompletionContentPartTextParam]]]
    role: Required[Literal["tool"]]
    tool_call_id: Required[str]


class ChatCompletionFunctionMessageParam(TypedDict, total=False):
    content: Required[Optional[str]]
    name: Required[str]
    role: Required[Literal["function"]]


class FunctionDefinition(TypedDict, total=False):
    name: Required[str]
    description: str
    parameters: Dict[str, object]
    strict: Optional[bool]


class ChatCompletionFunctionToolParam(TypedDict, total=False):
    function: Required[FunctionDefinition]
    type: Required[Literal["function"]]


class ResponseInputImageParam(TypedDict, total=False):
    detail: Required[Literal["low", "high", "auto", "original"]]
    type: Required[Literal["input_image"]]
    file_id: Optional[str]
    image_url: Optional[str]
    prompt_cache_breakpoint: PromptCacheBreakpoint


# --------------------------------------------------------------------------------------------- vLLM's own types


class AudioURL(TypedDict, total=False):
    url: Required[str]


class ChatCompletionContentPartAudioParam(TypedDict, total=False):
    audio_url: Required[AudioURL]
    type: Required[Literal["audio_url"]]


class VideoURL(TypedDict, total=False):
    url: Required[str]


class ChatCompletionContentPartVideoParam(TypedDict, total=False):
    video_url: Required[VideoURL]
    type: Required[Literal["video_url"]]


class Image:
    """Stands for PIL's ``Image.Image``, which no JSON value is (pydantic's ``is_instance_of`` names it)."""


class PILImage(BaseModel):
    image_pil: Image
    model_config = ConfigDict(arbitrary_types_allowed=True)


class CustomChatCompletionContentPILImageParam(TypedDict, total=False):
    image_pil: PILImage | None
    uuid: str | None


class CustomChatCompletionContentSimpleImageParam(TypedDict, total=False):
    image_url: str | None
    uuid: str | None


EmbedsPayload = Union[str, dict[str, Union[str, list[Union[int, float]]]], None]  # vLLM's MultiModalEmbedsPayload


class ChatCompletionContentPartImageEmbedsParam(TypedDict, total=False):
    image_embeds: EmbedsPayload
    type: Required[Literal["image_embeds"]]
    uuid: str | None


class ChatCompletionContentPartAudioEmbedsParam(TypedDict, total=False):
    audio_embeds: EmbedsPayload
    type: Required[Literal["audio_embeds"]]
    uuid: str | None


class ChatCompletionContentPartVideoEmbedsParam(TypedDict, total=False):
    video_embeds: EmbedsPayload
    type: Required[Literal["video_embeds"]]
    uuid: str | None


class ChatCompletionContentPartPromptEmbedsParam(TypedDict, total=False):
    data: Required[str]
    type: Required[Literal["prompt_embeds"]]


class CustomChatCompletionContentSimpleAudioParam(TypedDict, total=False):
    audio_url: str | None


class CustomChatCompletionContentSimpleVideoParam(TypedDict, total=False):
    video_url: str | None
    uuid: str | None


class CustomChatCompletionContentToolReferenceParam(TypedDict, total=False):
    name: str
    type: Literal["tool_reference"]


class CustomThinkCompletionContentParam(TypedDict, total=False):
    thinking: Required[str]
    closed: bool
    type: Required[Literal["thinking"]]


VllmContentPartParam = Union[
    ChatCompletionContentPartTextParam, ChatCompletionContentPartImageParam, ChatCompletionContentPartInputAudioParam,
    File, ChatCompletionContentPartAudioParam, ChatCompletionContentPartVideoParam,
    ChatCompletionContentPartRefusalParam, CustomChatCompletionContentPILImageParam,
    CustomChatCompletionContentSimpleImageParam, ChatCompletionContentPartImageEmbedsParam,
    ChatCompletionContentPartAudioEmbedsParam, ChatCompletionContentPartVideoEmbedsParam,
    ChatCompletionContentPartPromptEmbedsParam, CustomChatCompletionContentSimpleAudioParam,
    CustomChatCompletionContentSimpleVideoParam, CustomChatCompletionContentToolReferenceParam, str,
    CustomThinkCompletionContentParam]


class CustomChatCompletionMessageParam(TypedDict, total=False):
    role: Required[str]
    content: str | list[VllmContentPartParam]
    name: str
    tool_call_id: str | None
    tool_calls: list[ChatCompletionMessageFunctionToolCallParam] | None
    reasoning: str | None
    tools: list[ChatCompletionFunctionToolParam] | None
    task: str | None


# ------------------------------------------------------------------------------------------ openai-harmony's types


class Role(str, Enum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    DEVELOPER = "developer"
    TOOL = "tool"

    @classmethod
    def _missing_(cls, value: object) -> Role:
        raise ValueError(f"Unknown role: {value!r}")


class Author(BaseModel):
    role: Role
    name: Optional[str] = None


class Content(BaseModel):
    pass


class Message(BaseModel):
    author: Author
    content: list[Content] = Field(default_factory=list)
    channel: Optional[str] = None
    recipient: Optional[str] = None
    content_type: Optional[str] = None


ChatCompletionMessageParam = Union[
    ChatCompletionDeveloperMessageParam, ChatCompletionSystemMessageParam, ChatCompletionUserMessageParam,
    ChatCompletionAssistantMessageParam, ChatCompletionToolMessageParam, ChatCompletionFunctionMessageParam,
    CustomChatCompletionMessageParam, Message]

# read inside vLLM's request model, whose config (extra fields allowed) the message types take on
MESSAGES = TypeAdapter(list[ChatCompletionMessageParam], config=ConfigDict(extra="allow"))
# the parser validates these parts once more (MM_PARSER_MAP)
_PART_ADAPTERS = {"image_url": TypeAdapter(ChatCompletionContentPartImageParam),
                  "audio_url": TypeAdapter(ChatCompletionContentPartAudioParam),
                  "video_url": TypeAdapter(ChatCompletionContentPartVideoParam),
                  "input_image": TypeAdapter(ResponseInputImageParam)}


class MessageRefusal(Refusal):
    """What vLLM refuses as it reads the messages: its 400, or the 500 of its own code's failure on a value."""


def _not_iterable(value: Any) -> str | None:
    """Python's TypeError for looping over a JSON value (a number, true/false or null), else None."""
    if value is None or isinstance(value, (int, float)):
        return f"'{type(value).__name__}' object is not iterable"
    return None


def messages_type_error(body: dict) -> str | None:
    """``check_system_message_content_type``, the first "before" validator to read ``messages``, loops over
    them: Python's TypeError where they are a number or null (a string or an object it loops over); and it logs
    the type of a system message's part other than text once per type, through a cache that cannot hold a list
    or an object: Python's TypeError for a part whose ``type`` is a non-empty one."""
    messages = body.get("messages", [])
    refused = _not_iterable(messages)
    if refused is not None or not isinstance(messages, list):
        return refused
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "system" and isinstance(message.get("content"),
                                                                                         list):
            for part in message["content"]:
                part_type = part.get("type") if isinstance(part, dict) else None
                if isinstance(part_type, (list, dict)) and part_type:
                    return f"unhashable type: '{type(part_type).__name__}'"
    return None


def normalized_messages(messages: Any) -> Any:
    """``_normalize_messages_before``: a copy of the messages in which each message's ``tool_calls`` (not a list,
    not null) is made a list as Python's ``list()`` makes one (a string its characters, an object its keys) and
    ``reasoning_content`` is renamed ``reasoning``. Raises :class:`MessageRefusal` with Python's TypeError where
    ``tool_calls`` is a number."""
    if not isinstance(messages, list):
        return messages
    copies = []
    for message in messages:
        if isinstance(message, dict):
            message = dict(message)
            tool_calls = message.get("tool_calls")
            if tool_calls is not None and not isinstance(tool_calls, list):
                refused = _not_iterable(tool_calls)
                if refused is not None:
                    raise MessageRefusal(refused)
                message["tool_calls"] = list(tool_calls)
            reasoning = message.pop("reasoning_content", None)
            if reasoning is not None and message.get("reasoning") is None:
                message["reasoning"] = reasoning
        copies.append(message)
    return copies


_PLAIN_KEYS = frozenset(("role", "content", "name"))
_BILLING_HEADER = "x-anthropic-billing-header"


def plain_messages(messages: Any) -> bool:
    """Whether ``messages`` is a list of one or more messages that each hold only a role, a text and perhaps a name,
    all strings: messages vLLM's request model and parser take as they are, whatever the role (its custom message
    takes any), which the simulated engine need not read with pydantic (about 10 µs a message). A system text
    that starts with Claude Code's billing header is not taken as it is (the parser drops that line)."""
    return type(messages) is list and bool(messages) and all(
        type(message) is dict and type(message.get("role")) is str and type(message.get("content")) is str
        and _PLAIN_KEYS.issuperset(message) and type(message.get("name", "")) is str
        and not (message["role"] == "system" and message["content"].startswith(_BILLING_HEADER))
        for message in messages)


def validated_messages(messages: Any) -> tuple[list | None, list[dict]]:
    """The messages as vLLM's request model reads them, and its errors (``body.messages...``): (the messages read,
    []) where they validate, else (None, the errors)."""
    try:
        return MESSAGES.validate_python(messages, from_attributes=True), []  # as FastAPI validates a body
    except ValidationError as exc:
        return None, reported_errors(exc, ("body", "messages"))


def tool_call_errors(messages: list) -> list[dict]:
    """``_materialize_tool_calls_after``: each message's lazily read ``tool_calls`` made a list, in place; the
    errors of the first that fails, with vLLM's ``loc`` (``body``, the call's index, ...), else []."""
    for message in messages:
        if isinstance(message, dict) and message.get("tool_calls") is not None and not isinstance(
                message["tool_calls"], list):
            try:
                message["tool_calls"] = list(message["tool_calls"])
            except ValidationError as exc:
                return reported_errors(exc, ("body",))
    return []


# the part types the parser reads (MM_PARSER_MAP), each with the field that holds its content
_PART_CONTENT = {"text": "text", "thinking": "thinking", "input_text": "text", "output_text": "text",
                 "input_image": "image_url", "image_url": "image_url", "image_embeds": "image_embeds",
                 "audio_embeds": "audio_embeds", "video_embeds": "video_embeds", "prompt_embeds": "data",
                 "image_pil": "image_pil", "audio_url": "audio_url", "input_audio": "input_audio",
                 "refusal": "refusal", "video_url": "video_url", "tool_reference": "name"}
def _without_billing_header(parts: Iterable[Any]) -> list[Any]:
    """``_strip_claude_code_billing_header``, for a system message's parts: a text that starts with Claude Code's
    attribution header loses its first line (and the part with it where nothing follows)."""
    kept = []
    for part in parts:
        text = part if isinstance(part, str) else part.get("text") if isinstance(part, dict) and part.get(
            "type") == "text" else None
        if not (isinstance(text, str) and text.startswith(_BILLING_HEADER)):
            kept.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            kept.append(rest if isinstance(part, str) else {**part, "text": rest})
    return kept


# a part without a type (or with a uuid) is read by the first of these fields it holds
_TYPELESS_KEYS = ("image_url", "image_pil", "image_embeds", "audio_embeds", "video_embeds", "prompt_embeds",
                  "audio_url", "input_audio", "video_url", "tool_reference")
_TEXT_TYPES = frozenset(("text", "input_text", "output_text", "refusal", "thinking"))
_MEDIA_TYPES = frozenset(("image_pil", "image_url", "input_image", "audio_url", "input_audio", "video_url"))
_EMBEDS_TYPES = frozenset(("image_embeds", "audio_embeds", "video_embeds"))
_SUPPORTED = ", ".join(sorted(_PART_CONTENT))


def _part_type_and_content(part: dict) -> tuple[str, Any]:
    """``_parse_chat_message_content_mm_part``: a part's type and its content."""
    part_type, uuid = part.get("type"), part.get("uuid")
    if isinstance(part_type, str) and part_type in _PART_CONTENT and uuid is None:
        adapter = _PART_ADAPTERS.get(part_type)
        if adapter is not None:
            read = adapter.validate_python(part)  # a ValidationError is vLLM's 400 (its text)
            content = read.get(part_type if part_type != "input_image" else "image_url")
            return part_type, content.get("url") if isinstance(content, dict) else content
        content = part.get(_PART_CONTENT[part_type])
        return part_type, content
    if part_type is None or uuid is not None:
        for key in _TYPELESS_KEYS:
            if key in part:
                content = part.get("data" if key == "prompt_embeds" else "name" if key == "tool_reference" else key)
                if key in ("image_url", "audio_url", "video_url") and isinstance(content, dict):
                    content = content.get("url")
                return key, content
        raise MessageRefusal("Missing 'type' field in multimodal part.", "type")
    if not isinstance(part_type, str):
        raise MessageRefusal("Invalid 'type' field in multimodal part.", "type")
    return part_type, "unknown part_type content"


def _parsed_text(part: Any, model: str) -> Any:
    """``_parse_chat_message_content_part`` for a text model whose chat template takes text (vLLM's "string"
    content format, as Llama 3's does): a text part's content (whatever its JSON type), else None; media are
    refused."""
    if isinstance(part, str):
        return part
    part_type, content = _part_type_and_content(part)
    if part_type in _TEXT_TYPES:  # (text and refusal parts without content are skipped: None, as here)
        return content
    if part_type == "input_audio" and content and not isinstance(content, dict):  # parse_input_audio's .get
        raise MessageRefusal(f"'{type(content).__name__}' object has no attribute 'get'", status=500)
    if part_type in _MEDIA_TYPES:  # the multimodal registry has no processor for a text model
        raise MessageRefusal(f"{model} is not a multimodal model")
    if part_type in _EMBEDS_TYPES:
        raise MessageRefusal("The model is not multimodal.")
    if part_type == "prompt_embeds":
        if not content:
            raise MessageRefusal("prompt_embeds content part requires a non-empty `data` field with base64-encoded "
                                 "tensor bytes.", "prompt_embeds")
        raise MessageRefusal("You must set `--enable-prompt-embeds` to input `prompt_embeds`", "prompt_embeds")
    if part_type == "tool_reference":
        return content
    raise MessageRefusal(f"Unsupported chat content part type: {part_type!r}. Supported types: {_SUPPORTED}.",
                         "type", part_type)


def check_parsed_messages(messages: list, model: str) -> list[str]:
    """vLLM's message parser over the messages read (:func:`validated_messages`), for a text model ``model``:
    raises :class:`MessageRefusal` with its first refusal; else the texts the chat template renders (each
    message's role and text)."""
    rendered = []
    try:
        for message in messages:
            if not isinstance(message, dict):  # a harmony Message: _parse_chat_message_content's message["role"]
                raise MessageRefusal(f"'{type(message).__name__}' object is not subscriptable")
            content = message.get("content")
            parts = [] if content is None else [content] if isinstance(content, str) else content
            if message["role"] == "system":
                parts = _without_billing_header(parts)
            texts = [text for text in (_parsed_text(part, model) for part in parts) if text]
            for i, text in enumerate(texts):  # the parts' texts are joined by new lines
                if not isinstance(text, str):
                    raise MessageRefusal(f"sequence item {i}: expected str instance, {type(text).__name__} found")
            rendered += [message["role"], *texts]
    except ValidationError as exc:  # content or a media part read lazily (vLLM's ValueError handler: its text)
        raise MessageRefusal(str(exc)) from None
    for message in messages:  # _postprocess_messages
        if message["role"] != "assistant" or not isinstance(message.get("tool_calls"), list):
            continue
        for call in message["tool_calls"]:
            if call.get("type", "function") != "function" or not isinstance(call.get("function"), dict):
                raise MessageRefusal("chat completions only support assistant tool_calls of type 'function'.",
                                     "tool_calls")
    return rendered


def has_lone_surrogate(texts: Iterable[str]) -> bool:
    """Whether a text holds a lone surrogate (JSON's ``"\\ud800"``), which the model's tokenizer cannot take
    (vLLM's 400 :data:`TOKENIZER_REFUSAL`)."""
    for text in texts:
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


TOKENIZER_REFUSAL = "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]"


def message_types_refusal(messages: list) -> MessageRefusal | None:
    """``_get_message_types``, which vLLM's chat serving runs after the prompt is rendered and its length checked
    (to pick a default LoRA per modality): over the content lists of messages read as vLLM's custom message (the
    SDK types' content is read lazily, no list), a string part holding "type" is indexed by a string (Python's
    TypeError, a 400) and a part whose ``type`` is no string has no ``split`` (its 500)."""
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            continue
        for part in message["content"]:
            if "type" not in part:
                continue
            if isinstance(part, str):
                return MessageRefusal("string indices must be integers, not 'str'")
            if not isinstance(part["type"], str):
                return MessageRefusal(f"'{type(part['type']).__name__}' object has no attribute 'split'", status=500)
    return None
