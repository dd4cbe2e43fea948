"""Endpoints and secrets: every OpenAI-compatible endpoint a run will call is configured and its key
variable is set (the value is never read into a message), and, when asked, answers one tiny request."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.config import PipelineConfig
from tasks.preflight.findings import Finding

PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of one stage: the config keys that set it, so a finding can name them."""

    stage: str
    purpose: str
    model: str
    base_url: str | None
    base_url_key: str
    api_key_env: str | None
    api_key_env_key: str


def endpoints_of(config: PipelineConfig, stages: list[str]) -> list[Endpoint]:
    """The endpoints the given stages will call."""
    found: list[Endpoint] = []
    if "caption" in stages and config.caption.backend == "openai":
        c = config.caption
        found.append(Endpoint("caption", "captions", c.model, c.base_url, "caption.base_url", c.api_key_env, "caption.api_key_env"))
    if "qa" in stages and config.qa.backend == "openai":
        q = config.qa
        found.append(Endpoint("qa", "questions", q.model, q.base_url, "qa.base_url", q.api_key_env, "qa.api_key_env"))
        refine_url = q.refine_base_url or q.base_url
        refine_key = q.refine_api_key_env or q.api_key_env
        if (q.refine_model or q.model, refine_url, refine_key) != (q.model, q.base_url, q.api_key_env):
            found.append(Endpoint(
                "qa", "refinement", q.refine_model or q.model, refine_url,
                "qa.refine_base_url" if q.refine_base_url else "qa.base_url", refine_key,
                "qa.refine_api_key_env" if q.refine_api_key_env else "qa.api_key_env",
            ))
    judge = config.judge
    judged = [s for s in ("filter", "grpo", "eval") if s in stages]
    if judge.model and judged:
        found.append(Endpoint(judged[0], "judge", judge.model, judge.base_url, "judge.base_url", judge.api_key_env, "judge.api_key_env"))
    return found


def check_endpoints(endpoints: list[Endpoint], env: Mapping[str, str]) -> list[Finding]:
    """A configured URL and a set key variable for each endpoint. A local server without a key
    (vLLM's default) is fine: no `api_key_env` means no key is sent."""
    findings: list[Finding] = []
    for e in endpoints:
        if not e.base_url:
            findings.append(Finding(e.stage, e.base_url_key, f"the {e.purpose} endpoint ({e.model}) has no URL; set it, e.g. "
                                    f"{e.base_url_key}=http://HOST:8000/v1 (any OpenAI-compatible server)"))
        if e.api_key_env and not env.get(e.api_key_env, "").strip():
            findings.append(Finding(e.stage, e.api_key_env, f"the environment variable {e.api_key_env} named by {e.api_key_env_key} "
                                    f"(the {e.purpose} endpoint's API key) is not set; export it, or unset {e.api_key_env_key} for a "
                                    "server without keys"))
    return findings


async def _probe_one(e: Endpoint, env: Mapping[str, str]) -> Finding | None:
    # Here, not at the top: the OpenAI client costs ~0.5 s to import, and most checks probe nothing.
    from models.openai_client import ChatClient, ChatRequestError

    key = env.get(e.api_key_env, "").strip() if e.api_key_env else "EMPTY"
    client = ChatClient(base_url=e.base_url, api_key=key, concurrency=1, timeout_s=PROBE_TIMEOUT_S, max_retries=1, backoff_s=0.5)
    try:
        await client.complete([{"role": "user", "content": "Reply with the word ok."}], model=e.model, max_tokens=1)
    except ChatRequestError as exc:
        return Finding(e.stage, e.base_url_key, f"the {e.purpose} endpoint {e.base_url} did not answer a one-token request "
                       f"for model {e.model}: {exc}")
    finally:
        await client.aclose()
    return None


def probe_endpoints(endpoints: list[Endpoint], env: Mapping[str, str]) -> list[Finding]:
    """One tiny request to each distinct configured endpoint (`lvr check --probe`)."""
    distinct = {(e.base_url, e.model, e.api_key_env): e for e in endpoints if e.base_url}

    async def probe_all() -> list[Finding | None]:
        return await asyncio.gather(*(_probe_one(e, env) for e in distinct.values()))

    return [f for f in asyncio.run(probe_all()) if f is not None]
