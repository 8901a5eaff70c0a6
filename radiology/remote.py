"""Generation through a served model: a Gemma 3 behind an OpenAI-compatible chat-completions API
(vLLM, SGLang, ``transformers serve``) instead of one loaded in this process.

    model = RemoteModel("http://gpu-box:8000/v1")            # the server's first (only) model
    problem = check_server(model.url, model.model)            # None when usable, else the reason
    for text in model.stream(image, settings=GenerationSettings()):
        ...

``RemoteModel`` has the shape the app and the evaluation use for a local model (``name``,
``precision``, ``device``, ``stream``, ``generate``), so either can stand in for the other. The
prompt is the training prompt: ``radiology.data.build_messages`` builds the user turn and only its
form changes (images become PNG data URLs, in order, before the text). The images sent are the
rendered pixels and nothing else: no DICOM header, file name or image metadata leaves the app.

Every failure (server down, refused request, timeout, a model without vision, a stream that breaks
off) raises ``RemoteModelError`` with a message for the person at the screen; the caller keeps
serving and tries again on the next request.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

try:
    import httpx2  # the HTTP library of openai>=3: errors raised while a stream is read come from it
    import openai
except ImportError:  # training and local serving run without the client; only a server URL needs it
    httpx2 = openai = None
from PIL import Image

from radiology.data import DEFAULT_INSTRUCTION, Dialogue, decode_image
from radiology.generate import GenerationSettings

__all__ = [
    "DEFAULT_API_KEY_ENV",
    "RemoteModel",
    "RemoteModelError",
    "RemoteRequest",
    "ServerArguments",
    "add_server_arguments",
    "check_server",
    "openai_messages",
    "remote_from_args",
]

DEFAULT_API_KEY_ENV = "RADIOLOGY_API_KEY"
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 120.0
# The key the openai client sends when none is configured; servers started without --api-key ignore it.
_NO_KEY = "EMPTY"
_REASON_LIMIT = 300
_SERVE_HINT = "see 'Serving with vLLM or SGLang' in the README"

# Server answers that mean "this model takes no images" (vLLM: "... is not a multimodal model";
# a limit of 0 images; other servers' wording for the same refusal).
_NO_VISION = re.compile(
    r"not a multimodal model|at most 0 image|does not support (image|vision|multimodal)|"
    r"image (input|inputs) (is|are) not supported|no vision",
    re.IGNORECASE,
)
_IMAGE_LIMIT = re.compile(r"at most (\d+) image", re.IGNORECASE)
_CONTEXT_LENGTH = re.compile(r"maximum context length|max_model_len|context length|too long", re.IGNORECASE)
# Image data a server may echo back in an error (a data URL, or any long base64 run).
_DATA_URL = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]*")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{64,}={0,2}")


class RemoteModelError(RuntimeError):
    """A served model could not answer. The message is meant for the user; ``partial`` holds the
    text received before a stream broke off ("" when nothing came)."""

    def __init__(self, message: str, partial: str = ""):
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class RemoteRequest:
    """One prompt for ``RemoteModel.generate_many``: rendered images (one, or several in order),
    the instruction (None: the default), optional clinical context, and whether the first image is a
    prior study's (``radiology.data.RowImages.in_prompt_order`` gives a row's images in this order)."""

    images: Image.Image | Sequence[Image.Image]
    instruction: str | None = None
    context: str | None = None
    prior: bool = False
    dialogue: Dialogue | None = None  # a question (and earlier turns) that replaces the instruction


# --------------------------------------------------------------------------- the prompt


def _clean_png_data_url(image: Image.Image) -> str:
    """The image's RGB pixels as a PNG data URL, built from the pixels alone so that no metadata
    carried by the PIL image (text chunks, EXIF, ICC profile) can travel with it."""
    rgb = decode_image(image)  # the same RGB conversion the local generation path applies
    bare = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buffer = io.BytesIO()
    bare.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _as_image_list(images: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    pictures = [images] if isinstance(images, Image.Image) else list(images)
    if not pictures:
        raise ValueError("no image given: a served model is asked about one or more rendered images")
    for picture in pictures:
        if not isinstance(picture, Image.Image):
            raise ValueError(
                f"expected PIL images, got {type(picture).__name__}: render files first "
                "(radiology.data.decode_image, radiology.dicom.read_dicom_image)"
            )
    return pictures


def openai_messages(
    images: Image.Image | Sequence[Image.Image],
    instruction: str | None = None,
    context: str | None = None,
    prior: bool = False,
    dialogue: Dialogue | None = None,
) -> list[dict[str, Any]]:
    """The training prompt (``build_messages``, through ``dialogue`` for a question or a conversation's
    earlier turns) in the OpenAI chat format: each image becomes an ``image_url`` item holding a PNG data
    URL, in the order the prompt places them (with ``prior``, the first image is the prior study's)."""
    pictures = _as_image_list(images)
    messages = (dialogue or Dialogue()).messages(instruction or DEFAULT_INSTRUCTION, context, len(pictures), prior)
    remaining = iter(pictures)
    converted = []
    for message in messages:
        content: list[dict[str, Any]] = []
        for item in message["content"]:
            if item["type"] == "text":
                content.append({"type": "text", "text": item["text"]})
            else:
                content.append({"type": "image_url", "image_url": {"url": _clean_png_data_url(next(remaining))}})
        if message["role"] == "assistant":  # an earlier answer: plain text, as every server takes it
            converted.append({"role": "assistant", "content": "".join(item["text"] for item in content)})
        else:
            converted.append({"role": message["role"], "content": content})
    return converted


# --------------------------------------------------------------------------- errors


def _redact(text: str, secrets: Sequence[str] = ()) -> str:
    """A server's reason, shortened, with any echoed image data and request text taken out."""
    text = _DATA_URL.sub("[image data]", text)
    text = _BASE64_RUN.sub("[data]", text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[request text]")
    text = " ".join(text.split())
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 3] + "..."


def _reason_in(body: Any) -> str | None:
    """The human part of an error body: OpenAI/vLLM ``{"error": {"message"}}``, SGLang
    ``{"message"}``, FastAPI ``{"detail"}`` (text or a list of field errors), or plain text."""
    if isinstance(body, str):
        return body
    if isinstance(body, dict):
        for key in ("message", "detail", "error", "msg"):
            if key in body:
                found = _reason_in(body[key])
                if found:
                    return found
    if isinstance(body, list):
        parts = [_reason_in(item) for item in body]
        return "; ".join(p for p in parts if p) or None
    return None


def _server_reason(err: openai.APIError, secrets: Sequence[str] = ()) -> str:
    reason = _reason_in(err.body)
    if reason is None and isinstance(err, openai.APIStatusError):
        try:
            reason = _reason_in(json.loads(err.response.text))
        except (ValueError, httpx2.HTTPError):
            reason = err.response.text if err.response.text else None
    return _redact(reason or err.message or "no reason given", secrets)


def _connection_problem(err: BaseException, url: str) -> str:
    """Why a connection to ``url`` failed, from the transport error behind the client's error."""
    cause = err.__cause__ or err.__context__ or err
    if isinstance(err, openai.APITimeoutError) or isinstance(cause, httpx2.TimeoutException):
        if isinstance(cause, (httpx2.ConnectTimeout, httpx2.PoolTimeout)):
            return (
                f"cannot connect to {url}: no answer to the connection within the connect timeout; check the "
                "address and any firewall, or raise --server_connect_timeout"
            )
        return (
            f"the server at {url} accepted the request but sent nothing within the read timeout: it may be "
            "overloaded or stuck; try again, or raise --server_read_timeout"
        )
    detail = str(cause) or type(cause).__name__
    if "refused" in detail.lower():
        detail = "connection refused"
    return (
        f"cannot connect to {url} ({_redact(detail)}): is the server running? Start it ({_SERVE_HINT}) "
        "or fix --server_url"
    )


# --------------------------------------------------------------------------- the client


def _validated_url(url: str, flag: str = "--server_url") -> str:
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://[^/]+", url) or not url.endswith("/v1"):
        raise ValueError(
            f"server URL {url!r} must be http(s)://HOST:PORT/v1, the base of the OpenAI-compatible API "
            f"(e.g. http://localhost:8000/v1 for vllm serve); fix {flag}"
        )
    return url


def _client(url: str, api_key: str | None, connect_timeout: float, read_timeout: float) -> openai.OpenAI:
    if openai is None:
        raise RemoteModelError("a server URL needs the openai client: pip install -r requirements.txt")
    # No retries: a stream cannot be replayed halfway, and the app retries on the user's next request.
    return openai.OpenAI(
        base_url=url,
        api_key=api_key or _NO_KEY,
        timeout=openai.Timeout(read_timeout, connect=connect_timeout),
        max_retries=0,
    )


def _served_models(client: openai.OpenAI, url: str) -> list[str]:
    """The model ids the server lists; RemoteModelError when it cannot be asked."""
    try:
        return [entry.id for entry in client.models.list().data]
    except openai.AuthenticationError as err:
        raise RemoteModelError(_key_refused(url, err)) from None
    except openai.APIStatusError as err:
        raise RemoteModelError(
            f"{url}/models answered {err.status_code} ({_server_reason(err)}): is this an OpenAI-compatible "
            "server? The URL must end in /v1; fix --server_url"
        ) from None
    except openai.APIConnectionError as err:
        raise RemoteModelError(_connection_problem(err, url)) from None


def _key_refused(url: str, err: openai.APIStatusError) -> str:
    return (
        f"the server at {url} refused the API key ({err.status_code}: {_server_reason(err)}): put the key the "
        f"server was started with (--api-key) in the environment variable named by --server_api_key_env "
        f"(default {DEFAULT_API_KEY_ENV})"
    )


def _no_model_message(url: str, model: str, served: Sequence[str]) -> str:
    listed = ", ".join(served) if served else "none"
    return (
        f"the server at {url} does not serve model {model!r}; it serves: {listed}. Pass one of these with "
        "--server_model (or leave it out for the first)"
    )


def _no_vision_message(url: str, model: str) -> str:
    return (
        f"the model {model!r} served at {url} has no vision tower (the server does not take images): serve a "
        f"Gemma 3 multimodal merged folder instead, e.g. runs/r1/merged ({_SERVE_HINT})"
    )


class RemoteModel:
    """A Gemma 3 served over the OpenAI chat-completions API, used like a loaded model.

    ``url`` is the API base ending in /v1; ``model`` the served name (None: the first the server
    lists, looked up on first use); the API key is read from the environment variable
    ``api_key_env`` (unset: no key). Nothing is sent until the first request.
    """

    precision = "as served"
    engine = None  # the local decode engine's slot: a served model has none

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ):
        self.url = _validated_url(url)
        self.model = model
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("timeouts must be above 0 seconds; fix --server_connect_timeout/--server_read_timeout")
        self._api_key = os.environ.get(api_key_env)
        self._timeouts = (connect_timeout, read_timeout)
        self._client = _client(self.url, self._api_key, connect_timeout, read_timeout)
        self._lock = threading.Lock()
        # transformers serve refuses a top-level top_k (422) and takes it inside its generation_config
        # field instead; learnt from the first refusal and kept.
        self._top_k_in_generation_config = False

    # ---- description, as for a local model

    @property
    def name(self) -> str:
        return self.model or f"first model at {self.url}"

    @property
    def device(self) -> str:
        return f"served by {self.url} (model {self.name})"

    def resolve_model(self) -> str:
        """The served model's name: the one given, else the first the server lists (asked once)."""
        with self._lock:
            if self.model is None:
                served = _served_models(self._client, self.url)
                if not served:
                    raise RemoteModelError(f"the server at {self.url} lists no model; check how it was started")
                self.model = served[0]
            return self.model

    def check(self) -> str | None:
        """Why this served model cannot answer now (``check_server``: unreachable, a refused key, no
        such model, no vision), or None; on success the model's name is settled."""
        problem = check_server(self.url, self.model, self._api_key, *self._timeouts)
        if problem is None:
            try:
                self.resolve_model()
            except RemoteModelError as err:
                return str(err)
        return problem

    def close(self) -> None:
        """Close the HTTP connections (the demo calls it when it stops, as it frees a loaded model)."""
        self._client.close()

    # ---- the request

    def _decoding(self, settings: GenerationSettings) -> tuple[dict[str, Any], dict[str, Any]]:
        """Decoding settings as request fields: the standard ones, and the server-specific extras."""
        fields: dict[str, Any] = {"max_tokens": settings.max_new_tokens}
        if not settings.do_sample:
            fields["temperature"] = 0.0  # greedy on vLLM, SGLang and transformers serve alike
            return fields, {}
        fields.update(temperature=settings.temperature, top_p=settings.top_p)
        if settings.seed is not None:
            fields["seed"] = settings.seed
        if self._top_k_in_generation_config:
            # transformers serve: without do_sample here the model folder's default decides.
            config = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                      "top_k": settings.top_k}
            return fields, {"generation_config": json.dumps(config)}
        # vLLM and SGLang: top_k in the body; -1 is "no top-k" for both (SGLang refuses 0).
        return fields, {"top_k": settings.top_k or -1}

    def _open(self, messages: list[dict[str, Any]], settings: GenerationSettings, secrets: Sequence[str]) -> Any:
        model = self.resolve_model()
        top_k_retried = reconnected = False
        while True:
            fields, extra = self._decoding(settings)
            try:
                return self._client.chat.completions.create(
                    model=model, messages=messages, stream=True, extra_body=extra or None, **fields
                )
            except openai.APIStatusError as err:
                reason = _server_reason(err, secrets)
                if (not top_k_retried and err.status_code == 422 and "top_k" in reason
                        and not self._top_k_in_generation_config):
                    self._top_k_in_generation_config = top_k_retried = True
                    continue
                raise RemoteModelError(self._refusal(err, reason, model)) from None
            except openai.APIConnectionError as err:
                # A kept-alive connection the server closed as this request went out: nothing was
                # answered, so sending it again on a fresh connection is safe (once).
                if not reconnected and isinstance(err.__cause__ or err.__context__, httpx2.RemoteProtocolError):
                    reconnected = True
                    continue
                raise RemoteModelError(_connection_problem(err, self.url)) from None

    def _refusal(self, err: openai.APIStatusError, reason: str, model: str) -> str:
        """A user-facing message for a request the server answered with an error status."""
        if err.status_code in (401, 403):
            return _key_refused(self.url, err)
        if err.status_code < 500:
            try:
                served = _served_models(self._client, self.url)
            except RemoteModelError:
                served = None
            if served is not None and model not in served:
                return _no_model_message(self.url, model, served)
            if _NO_VISION.search(reason):
                return _no_vision_message(self.url, model)
            limit = _IMAGE_LIMIT.search(reason)
            if limit:
                return (
                    f"the server at {self.url} takes at most {limit.group(1)} image(s) per prompt ({reason}): restart "
                    "it with a larger --limit-mm-per-prompt (vLLM), or send fewer images"
                )
            if _CONTEXT_LENGTH.search(reason):
                return (
                    f"the prompt and answer do not fit the served model's context ({reason}): raise --max-model-len "
                    "(vLLM) or --context-length (SGLang) on the server, or lower max new tokens"
                )
        return f"the server at {self.url} answered {err.status_code}: {reason}"

    # ---- generation

    def stream(
        self,
        images: Image.Image | Sequence[Image.Image],
        instruction: str | None = None,
        settings: GenerationSettings | None = None,
        context: str | None = None,
        stop: threading.Event | None = None,
        prior: bool = False,
        dialogue: Dialogue | None = None,
    ) -> Iterator[str]:
        """Yields the description as it grows (each item is the text so far), as
        ``radiology.generate.stream_text`` does. With ``prior`` the first image is a prior study's
        (labelled so in the prompt). Setting ``stop``, or closing the iterator, closes the
        HTTP stream, which the server takes as the end of the request (vLLM aborts it); ``stop`` is
        set when the stream ends. A stream that breaks off raises RemoteModelError whose ``partial``
        holds the text so far."""
        settings = settings or GenerationSettings()
        stop = stop or threading.Event()
        secrets = [context] if context else []
        messages = openai_messages(images, instruction, context, prior=prior, dialogue=dialogue)
        text = ""
        finished = False
        try:
            response = self._open(messages, settings, secrets)
            try:
                for chunk in response:
                    for choice in chunk.choices:
                        if choice.delta is not None and choice.delta.content:
                            text += choice.delta.content
                            yield text.strip()
                        finished = finished or choice.finish_reason is not None
                    if stop.is_set():
                        return
            except openai.APIConnectionError as err:  # the transport failed while reading
                raise RemoteModelError(self._broke_off(err, text), partial=text.strip()) from None
            except openai.APIError as err:  # an error event inside the stream
                raise RemoteModelError(
                    f"the server at {self.url} reported an error mid-answer ({_server_reason(err, secrets)}); "
                    "the text so far is kept",
                    partial=text.strip(),
                ) from None
            except httpx2.HTTPError as err:
                raise RemoteModelError(self._broke_off(err, text), partial=text.strip()) from None
            finally:
                response.close()
            if not finished and not stop.is_set():
                raise RemoteModelError(
                    f"the stream from {self.url} ended before the server said the answer was complete; the text "
                    "so far is kept; try again",
                    partial=text.strip(),
                )
        finally:
            stop.set()

    def _broke_off(self, err: Exception, text: str) -> str:
        cause = err.__cause__ or err
        if isinstance(err, openai.APITimeoutError) or isinstance(cause, httpx2.TimeoutException):
            what = "sent nothing more within the read timeout (raise --server_read_timeout if it is only slow)"
        else:
            what = "closed the connection"
        return (
            f"the server at {self.url} {what} after {len(text.strip())} characters of the answer; the text so "
            "far is kept; try again"
        )

    def stream_answer(
        self,
        images: Image.Image | Sequence[Image.Image],
        instruction: str | None = None,
        settings: GenerationSettings | None = None,
        context: str | None = None,
        stop: threading.Event | None = None,
        prior: Image.Image | None = None,
        dialogue: Dialogue | None = None,
    ) -> Iterator[str]:
        """``stream`` in the shape of a loaded model's (``radiology.generate.AnsweringModel``): the
        prior study, when there is one, is its own image, which the prompt places first."""
        pictures = _as_image_list(images)
        if prior is not None:
            pictures = [*_as_image_list(prior), *pictures]
        return self.stream(pictures, instruction, settings, context, stop, prior=prior is not None, dialogue=dialogue)

    def generate(
        self,
        images: Image.Image | Sequence[Image.Image],
        instruction: str | None = None,
        settings: GenerationSettings | None = None,
        context: str | None = None,
        stop: threading.Event | None = None,
        prior: bool = False,
        dialogue: Dialogue | None = None,
    ) -> str:
        """The whole description (streamed underneath, so the read timeout applies between pieces,
        not to the whole answer)."""
        text = ""
        for text in self.stream(images, instruction, settings, context, stop, prior, dialogue):
            pass
        return text

    def generate_many(
        self,
        rows: Sequence[RemoteRequest | Callable[[], RemoteRequest]],
        settings: GenerationSettings | None = None,
        concurrency: int = 8,
        on_done: Callable[[int, str | Exception], None] | None = None,
    ) -> list[str | Exception]:
        """One answer per row, in order, with up to ``concurrency`` requests in flight (the server
        batches them). A row may be a function that builds its request: it is called in the worker,
        so that only the rows in flight hold rendered images, and their rendering overlaps the
        requests. A row that fails gets its exception instead (RemoteModelError from the server,
        ValueError for a bad prompt, whatever its builder raised); the other rows go on.
        ``on_done(index, answer)`` is called, from a worker thread, as each row finishes."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if rows:
            try:
                self.resolve_model()  # once, before the threads, rather than once per thread
            except RemoteModelError:
                pass  # each row then tries (and records the reason) on its own

        def one(index: int) -> str | Exception:
            answer: str | Exception
            try:
                row = rows[index]
                request = row if isinstance(row, RemoteRequest) else row()
                answer = self.generate(request.images, request.instruction, settings, request.context,
                                       prior=request.prior, dialogue=request.dialogue)
            except Exception as err:  # one row's failure (a broken image, a refusal) is that row's answer
                answer = err
            if on_done is not None:
                on_done(index, answer)
            return answer

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="remote") as pool:
            return list(pool.map(one, range(len(rows))))


# --------------------------------------------------------------------------- start-up check


def _probe_prompt_tokens(client: openai.OpenAI, model: str, with_image: bool) -> int | None:
    content: list[dict[str, Any]] = [{"type": "text", "text": "Describe."}]
    if with_image:
        content.insert(0, {"type": "image_url", "image_url": {"url": _clean_png_data_url(Image.new("RGB", (32, 32)))}})
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=1, temperature=0.0
    )
    return answer.usage.prompt_tokens if answer.usage is not None else None


def check_server(
    url: str,
    model: str | None = None,
    api_key: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> str | None:
    """Why the server at ``url`` cannot answer for ``model`` (None: the first it lists), or None
    when it can: unreachable, a refused key, no such model (naming the served ones), or a model
    that takes no images. Sends two one-token requests to see that an image reaches the model
    (a server may drop images silently for a text-only model)."""
    try:
        url = _validated_url(url)
    except ValueError as err:
        return str(err)
    client = _client(url, api_key, connect_timeout, read_timeout)
    try:
        served = _served_models(client, url)
        if not served:
            return f"the server at {url} lists no model; check how it was started"
        if model is None:
            model = served[0]
        elif model not in served:
            return _no_model_message(url, model, served)
        try:
            text_only = _probe_prompt_tokens(client, model, with_image=False)
            with_image = _probe_prompt_tokens(client, model, with_image=True)
        except openai.APIStatusError as err:
            reason = _server_reason(err)
            if _NO_VISION.search(reason):
                return _no_vision_message(url, model)
            return f"the server at {url} refused a one-token test request for {model!r} ({err.status_code}: {reason})"
        if text_only is not None and with_image is not None and with_image <= text_only:
            # The image added no prompt token: the server dropped it.
            return _no_vision_message(url, model)
    except RemoteModelError as err:
        return str(err)
    except openai.APIConnectionError as err:
        return _connection_problem(err, url)
    return None


# --------------------------------------------------------------------------- command line

SERVER_ARGUMENTS_TITLE = "served model (OpenAI-compatible server: vLLM, SGLang, transformers serve)"


@dataclass
class ServerArguments:
    """Options that point a command (the evaluation, the demo) at a served model instead of one it
    loads. A command parses them as one group of its ProjectParser (``radiology.config``), or adds
    them to a plain argparse parser with ``add_server_arguments``."""

    server_url: str | None = field(
        default=None,
        metadata={"help": "API base of an OpenAI-compatible server, e.g. http://localhost:8000/v1: generate there "
                          "instead of loading a model."},
    )
    server_model: str | None = field(
        default=None, metadata={"help": "Served model name (default: the first the server lists)."}
    )
    server_api_key_env: str = field(
        default=DEFAULT_API_KEY_ENV,
        metadata={"help": "Environment variable holding the server's API key (unset: no key)."},
    )
    server_connect_timeout: float = field(
        default=DEFAULT_CONNECT_TIMEOUT, metadata={"help": "Seconds to wait for the connection."}
    )
    server_read_timeout: float = field(
        default=DEFAULT_READ_TIMEOUT, metadata={"help": "Seconds to wait for each piece of the answer."}
    )

    def __post_init__(self) -> None:
        if self.server_url is not None:
            self.server_url = _validated_url(self.server_url)
        elif self.server_model is not None:
            raise ValueError("--server_model names a model on a server: give the server with --server_url")
        if self.server_connect_timeout <= 0 or self.server_read_timeout <= 0:
            raise ValueError("timeouts must be above 0 seconds; fix --server_connect_timeout/--server_read_timeout")

    def remote(self, url: str | None = None, model: str | None = None, flag: str = "--server_url"
               ) -> RemoteModel | None:
        """The served model at ``url`` (default --server_url) named ``model`` (default --server_model when
        ``url`` is not given), with this group's key and timeouts; None without a URL. ``flag`` names the
        URL's option in errors."""
        if url is None:
            url, model = self.server_url, self.server_model
        if url is None:
            return None
        return RemoteModel(_validated_url(url, flag), model, self.server_api_key_env,
                           self.server_connect_timeout, self.server_read_timeout)

    def check(self, remote: RemoteModel) -> str | None:
        """Why ``remote`` cannot answer (``check_server``), or None; on success its model name is settled."""
        return remote.check()


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """ServerArguments' flags on a plain argparse parser (a ProjectParser takes the dataclass itself)."""
    group = parser.add_argument_group(SERVER_ARGUMENTS_TITLE)
    for spec in fields(ServerArguments):
        kind = float if isinstance(spec.default, float) else str
        group.add_argument(f"--{spec.name}", type=kind, default=spec.default, help=spec.metadata["help"])


def remote_from_args(args: argparse.Namespace) -> RemoteModel | None:
    """The RemoteModel the flags of ``add_server_arguments`` describe, or None without --server_url."""
    server = ServerArguments(**{spec.name: getattr(args, spec.name) for spec in fields(ServerArguments)})
    return server.remote()
