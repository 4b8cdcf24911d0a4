"""A teacher LLM behind any OpenAI-compatible ``/v1/chat/completions`` endpoint
(OpenAI, vLLM, llama.cpp server, Ollama, ...), as the paper uses GPT-3.5.

Requests run concurrently up to ``max_concurrency``; connect errors, timeouts, HTTP
429 and 5xx are retried with exponential backoff (``backoff * 2**attempt`` seconds,
or the server's ``Retry-After`` when it sends one); any other 4xx raises
:class:`TeacherError` at once, since retrying a bad request, key or model name
cannot help.
"""

from __future__ import annotations

import asyncio

import httpx

from instructrec.training.retry_after import retry_after_seconds
from instructrec.training.annotate.teachers import AnnotationRequest, Kind, TeacherError, facets

SYSTEM_PROMPT = (
    "You help build training data for a recommender system by role-playing its users. "
    "Speak as the user, in the first person and in plain, natural language: one or two short sentences. "
    "Reply with the statement only: no preamble, no lists, no quotation marks, no explanations."
)

MAX_TEXT_CHARS = 1500  # of a review or description put into a prompt
MAX_DELAY = 60.0  # cap on one wait between attempts, Retry-After included


def _trim(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def user_prompt(request: AnnotationRequest) -> str | None:
    """The user message for one request, or None when there is nothing to prompt with."""
    if request.kind is Kind.PREFERENCE:
        if not request.history_titles:
            return None
        lines = []
        cats = request.history_categories
        for i, title in enumerate(request.history_titles):
            extra = f" ({', '.join(cats[i])})" if i < len(cats) and cats[i] else ""
            lines.append(f"{i + 1}. {title}{extra}")
        return (
            "These are the items a user interacted with, oldest first:\n"
            + "\n".join(lines)
            + "\n\nActing as this user, state your general preferences in one or two sentences: the kinds of "
            "items, genres, themes, platforms or qualities you like. Generalise from the list rather than "
            "repeating it item by item."
        )
    if request.kind is Kind.VAGUE:
        parts = [f"Item (for your understanding only): {request.target_title}"]
        if request.target_categories:
            parts.append(f"Categories: {', '.join(request.target_categories)}")
        if request.target_description:
            parts.append(f"Description: {_trim(request.target_description)}")
        if request.target_review:
            parts.append(f"The user's own review of it: {_trim(request.target_review)}")
        return (
            "A user has just chosen the item below.\n"
            + "\n".join(parts)
            + "\n\nActing as this user before they found it, describe in one or two sentences the need or "
            "wish that led to this choice: what you wanted it for, for whom, what it should be like. Keep it "
            "vague, and do not name the item, its series, its brand or its platform."
        )
    fs = facets(request.target_title, request.target_categories)
    if not fs:
        return None
    return (
        f"A user is looking for an item with these attributes: {', '.join(fs)}.\n\n"
        "Acting as this user, write the request you would type into a shop's search box, in one short "
        "sentence. Mention those attributes, but no particular item title."
    )


class OpenAITeacher:
    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        temperature: float = 0.7,
        max_tokens: int = 120,
    ):
        if not url:
            raise TeacherError("the OpenAI-compatible teacher needs a URL such as http://localhost:8000/v1")
        if not model:
            raise TeacherError("the OpenAI-compatible teacher needs a model name")
        self.url = url.rstrip("/")
        self.endpoint = f"{self.url}/chat/completions"
        self.model = model
        self.name = f"openai:{model}"
        self.api_key = api_key
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.attempts = 0  # HTTP attempts made, retries included
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None

    # The client and the semaphore belong to one event loop; a new loop (another
    # asyncio.run) gets fresh ones.
    def _ensure_client(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._client is not None:
            return
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._loop = loop
        self._semaphore = asyncio.Semaphore(self.max_concurrency)
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency),
        )

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None
        self._loop = None

    async def __aenter__(self) -> "OpenAITeacher":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def payload(self, request: AnnotationRequest) -> dict | None:
        prompt = user_prompt(request)
        if prompt is None:
            return None
        return {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    async def annotate(self, request: AnnotationRequest) -> str | None:
        payload = self.payload(request)
        if payload is None:
            return None
        self._ensure_client()
        assert self._semaphore is not None
        # The slot is held through backoff waits too, so a rate-limited server sees fewer requests.
        async with self._semaphore:
            return await self._post(payload)

    async def _post(self, payload: dict) -> str | None:
        assert self._client is not None
        last_error = ""
        last_status: int | None = None
        last_body = ""
        for attempt in range(self.retries + 1):
            delay: float | None = None
            self.attempts += 1
            try:
                response = await self._client.post(self.endpoint, json=payload)
            except httpx.UnsupportedProtocol as e:
                raise TeacherError(f"{self.endpoint}: {e}") from e
            except httpx.TransportError as e:  # connect/read/write errors, timeouts, dropped connections
                last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                last_status, last_body = None, ""
            else:
                status = response.status_code
                if status == 200:
                    return self._parse(response)
                body = response.text[:300]
                if status == 429 or status >= 500:
                    last_error, last_status, last_body = f"HTTP {status}: {body}", status, body
                    delay = retry_after_seconds(response.headers.get("retry-after"))
                else:
                    raise TeacherError(f"{self.endpoint} answered HTTP {status}: {body}", status, body)
            if attempt == self.retries:
                break
            if delay is None:
                delay = self.backoff * (2**attempt)
            await asyncio.sleep(min(delay, MAX_DELAY))
        raise TeacherError(
            f"{self.endpoint}: giving up after {self.retries + 1} attempts; last error: {last_error}",
            last_status,
            last_body,
        )

    def _parse(self, response: httpx.Response) -> str | None:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            body = response.text[:300]
            raise TeacherError(f"{self.endpoint}: unexpected response ({type(e).__name__}): {body}", 200, body) from e
        if content is None:
            return None
        text = str(content).strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1].strip()
        return text or None
