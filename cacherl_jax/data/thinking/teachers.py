"""Teachers: whatever writes the reasoning for one step, behind one interface.

    teacher.explain(TeacherRequest(step, messages, attempt, seed)) -> TeacherReply

- `EndpointTeacher`: any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API, our own
  `cacherl serve`). Requests run on `concurrency` threads; each is retried on timeouts, 429/5xx,
  connection errors and malformed bodies with exponential backoff and full jitter; token usage is
  read from the responses and priced per million tokens.
- `LocalTeacher`: a checkpoint on this host through our sampler; concurrent requests are batched.
- `TemplateTeacher`: deterministic reasoning built from the request, the tool schema and the call;
  offline, free, for tests and for pipelines that only need the format.

`explain` is thread-safe. It raises `TeacherError` (with a short `reason` such as "timeout",
"http_500", "malformed_response") when no reply could be had; a reply whose text fails validation
is not an error here, the pipeline asks again.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cacherl_jax.chat.template import last_query_index
from cacherl_jax.data.thinking.rules import Step, unit_hash

if TYPE_CHECKING:
    from cacherl_jax.chat.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TEACHER_KINDS = ("template", "endpoint", "local")


@dataclasses.dataclass(frozen=True)
class TeacherRequest:
    """One step to explain: the structured step and the prompt built from it."""

    step: Step
    messages: list[dict[str, str]]  # the prompt as chat messages (see prompts.teacher_messages)
    attempt: int = 0  # 0 for the first try; later attempts follow a rejected reply
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TeacherReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    retries: int = 0  # transport retries it took


class TeacherError(Exception):
    """No reply after the retries. `reason` is a short label counted in the summary."""

    def __init__(self, reason: str, message: str, *, retries: int = 0):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.retries = retries


class Teacher(abc.ABC):
    name: str = "teacher"
    concurrency: int = 1  # requests the pipeline keeps in flight
    reads_prompt: bool = True  # False: it works from `request.step` alone (no prompt is built)
    deterministic: bool = False  # True: asking again gives the same text, so no second attempt

    @abc.abstractmethod
    def explain(self, request: TeacherRequest) -> TeacherReply: ...

    def close(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Releases connections, threads or device memory."""


# --- the template teacher ---------------------------------------------------------------------

_SNIPPET_MARKUP_RE = re.compile(r"</?(?:tool_call|tool_response|think)>|<\|[a-z_]+\|>")


def _snippet(text: str, limit: int) -> str:
    """Plain one-line text, cut to `limit` characters, with chat markup removed."""
    text = " ".join(_SNIPPET_MARKUP_RE.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return f'"{_snippet(value, 80)}"'
    return _snippet(json.dumps(value, ensure_ascii=False), 80)


def _first_sentence(text: str) -> str:
    # BFCL descriptions open with the class ("This tool belongs to ...") before the tool's own.
    text = text.split("Tool description:", 1)[-1]
    sentence = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0].rstrip(".")
    return sentence[:1].lower() + sentence[1:] if sentence else ""


def _descriptions(tools: list[dict[str, Any]]) -> dict[str, str]:
    out = {}
    for tool in tools:
        function = tool.get("function") or tool
        out[function["name"]] = _snippet(_first_sentence(function.get("description") or ""), 120)
    return out


def template_reasoning(step: Step) -> str:
    """Deterministic reasoning for a step: the request, the latest result, the call and its values.

    The wording varies with a hash of (record, step) so that a model trained on it does not see one
    sentence thousands of times; the content follows only from the data.
    """
    query = last_query_index(step.context) if step.context else -1
    request = ""
    if 0 <= query < len(step.context) and step.context[query]["role"] == "user":
        request = _snippet(step.context[query].get("content") or "", 200)
    results = [m for m in step.context[query + 1 :] if m["role"] == "tool"]
    variant = int(unit_hash("template", step.record_id, step.index) * 3)

    if results:
        last = results[-1]
        source = last.get("name") or "the last tool"
        opening = [
            f"{last.get('name') or 'The last tool'} returned {_snippet(last.get('content') or '', 160)}.",
            f"The result of {source} is {_snippet(last.get('content') or '', 160)}.",
            f"So far {len(results)} tool call(s) ran; the latest, {source}, gave "
            f"{_snippet(last.get('content') or '', 160)}.",
        ][variant]
    elif request:
        opening = [
            f'The user asks: "{request}".',
            f'The request is: "{request}".',
            f'I need to handle this request: "{request}".',
        ][variant]
    else:
        opening = "I continue with the task."

    if step.kind == "answer":
        if results:
            closing = [
                "That is all the information the request needs, so I can give the final answer now.",
                "With these results the request is settled; I will answer directly.",
                "Nothing else needs to be looked up, so I can reply to the user.",
            ][variant]
        else:
            closing = "No tool is needed for this; I can answer directly."
        return f"{opening} {closing}"

    descriptions = _descriptions(step.tools)
    plans = []
    for name, arguments in step.calls:
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
        values = ", ".join(f"{key} set to {_value_text(value)}" for key, value in arguments.items())
        purpose = descriptions.get(name, "")
        plan = f"{name}" + (f" ({purpose})" if purpose else "")
        plans.append(plan + (f" with {values}" if values else " with no arguments"))
    if len(plans) == 1:
        action = [
            f"Next I will call {plans[0]}.",
            f"The next step is to use {plans[0]}.",
            f"I should call {plans[0]}.",
        ][variant]
    else:
        action = f"I need {len(plans)} calls now: " + "; ".join(plans) + "."
    return f"{opening} {action}"


class TemplateTeacher(Teacher):
    """Reasoning from `template_reasoning`: no model, no cost, the same text on every run."""

    name = "template"
    concurrency = 1  # pure Python: the pipeline runs it inline
    reads_prompt = False
    deterministic = True

    def explain(self, request: TeacherRequest) -> TeacherReply:
        return TeacherReply(template_reasoning(request.step))


# --- the OpenAI-compatible endpoint teacher ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from config
    concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 1024
    send_seed: bool = True
    price_input_per_mtok: float = 0.0  # USD per million prompt tokens
    price_output_per_mtok: float = 0.0  # USD per million completion tokens
    extra_body: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.base_url or not self.model:
            raise ValueError("an endpoint teacher needs base_url and model")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError(
                "need concurrency >= 1, max_retries >= 0 and timeout_s > 0, got "
                f"{self.concurrency}, {self.max_retries}, {self.timeout_s}"
            )


class _Malformed(Exception):
    pass


def backoff_delay(retry: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max_s, initial_s * 2**retry)] (retry counts from 0)."""
    return rng.uniform(0.0, min(max_s, initial_s * 2.0**retry))


def _reply_text(body: str) -> tuple[str, int, int]:
    """(content, prompt tokens, completion tokens) of a chat-completion body; raises _Malformed."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Malformed(f"the body is not JSON ({exc})") from None
    try:
        message = payload["choices"][0]["message"]
        content = message.get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise _Malformed(f"no choices[0].message in the body: {body[:200]!r}") from None
    if content is not None and not isinstance(content, str):
        raise _Malformed(f"choices[0].message.content is a {type(content).__name__}")
    usage = payload.get("usage") if isinstance(payload, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    prompt_tokens = usage.get("prompt_tokens") or 0
    completion_tokens = usage.get("completion_tokens") or 0
    return content or "", int(prompt_tokens), int(completion_tokens)


class EndpointTeacher(Teacher):
    def __init__(self, config: EndpointConfig):
        import openai  # the maintained client; its own retries are off, ours are counted

        self.config = config
        self.name = f"endpoint:{config.model}"
        self.concurrency = config.concurrency
        self._openai = openai
        self._client = openai.OpenAI(
            base_url=config.base_url,
            api_key=os.environ.get(config.api_key_env, "not-needed"),
            timeout=config.timeout_s,
            max_retries=0,
        )
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    def _delay(self, retry: int, retry_after: float | None) -> float:
        with self._rng_lock:
            delay = backoff_delay(
                retry, self.config.backoff_initial_s, self.config.backoff_max_s, self._rng
            )
        if retry_after is not None:  # a 429/503 that says when to come back
            delay = max(delay, min(retry_after, self.config.backoff_max_s))
        return delay

    def _once(self, request: TeacherRequest) -> TeacherReply:
        config = self.config
        kwargs: dict[str, Any] = {
            "model": config.model,
            "messages": request.messages,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_tokens": config.max_tokens,
            "timeout": config.timeout_s,
        }
        if config.send_seed:
            kwargs["seed"] = request.seed
        if config.extra_body:
            kwargs["extra_body"] = dict(config.extra_body)
        raw = self._client.chat.completions.with_raw_response.create(**kwargs)
        text, prompt_tokens, completion_tokens = _reply_text(raw.text)
        cost = (
            prompt_tokens * config.price_input_per_mtok
            + completion_tokens * config.price_output_per_mtok
        ) / 1e6
        return TeacherReply(text, prompt_tokens, completion_tokens, cost)

    def explain(self, request: TeacherRequest) -> TeacherReply:
        openai = self._openai
        for retry in range(self.config.max_retries + 1):
            retry_after = None
            try:
                reply = self._once(request)
                return dataclasses.replace(reply, retries=retry)
            except openai.APITimeoutError as exc:
                reason, detail, retryable = "timeout", str(exc), True
            except openai.APIStatusError as exc:
                status = exc.status_code
                reason, detail = f"http_{status}", str(exc)[:300]
                retryable = status in (408, 409, 429) or status >= 500
                header = exc.response.headers.get("retry-after")
                try:
                    retry_after = float(header) if header else None
                except ValueError:
                    retry_after = None
            except openai.APIConnectionError as exc:
                reason, detail, retryable = "connection_error", str(exc), True
            except _Malformed as exc:
                reason, detail, retryable = "malformed_response", str(exc), True
            if not retryable or retry == self.config.max_retries:
                raise TeacherError(reason, detail, retries=retry)
            logger.debug("teacher request failed (%s), retry %d", reason, retry + 1)
            time.sleep(self._delay(retry, retry_after))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._client.close()


# --- the local checkpoint teacher -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    checkpoint: str  # a Hugging Face directory or our orbax checkpoint
    tokenizer: str = ""  # "qwen3", a tokenizer directory, or "" for the checkpoint's tokenizer.json
    max_batch: int = 32  # requests generated together (also the pipeline's concurrency)
    batch_window_s: float = 0.05
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    context_len: int = 4096
    enable_thinking: bool = False  # True: let a thinking model think first; its answer is kept

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError("a local teacher needs teacher.local.checkpoint (a model directory)")
        if self.max_batch < 1 or self.max_tokens < 1:
            raise ValueError(
                f"need max_batch and max_tokens >= 1, got {self.max_batch}, {self.max_tokens}"
            )


class LocalTeacher(Teacher):
    """A checkpoint on this host, sampled with our KV-cache sampler; concurrent requests from the
    pipeline's threads are generated as one batch (`cacherl_jax.sampling.batching`)."""

    def __init__(self, config: LocalConfig):
        from pathlib import Path

        from cacherl_jax.chat.tokenizer import TokenizerError, load_tokenizer
        from cacherl_jax.model import hf_checkpoint, native_checkpoint
        from cacherl_jax.sampling import Sampler
        from cacherl_jax.sampling.batching import BatchingEngine

        if native_checkpoint.is_native_checkpoint(config.checkpoint):
            model_config, params = native_checkpoint.load_params(config.checkpoint)
        else:
            model_config, params = hf_checkpoint.load_hf_checkpoint(config.checkpoint)
        spec = config.tokenizer or config.checkpoint
        if not config.tokenizer and not (Path(config.checkpoint) / "tokenizer.json").exists():
            raise TokenizerError(
                f"{config.checkpoint} has no tokenizer.json: set teacher.local.tokenizer"
            )
        self.tokenizer: Tokenizer = load_tokenizer(spec)
        self.config = config
        self.name = f"local:{Path(config.checkpoint).name}"
        self.concurrency = config.max_batch
        self.context_len = min(config.context_len, model_config.max_position_embeddings)
        self._engine = BatchingEngine(
            Sampler(params, model_config),
            max_batch=config.max_batch,
            batch_window_s=config.batch_window_s,
        )

    def explain(self, request: TeacherRequest) -> TeacherReply:
        from cacherl_jax.chat.template import render_prompt
        from cacherl_jax.sampling import SamplingParams

        config, tokenizer = self.config, self.tokenizer
        prompt_ids = render_prompt(
            request.messages, None, tokenizer, enable_thinking=config.enable_thinking
        ).token_ids.tolist()
        room = self.context_len - len(prompt_ids)
        if room < 1:
            raise TeacherError(
                "prompt_too_long", f"{len(prompt_ids)} prompt tokens, context {self.context_len}"
            )
        special = tokenizer.special
        sampling = SamplingParams(
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=min(config.max_tokens, room),
            stop_token_ids=(special.im_end, special.endoftext),
            seed=request.seed,
        )
        try:
            (generation,) = self._engine.submit(prompt_ids, [sampling])
        except Exception as exc:  # the sampler's failure is this request's failure, not a crash
            raise TeacherError("sampler_error", f"{type(exc).__name__}: {exc}") from exc
        token_ids = [int(t) for t in generation.token_ids]
        if token_ids and token_ids[-1] in sampling.stop_token_ids:
            token_ids = token_ids[:-1]
        answer = tokenizer.decode(token_ids)
        # A thinking model's own deliberation is not the reasoning we asked for: keep its answer.
        if "</think>" in answer:
            answer = answer.split("</think>", 1)[1]
        return TeacherReply(answer, len(prompt_ids), len(generation))

    def close(self) -> None:
        self._engine.close()


def _values(section: Any) -> dict[str, Any]:
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def make_teacher(config: Any) -> Teacher:
    """The teacher `config.kind` names, from an ml-collections `teacher` section."""
    kind = config.kind
    if kind == "template":
        return TemplateTeacher()
    if kind == "endpoint":
        values = _values(config.endpoint)
        extra = values.pop("extra_body_json", "")
        if extra:
            try:
                values["extra_body"] = json.loads(extra)
            except json.JSONDecodeError as exc:
                raise ValueError(f"extra_body_json is not JSON: {exc}") from None
        return EndpointTeacher(EndpointConfig(**values))
    if kind == "local":
        return LocalTeacher(LocalConfig(**_values(config.local)))
    raise ValueError(f"unknown teacher kind {kind!r} (one of {', '.join(TEACHER_KINDS)})")
