"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

    with OpenAITestServer(responder, faults=plan, latency_s=0.05, api_key="sk-test") as server:
        client = ChatClient(base_url=server.base_url, api_key="sk-test")
        ...
    server.total_requests, server.max_in_flight, server.requests[0].headers["authorization"]

It speaks POST /v1/chat/completions (JSON, and SSE when `"stream": true`, with a usage chunk when
`stream_options.include_usage` is set, ending in `data: [DONE]`) and GET /v1/models. Uvicorn serves
it from a background thread on an ephemeral loopback port; every handler runs on that thread's event
loop, so a slow answer (`latency_s`, a hang fault) never blocks the others.

- `responder(info) -> Reply`: what the model says (content, reasoning_content, finish_reason, usage).
- `faults(info) -> Fault | None`: per request, an injected fault: an HTTP status (500, 429 with
  Retry-After...), a hang longer than the client's timeout, or a replacement reply (truncated,
  malformed). `info.attempt` counts earlier requests with the same body, so "fail the first attempt
  only" is easy to express whatever order concurrent requests arrive in.

The bottom of the module holds QA fixtures: captions of a cooking video and hand-written answers in
the shapes DeepSeek-R1 really produces, `r1_responder`, which replays them, and `caption_rows`, caption
rows of a video for `stand_ins.Published` to publish as a complete `caption/`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass(frozen=True)
class Reply:
    content: str
    reasoning_content: str | None = None
    finish_reason: str = "stop"
    prompt_tokens: int | None = None  # None: estimated from the text (4 characters a token)
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclass(frozen=True)
class Fault:
    status: int | None = None  # answer with this HTTP error status
    retry_after: float | None = None  # Retry-After header (seconds) sent with the status
    hang_s: float | None = None  # wait this long first (returns early when the client gives up)
    reply: Reply | None = None  # answer 200 with this instead of the responder's reply
    message: str | None = None  # the error message sent with `status`
    cut_after_chunks: int | None = None  # streams only: end the stream after this many SSE events...
    cut_error: str | None = None  # ...with this error event and [DONE] (vLLM's way), or else by dropping the connection

    @classmethod
    def cut_stream(cls, after_chunks: int = 2, error: str | None = None) -> "Fault":
        """A stream cut mid-answer: the connection drops (a proxy timeout, a restarted server), or with
        `error` the server sends an error event and ends the stream (an inference engine that failed)."""
        return cls(cut_after_chunks=after_chunks, cut_error=error)

    @classmethod
    def server_error(cls, status: int = 500) -> "Fault":
        return cls(status=status)

    @classmethod
    def rate_limited(cls, retry_after: float) -> "Fault":
        return cls(status=429, retry_after=retry_after)

    @classmethod
    def hang(cls, seconds: float) -> "Fault":
        return cls(hang_s=seconds)

    @classmethod
    def truncated(cls, text: str, reasoning: str | None = None) -> "Fault":
        return cls(reply=Reply(text, reasoning_content=reasoning, finish_reason="length"))

    @classmethod
    def malformed(cls, text: str) -> "Fault":
        return cls(reply=Reply(text))


@dataclass(frozen=True)
class RequestInfo:
    index: int  # order of arrival, from 0
    attempt: int  # earlier requests with the very same body (0 = the first time)
    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    @property
    def text(self) -> str:
        """All text of all messages (image parts skipped)."""
        parts = []
        for message in self.messages:
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return "\n".join(parts)


Responder = Callable[[RequestInfo], Reply]
FaultPlan = Callable[[RequestInfo], Fault | None]


def echo_responder(info: RequestInfo) -> Reply:
    return Reply(f"echo: {info.text[-200:]}")


class OpenAITestServer:
    def __init__(
        self,
        responder: Responder = echo_responder,
        *,
        faults: FaultPlan | None = None,
        latency_s: float = 0.0,
        api_key: str | None = None,
        models: tuple[str, ...] = ("test-model",),
        chunk_chars: int = 24,
        max_hang_s: float = 30.0,
    ) -> None:
        self.responder = responder
        self.faults = faults
        self.latency_s = latency_s
        self.api_key = api_key
        self.models = models
        self.chunk_chars = chunk_chars
        self.max_hang_s = max_hang_s  # bounded: nothing waits longer than this
        self.requests: list[RequestInfo] = []
        self.responses: list[tuple[int, int]] = []  # (request index, HTTP status; 499 = client gave up, 0 = stream cut)
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self.port is not None, "server not started"
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "OpenAITestServer":
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted connections: without it, Nagle and the client's delayed ACK stall every
        # response written in two parts (headers, body) by ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))  # loopback only, ephemeral port
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1, timeout_keep_alive=30
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="openai-test-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "OpenAITestServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- counters --------------------------------------------------------------------------
    @property
    def total_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.responses.clear()
            self._seen.clear()
            self.max_in_flight = self.in_flight

    def statuses(self) -> Counter[int]:
        with self._lock:
            return Counter(status for _, status in self.responses)

    # -- handlers --------------------------------------------------------------------------
    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "lvr-tests"} for m in self.models]})

    async def _chat(self, request: Request) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "the body is not JSON")
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self._lock:
            info = RequestInfo(len(self.requests), self._seen[digest], body, dict(request.headers), time.monotonic())
            self._seen[digest] += 1
            self.requests.append(info)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        streaming = False
        try:
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return self._respond(info, _error(401, "invalid api key"))
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            fault = self.faults(info) if self.faults else None
            if fault and fault.hang_s:
                if await self._hang(request, min(fault.hang_s, self.max_hang_s)):
                    return self._respond(info, _error(499, "client closed the request"))
            if fault and fault.status:
                headers = {"retry-after": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
                return self._respond(info, _error(fault.status, fault.message or f"injected fault {fault.status}", headers))
            reply = fault.reply if fault and fault.reply else self.responder(info)
            model = body.get("model", self.models[0])
            if body.get("stream"):
                streaming = True
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return StreamingResponse(self._sse(info, reply, model, include_usage, fault), media_type="text/event-stream")
            return self._respond(info, JSONResponse(_completion(info, reply, model)))
        finally:
            if not streaming:
                with self._lock:
                    self.in_flight -= 1

    def _respond(self, info: RequestInfo, response: Response) -> Response:
        with self._lock:
            self.responses.append((info.index, response.status_code))
        return response

    async def _hang(self, request: Request, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as the client disconnects (gave up on us)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return True
            await asyncio.sleep(0.02)
        return False

    async def _sse(self, info: RequestInfo, reply: Reply, model: str, include_usage: bool, fault: Fault | None):
        try:
            base = {"id": f"chatcmpl-{info.index}", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
            events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
            for name, text in (("reasoning_content", reply.reasoning_content or ""), ("content", reply.content)):
                for i in range(0, len(text), self.chunk_chars):
                    events.append({"choices": [{"index": 0, "delta": {name: text[i : i + self.chunk_chars]}, "finish_reason": None}]})
            events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]})
            if include_usage:
                events.append({"choices": [], "usage": _usage(info, reply)})
            cut = fault.cut_after_chunks if fault else None
            for payload in events[:cut]:
                yield f"data: {json.dumps({**base, **payload})}\n\n"
            if cut is not None and cut < len(events):
                with self._lock:
                    self.responses.append((info.index, 0))
                if fault and fault.cut_error is None:
                    # Raising in the body makes uvicorn drop the connection without the chunked
                    # terminator: the client sees the body end early, as with a real cut.
                    raise ConnectionAbortedError("injected fault: stream cut")
                yield f"data: {json.dumps({'error': {'message': fault.cut_error, 'type': 'InternalServerError', 'code': 500}})}\n\n"
            else:
                with self._lock:
                    self.responses.append((info.index, 200))
            yield "data: [DONE]\n\n"
        finally:
            with self._lock:
                self.in_flight -= 1


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "test_fault", "code": status}}, status_code=status, headers=headers)


def _usage(info: RequestInfo, reply: Reply) -> dict[str, Any]:
    prompt = reply.prompt_tokens if reply.prompt_tokens is not None else max(1, len(info.text) // 4)
    reasoning = reply.reasoning_tokens
    if reasoning is None and reply.reasoning_content:
        reasoning = max(1, len(reply.reasoning_content) // 4)
    completion = reply.completion_tokens
    if completion is None:
        completion = max(1, len(reply.content) // 4) + (reasoning or 0)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def _completion(info: RequestInfo, reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning_content is not None:
        message["reasoning_content"] = reply.reasoning_content
    return {
        "id": f"chatcmpl-{info.index}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
        "usage": _usage(info, reply),
    }


# =====================================================================================================
# QA fixtures: a cooking video's captions and DeepSeek-R1 answers about it, written by hand in the
# shapes R1 really produces (a <think> preamble, reasoning_content, fenced JSON, trailing commas, the
# QUESTION / OPTIONS / ANSWER / REASONS layout, a lone </think> when the server ate the opening tag).
# =====================================================================================================

KITCHEN_CAPTIONS: list[tuple[float, float, str]] = [
    (0.0, 10.0, "A woman in a green apron rinses three red tomatoes under the kitchen tap and lays them on a wooden board."),
    (10.0, 20.0, "She dices the tomatoes and a yellow onion with a chef's knife and pushes the pieces into a white bowl."),
    (20.0, 30.0, "She pours olive oil into a black frying pan on a gas stove and adds the chopped onion, which starts to sizzle."),
    (30.0, 40.0, "The tomatoes go into the pan; she stirs the sauce with a wooden spoon while steam rises."),
    (40.0, 50.0, "She makes four hollows in the sauce, cracks an egg into each and covers the pan with a glass lid."),
    (50.0, 61.5, "She sprinkles chopped parsley over the finished shakshuka and carries the pan to a table set for two."),
]

_THINK = (
    "Okay, let me look at the captions. The video is a cooking sequence: tomatoes rinsed at 00:00-00:10, diced with an "
    "onion at 00:10-00:20, onion fried at 00:20-00:30, tomatoes added 00:30-00:40, eggs 00:40-00:50, served 00:50-01:01. "
    "I need a question that spans several clips. Wait, the question must not mention captions. Let me draft it."
)

R1_ANSWERS: dict[tuple[str, str], Reply] = {
    # JSON in a ```json fence after a <think> preamble; answer is a bare letter.
    ("Temporal", "multiple_choice"): Reply(
        f"<think>\n{_THINK}\n</think>\n\nHere is the question.\n\n```json\n"
        + json.dumps(
            {
                "questions": [
                    {
                        "question": "What does the woman do with the onion after dicing it and before the tomatoes go into the pan?",
                        "options": {
                            "A": "She rinses it under the tap",
                            "B": "She fries it in olive oil",
                            "C": "She sprinkles it over the eggs",
                            "D": "She leaves it in the white bowl until serving",
                        },
                        "answer": "B",
                        "reasoning": "Step 1: According to the captions, the onion is diced at 00:10-00:20.\n"
                        "Step 2: At 00:20-00:30 olive oil is poured into the pan and the onion is added and sizzles.\n"
                        "Step 3: The tomatoes only go into the pan at 00:30-00:40, so between dicing and the tomatoes the onion is fried (B).",
                    }
                ]
            },
            indent=2,
        )
        + "\n```"
    ),
    # DeepSeek API style: the thinking arrives separately as reasoning_content; content is plain JSON.
    ("Temporal", "open_ended"): Reply(
        json.dumps(
            {
                "question": "How many distinct cooking steps happen to the tomatoes between the moment they are rinsed and the moment eggs are added?",
                "answer": "Two: they are diced, then cooked into a sauce in the pan.",
                "reasoning": "1. 00:00-00:10 the tomatoes are rinsed.\n2. 00:10-00:20 they are diced.\n"
                "3. 00:30-00:40 they are cooked into a sauce with the onion.\n4. 00:40-00:50 the eggs are added, so there are two steps in between.",
            }
        ),
        reasoning_content=_THINK,
    ),
    # Trailing commas (R1 often leaves them) and an answer written "(C)".
    ("Goal and Purpose", "multiple_choice"): Reply(
        f"<think>\n{_THINK}\nThe goal is clearly a meal for two.\n</think>\n\n"
        "{\n"
        '  "question": "Considering everything she does across the video, what is the woman\'s overall goal?",\n'
        '  "options": {\n'
        '    "A": "To clean the kitchen before guests arrive",\n'
        '    "B": "To teach knife skills",\n'
        '    "C": "To cook a shakshuka and serve it for two people",\n'
        '    "D": "To preserve tomatoes for the winter",\n'
        "  },\n"
        '  "answer": "(C)",\n'
        '  "reasoning": "Step 1: The captions show her preparing tomatoes and onion (00:00-00:20).\\n'
        "Step 2: She builds a sauce in a pan and cooks eggs in it (00:20-00:50).\\n"
        'Step 3: At 00:50-01:01 she garnishes the shakshuka and carries it to a table set for two, so the goal is C.",\n'
        "}\n"
    ),
    # The paper's layout, no options (open-ended).
    ("Goal and Purpose", "open_ended"): Reply(
        f"<think>\n{_THINK}\n</think>\n\n"
        "QUESTION: Why does the woman make four hollows in the sauce before covering the pan?\n"
        "ANSWER: To hold the four eggs so that they poach in the sauce under the lid.\n"
        "REASONS: At 00:30-00:40 the sauce is simmering in the pan. At 00:40-00:50 she makes four hollows and cracks an egg into "
        "each, then covers the pan, which traps the steam so the eggs cook. At 00:50-01:01 the dish is finished, confirming the eggs were cooked in the sauce."
    ),
    # The paper's layout with markdown bold and an answer written as "B. text".
    ("Spatial", "multiple_choice"): Reply(
        f"<think>\n{_THINK}\n</think>\n\n"
        "**QUESTION:** Where does the dish end up at the end of the video, compared with where the tomatoes were first placed?\n"
        "**OPTIONS:**\n"
        "A. On the wooden board next to the tap\n"
        "B. On a table set for two, away from the stove and the board\n"
        "C. Inside the white bowl\n"
        "D. Back under the kitchen tap\n"
        "**ANSWER:** B. On a table set for two, away from the stove and the board\n"
        "**REASONS:** At 00:00-00:10 the tomatoes are laid on a wooden board by the tap. They move to the pan on the stove at "
        "00:30-00:40. At 00:50-01:01 the pan is carried to a table set for two, so the dish ends up at the table (B)."
    ),
    # A self-hosted R1 whose chat template swallowed the opening <think>: only </think> remains;
    # then a fenced JSON list.
    ("Spatial", "open_ended"): Reply(
        f"{_THINK}\n</think>\n\n```\n"
        + json.dumps(
            [
                {
                    "question": "Which piece of kitchen equipment do the tomatoes pass through between the wooden board and the frying pan?",
                    "answer": "A white bowl",
                    "reasoning": "1. 00:00-00:10: the tomatoes are on the wooden board.\n2. 00:10-00:20: after dicing they are pushed into a white bowl.\n"
                    "3. 00:30-00:40: they go into the frying pan. So they pass through the white bowl.",
                }
            ]
        )
        + "\n```"
    ),
    # Options as a list with letter prefixes, the answer given as the option's text.
    ("Plot and Narrative", "multiple_choice"): Reply(
        f"<think>\n{_THINK}\n</think>\n"
        + json.dumps(
            {
                "questions": [
                    {
                        "question": "Which event marks the turning point where the separate ingredients become one dish?",
                        "options": [
                            "A. The tomatoes are rinsed",
                            "B. The onion and tomatoes are cooked together in the pan",
                            "C. The parsley is sprinkled",
                            "D. The table is set for two",
                        ],
                        "answer": "The onion and tomatoes are cooked together in the pan",
                        "reasoning": "First, 00:00-00:20 shows ingredients prepared separately. Then at 00:20-00:40 the onion and tomatoes are "
                        "combined and cooked in one pan. Everything after (eggs 00:40-00:50, garnish 00:50-01:01) builds on that sauce.",
                    }
                ]
            }
        )
    ),
    # A question that speaks of captions: the parser must reject it.
    ("Plot and Narrative", "open_ended"): Reply(
        f"<think>\n{_THINK}\n</think>\n"
        + json.dumps(
            {
                "question": "According to the captions, what is the story arc of the video?",
                "answer": "From raw ingredients to a served meal.",
                "reasoning": "The captions go from rinsing (00:00-00:10) to serving (00:50-01:01).",
            }
        )
    ),
}

_CATEGORY = re.compile(r"^Category:\s*(.+?)\s*$", re.MULTILINE)
_TYPE = re.compile(r"^Question type:\s*(multiple-choice|open-ended)", re.MULTILINE)
_RANGE = re.compile(r"\b(\d{2}:\d{2})\s*(?:-|to)\s*(\d{2}:\d{2})\b")
REFINE_MARKER = "Rewrite the reasoning"


def is_refine_request(info: RequestInfo) -> bool:
    return REFINE_MARKER in info.text


def request_kind(info: RequestInfo) -> tuple[str, str]:
    """(category, question type) of a generation request, read from the prompt the way a model would."""
    category = _CATEGORY.search(info.text)
    qtype = _TYPE.search(info.text)
    if not category or not qtype:
        raise ValueError("not a QA generation request")
    return category.group(1), qtype.group(1).replace("-", "_")


def refined_reply(info: RequestInfo) -> Reply:
    """An R1-style rewrite: concise steps about the video that keep the time ranges of the original."""
    original = info.text.split("Original reasoning:", 1)[-1]
    ranges = list(dict.fromkeys(f"{a}-{b}" for a, b in _RANGE.findall(original)))
    steps = [f"{i}. Checking the video at {r}, I note what happens in that scene." for i, r in enumerate(ranges, 1)]
    steps.append(f"{len(steps) + 1}. Putting these scenes together leads to the answer.")
    return Reply(
        "\n".join(steps),
        reasoning_content="The user wants the reasoning rewritten concisely, about the video. Keep the time ranges.",
    )


def r1_responder(info: RequestInfo) -> Reply:
    """Replays `R1_ANSWERS` for generation requests and writes refinements for refine requests."""
    if is_refine_request(info):
        return refined_reply(info)
    return R1_ANSWERS[request_kind(info)]


def caption_rows(video_id: str, captions: list[tuple[float, float, str]]) -> list[dict[str, Any]]:
    """CAPTIONS rows of one video from (start_s, end_s, caption) triples."""
    return [
        {"clip_id": f"{video_id}-{i:05d}", "video_id": video_id, "start_s": a, "end_s": b, "caption": c, "model": "tiny", "backend": "hf",
         "prompt_hash": "p", "frames_used": 8, "tokens_in": 100, "tokens_out": 30, "latency_s": 0.1}
        for i, (a, b, c) in enumerate(captions)
    ]
