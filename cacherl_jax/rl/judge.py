"""An LLM judge over any OpenAI-compatible endpoint, with its verdicts cached on disk.

The judge reads the request, the tool results the rollout saw (optional) and the final answer,
and replies `Score: N` with N in 0..5; the score is N / 5. Verdicts are cached in SQLite by a
hash of (model, prompt), so a rerun, or the same answer in another group, costs nothing. A call
that times out, errors after its retries or replies without a score is a `Judgement` with
`score=None` and the error: the reward records it and never scores it 0 silently.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

JUDGE_SYSTEM_PROMPT = (
    "You grade the final answer of a tool-using assistant. Given the user's request, the tool "
    "results the assistant saw and a reference answer when there is one, rate how well the "
    "final answer fulfils the request: 5 correct and complete, 3 partly correct, 0 wrong, "
    "missing, or only describing what it would do. Reply with one line: Score: N (N in 0..5)."
)
_SCORE_RE = re.compile(r"score\s*[:=]\s*([0-5](?:\.\d+)?)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Judgement:
    score: float | None  # in [0, 1]; None when the judge failed
    raw: str = ""
    error: str | None = None
    cached: bool = False

    def as_answer(self) -> tuple[float | None, str | None]:
        """What `rewards.score_rollout(judge_answer=...)` takes."""
        return self.score, self.error


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from config
    cache_path: str = ""  # "" : no disk cache
    timeout_s: float = 60.0
    max_retries: int = 2
    max_workers: int = 8
    temperature: float = 0.0


def parse_score(text: str) -> float | None:
    """N / 5 from the last `Score: N` in the reply, or None."""
    matches = _SCORE_RE.findall(text or "")
    if not matches:
        return None
    value = float(matches[-1])
    return value / 5.0 if 0.0 <= value <= 5.0 else None


def judge_prompt(
    request: str, answer: str, reference: str | None, tool_results: Sequence[str]
) -> str:
    parts = [f"User request:\n{request}"]
    if tool_results:
        parts.append("Tool results the assistant saw:\n" + "\n".join(tool_results))
    if reference is not None:
        parts.append(f"Reference answer:\n{reference}")
    parts.append(f"Assistant's final answer:\n{answer}")
    return "\n\n".join(parts)


class _VerdictCache:
    """SQLite (WAL) map from prompt hash to the judge's reply; safe across threads and processes."""

    def __init__(self, path: str):
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connection() as db:
            db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, reply TEXT)")

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=30.0)
                db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.DatabaseError as err:
                raise ValueError(f"{self.path}: not a usable judge cache ({err})") from None
            self._local.db = db
        return db

    def get(self, key: str) -> str | None:
        row = (
            self._connection()
            .execute("SELECT reply FROM verdicts WHERE key = ?", (key,))
            .fetchone()
        )
        return None if row is None else row[0]

    def put(self, key: str, reply: str) -> None:
        with self._connection() as db:
            db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", (key, reply))


class LLMJudge:
    def __init__(self, config: JudgeConfig):
        import openai  # the well-kept client: retries with backoff, timeouts, error types

        self.config = config
        self._client = openai.OpenAI(
            base_url=config.base_url,
            api_key=os.environ.get(config.api_key_env, "not-needed"),
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )
        self._errors = (openai.OpenAIError,)
        self._cache = _VerdictCache(config.cache_path) if config.cache_path else None

    def _key(self, prompt: str) -> str:
        blob = json.dumps([self.config.model, JUDGE_SYSTEM_PROMPT, prompt])
        return hashlib.sha256(blob.encode()).hexdigest()

    def judge(
        self,
        request: str,
        answer: str,
        reference: str | None = None,
        tool_results: Sequence[str] = (),
    ) -> Judgement:
        prompt = judge_prompt(request, answer, reference, tool_results)
        key = self._key(prompt)
        if self._cache is not None:
            reply = self._cache.get(key)
            if reply is not None:
                return Judgement(parse_score(reply), reply, cached=True)
        try:
            response = self._client.chat.completions.create(
                model=self.config.model,
                messages=[
                    {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                    {"role": "user", "content": prompt},
                ],
                temperature=self.config.temperature,
            )
            reply = response.choices[0].message.content or ""
        except self._errors as err:
            return Judgement(None, error=f"{type(err).__name__}: {err}")
        score = parse_score(reply)
        if score is None:
            return Judgement(None, reply, error=f"no 'Score: N' in the reply: {reply[:200]!r}")
        if self._cache is not None:  # only verdicts that parse are worth keeping
            self._cache.put(key, reply)
        return Judgement(score, reply)

    def judge_many(self, items: Sequence[dict]) -> list[Judgement]:
        """`judge(**item)` for each item, concurrently; results in the items' order."""
        with concurrent.futures.ThreadPoolExecutor(self.config.max_workers) as pool:
            return list(pool.map(lambda item: self.judge(**item), items))
