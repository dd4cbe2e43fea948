"""Clip captioners behind one interface, selected by `caption.backend`:

- `hf`: a transformers VLM on this machine (CUDA when present), batched generation;
- `openai`: any OpenAI-compatible VLM server (vLLM serve, SGLang, TensorRT-LLM, NIM); frames go as
  base64 JPEG image parts (or one `video_url`), concurrently under a limit, with retries;
- `vllm`: offline `vllm.LLM` batch inference (GPU machines; imported only when selected).

Every backend receives frames sampled by the one sampling function (`models.video.read_frames`)
and returns one `CaptionResult` per clip, with an error instead of a caption when that clip failed.
The video token budget (`CaptionSettings.budget`) applies where lvr preprocesses the frames (`hf`);
`openai` and `vllm` servers resize frames by their own settings.

`hf` reads and resizes frames in `prefetch_workers` worker processes, `prefetch_depth` clips ahead of
the model (`models.prefetch`), so the model does not wait on the CPU; 0 workers reads them in line.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Protocol

from models.openai_client import ChatClient, ChatRequestError, read_api_key
from models.prefetch import FrameJob, Prefetcher, read_resized_frames
from models.video import (
    FrameSampling,
    SampledFrames,
    VideoTokenBudget,
    read_frames,
    worst_case_frames,
)
from models.vlm import (
    GenerationTiming,
    HFVideoLM,
    VideoPrompt,
    resolve_model_ref,
    video_messages,
)


@dataclass(frozen=True)
class ClipRequest:
    clip_id: str
    path: str  # a local file (the stage fetches remote clips first)


# Error kinds of a clip that got no caption: its file could not be read, or its request got no answer.
UNREADABLE_CLIP = "unreadable_clip"
REQUEST_FAILED = "request_failed_"  # + the request error's kind


@dataclass(frozen=True)
class CaptionResult:
    clip_id: str
    caption: str
    frames_used: int
    tokens_in: int
    tokens_out: int
    latency_s: float
    distinct_tokens: int | None = None
    error_kind: str | None = None
    error: str | None = None


@dataclass
class CaptionTiming:
    """Where a captioner's time went: decoding frames, preprocessing, the model."""

    decode_s: float = 0.0  # with prefetching: the time spent waiting for frames, not hidden behind the model
    generation: GenerationTiming = field(default_factory=GenerationTiming)


@dataclass(frozen=True)
class CaptionSettings:
    prompt: str
    sampling: FrameSampling
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int
    seed: int = 0
    budget: VideoTokenBudget | None = None
    prefetch_workers: int = 0  # hf: processes reading frames ahead of the model; 0 reads them in line
    prefetch_depth: int = 8  # clips read ahead (at least one batch)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


class Captioner(Protocol):
    backend: str
    model: str
    timing: CaptionTiming

    def caption(self, clips: Sequence[ClipRequest]) -> list[CaptionResult]: ...

    def close(self) -> None:
        """Release what the captioner holds beyond the model (worker processes); idempotent."""


def _sample(clip: ClipRequest, sampling: FrameSampling, timing: CaptionTiming) -> SampledFrames:
    started = time.perf_counter()
    frames = read_frames(clip.path, sampling)
    timing.decode_s += time.perf_counter() - started
    return frames


def _seed_for(clip_ids: Sequence[str], base: int) -> int:
    # Sampling stays reproducible for a given batch however shards are scheduled.
    return (int(hashlib.sha256("|".join(clip_ids).encode()).hexdigest()[:8], 16) + base) % (2**31)


class HFCaptioner:
    backend = "hf"

    def __init__(
        self, model: str, settings: CaptionSettings, *, trust_remote_code: bool = False, revision: str | None = None, device: str = "auto"
    ):
        self.model = model
        self.settings = settings
        self.prefetcher = (
            Prefetcher(settings.prefetch_workers, max(settings.prefetch_depth, settings.batch_size)) if settings.prefetch_workers else None
        )
        if self.prefetcher is not None:
            self.prefetcher.start()  # while the model loads
        try:
            self.lm = HFVideoLM(model, device=device, trust_remote_code=trust_remote_code, revision=revision, budget=settings.budget)
        except BaseException:
            self.close()
            raise
        self.timing = CaptionTiming()

    def _frames(self, clips: Sequence[ClipRequest]) -> Iterator[Callable[[], SampledFrames]]:
        """Per clip, in order, a call that returns its frames or raises why they could not be read."""
        s = self.settings
        if self.prefetcher is None:
            for clip in clips:
                yield lambda clip=clip: _sample(clip, s.sampling, self.timing)
            return
        jobs = (FrameJob(c.path, s.sampling, self.lm.preprocess, s.budget) for c in clips)
        for future in self.prefetcher.map(read_resized_frames, jobs):
            yield lambda future=future: self._wait(future)

    def _wait(self, future: Future) -> SampledFrames:
        started = time.perf_counter()
        try:
            return future.result()
        finally:
            self.timing.decode_s += time.perf_counter() - started

    def caption(self, clips: Sequence[ClipRequest]) -> list[CaptionResult]:
        try:
            return self._caption(clips)
        except BrokenProcessPool:
            # A worker died (killed, out of memory): a fault of the machine, not of a clip. The next
            # call starts a fresh pool.
            if self.prefetcher is not None:
                self.prefetcher.close()
            raise

    def _caption(self, clips: Sequence[ClipRequest]) -> list[CaptionResult]:
        results: list[CaptionResult] = []
        s = self.settings
        frames_of = self._frames(clips)
        for start in range(0, len(clips), s.batch_size):
            batch = list(clips[start : start + s.batch_size])
            prompts, readable = [], []
            for clip, read in zip(batch, frames_of):
                try:
                    frames = read()
                except BrokenProcessPool:
                    raise
                except Exception as exc:  # an unreadable clip fails alone, not its batch
                    results.append(CaptionResult(clip.clip_id, "", 0, 0, 0, 0.0, error_kind=UNREADABLE_CLIP, error=str(exc)))
                    continue
                prompts.append(VideoPrompt(video_messages(s.prompt), frames))
                readable.append((clip, len(frames)))
            if not prompts:
                continue
            started = time.perf_counter()
            generations = self.lm.generate(
                prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                seed=_seed_for([c.clip_id for c, _ in readable], s.seed), timing=self.timing.generation,
            )
            latency = (time.perf_counter() - started) / len(prompts)
            for (clip, n_frames), (gen,) in zip(readable, generations):
                results.append(CaptionResult(clip.clip_id, gen.text, n_frames, gen.tokens_in, gen.tokens_out, latency, gen.distinct_tokens))
        order = {c.clip_id: i for i, c in enumerate(clips)}
        return sorted(results, key=lambda r: order[r.clip_id])

    def close(self) -> None:
        """Stop the frame workers (they also stop with the process)."""
        if self.prefetcher is not None:
            self.prefetcher.close()


def frames_to_jpeg_data_urls(frames: SampledFrames, quality: int = 90) -> list[str]:
    from PIL import Image

    urls = []
    for frame in frames.frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def openai_caption_messages(prompt: str, frames: SampledFrames | None, video_url: str | None = None) -> list[dict[str, Any]]:
    """The user turn: every sampled frame as an image part (in time order), then the prompt; or one
    `video_url` part for servers that decode video themselves."""
    if video_url is not None:
        parts: list[dict[str, Any]] = [{"type": "video_url", "video_url": {"url": video_url}}]
    else:
        assert frames is not None
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in frames_to_jpeg_data_urls(frames)]
    parts.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": parts}]


class OpenAICaptioner:
    """Captions from an OpenAI-compatible VLM server, `concurrency` requests in flight at most."""

    backend = "openai"

    def __init__(
        self, model: str, settings: CaptionSettings, *, base_url: str | None, api_key: str, concurrency: int,
        timeout_s: float, max_retries: int, send_video_url: bool = False,
    ):
        self.model = model
        self.settings = settings
        self.base_url = base_url
        self._api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.send_video_url = send_video_url
        self.timing = CaptionTiming()

    @classmethod
    def from_config(cls, cfg: Any, settings: CaptionSettings) -> "OpenAICaptioner":
        return cls(
            cfg.model, settings, base_url=cfg.base_url, api_key=read_api_key(cfg.api_key_env), concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, send_video_url=cfg.send_video_url,
        )

    def close(self) -> None:
        """Nothing to release: each `caption` call opens and closes its own client."""

    def _messages(self, clip: ClipRequest) -> tuple[list[dict[str, Any]], int]:
        if self.send_video_url:
            with open(clip.path, "rb") as fh:
                url = "data:video/mp4;base64," + base64.b64encode(fh.read()).decode()
            return openai_caption_messages(self.settings.prompt, None, video_url=url), worst_case_frames(self.settings.sampling)
        frames = _sample(clip, self.settings.sampling, self.timing)
        return openai_caption_messages(self.settings.prompt, frames), len(frames)

    def caption(self, clips: Sequence[ClipRequest]) -> list[CaptionResult]:
        return run_async(self._caption_all(list(clips)))

    async def _caption_all(self, clips: list[ClipRequest]) -> list[CaptionResult]:
        async with ChatClient(
            base_url=self.base_url, api_key=self._api_key, concurrency=self.concurrency, timeout_s=self.timeout_s,
            max_retries=self.max_retries,
        ) as client:
            return list(await asyncio.gather(*(self._caption_one(client, clip) for clip in clips)))

    async def _caption_one(self, client: Any, clip: ClipRequest) -> CaptionResult:
        try:
            messages, n_frames = await asyncio.to_thread(self._messages, clip)
        except Exception as exc:
            return CaptionResult(clip.clip_id, "", 0, 0, 0, 0.0, error_kind=UNREADABLE_CLIP, error=str(exc))
        s = self.settings
        try:
            result = await client.complete(
                messages, model=self.model, temperature=s.temperature, max_tokens=s.max_new_tokens,
                extra_body={"top_p": s.top_p, "seed": s.seed},
            )
        except ChatRequestError as exc:
            # A wrong key, model or URL fails every clip the same way, and an endpoint that is down
            # says nothing about this clip: both stop the shard (retried, or redone by a rerun)
            # instead of recording the clip as failed.
            if exc.fatal or exc.transient:
                raise
            return CaptionResult(clip.clip_id, "", n_frames, 0, 0, 0.0, error_kind=f"{REQUEST_FAILED}{exc.kind}", error=str(exc))
        return CaptionResult(
            clip.clip_id, result.content.strip(), n_frames, result.prompt_tokens or 0, result.completion_tokens or 0, result.latency_s,
        )


class VLLMCaptioner:
    """Offline batch inference with `vllm.LLM` (GPU machines; `pip install .[gpu]`)."""

    backend = "vllm"

    def __init__(self, model: str, settings: CaptionSettings, *, trust_remote_code: bool = False, revision: str | None = None):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:  # pragma: no cover - exercised on GPU machines only
            raise RuntimeError("caption.backend=vllm needs vLLM: install the `gpu` extra on a CUDA machine") from exc
        self.model = model
        self.settings = settings
        self.timing = CaptionTiming()
        self.llm = LLM(
            model=resolve_model_ref(model), trust_remote_code=trust_remote_code, revision=revision, tokenizer_revision=revision,
            limit_mm_per_prompt={"video": 1},
        )
        self.params = SamplingParams(
            max_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed
        )
        self.tokenizer = self.llm.get_tokenizer()

    def close(self) -> None:  # pragma: no cover - GPU only
        """Nothing held beyond the engine, which goes with this object."""

    def caption(self, clips: Sequence[ClipRequest]) -> list[CaptionResult]:  # pragma: no cover - GPU only
        s = self.settings
        requests, kept, results = [], [], []
        for clip in clips:
            try:
                frames = _sample(clip, s.sampling, self.timing)
            except Exception as exc:
                results.append(CaptionResult(clip.clip_id, "", 0, 0, 0, 0.0, error_kind=UNREADABLE_CLIP, error=str(exc)))
                continue
            prompt = self.tokenizer.apply_chat_template(video_messages(s.prompt), tokenize=False, add_generation_prompt=True)
            requests.append({"prompt": prompt, "multi_modal_data": {"video": frames.frames}})
            kept.append((clip, len(frames)))
        started = time.perf_counter()
        outputs = self.llm.generate(requests, self.params) if requests else []
        latency = (time.perf_counter() - started) / max(1, len(requests))
        for (clip, n_frames), out in zip(kept, outputs):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            results.append(
                CaptionResult(clip.clip_id, completion.text.strip(), n_frames, len(out.prompt_token_ids), len(ids), latency, len(set(ids)))
            )
        order = {c.clip_id: i for i, c in enumerate(clips)}
        return sorted(results, key=lambda r: order[r.clip_id])


def run_async(coro):
    """Run a coroutine from sync code, also when an event loop is already running in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
