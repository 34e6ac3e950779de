"""`loramux bench engine`'s memory cases: chat answers on a small KV budget, a shared prefix.

chat: 64 instruction prompts (data/chat_prompts.json) in the model's chat template, all
submitted at once, greedy, ``max_tokens`` 1024, stopping at EOS, on a 64 MiB KV budget.
Answers stop long before ``max_tokens``, so a cache that holds only the tokens computed
keeps more of them running. ``kv_utilization_chat`` is the most tokens whose K and V were
stored in the cache (distinct blocks) after a step that left requests waiting, over the
cache's capacity in tokens.

shared prefix: 64 requests of one tenant, each one 1,024-token system prompt (the policy
text of data/shared_prefix.json, trimmed to the token) and a distinct question, run with
prefix caching on and then off, 16 greedy tokens each, on a 1 GiB KV budget. In both modes
request 0 is submitted alone (the prefix's first use) and the other 63 once it has produced
its first token; each request's TTFT runs from its own submission, and the p50 is over all
64. ``prefix_cache_ttft_speedup`` is TTFT p50 off over on.

``--quick``: 8 chat prompts, ``max_tokens`` 64, a budget of 256 tokens (sized in tokens so
that requests wait on any model); 8 shared-prefix requests on a 128-token prefix, 4 tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from loramux.bench.common import SystemResult
from loramux.commands.output import CommandFailed

TENANT = "bench-tenant"


@dataclass(frozen=True, slots=True)
class ChatCase:
    num_prompts: int
    max_tokens: int
    kv_cache_bytes: int | None = None  # the budget in bytes, or else
    kv_cache_tokens: int | None = None  # in tokens of the model under test (fills on any model)

    def __post_init__(self) -> None:
        if (self.kv_cache_bytes is None) == (self.kv_cache_tokens is None):
            raise ValueError("give the chat case's KV budget in bytes or in tokens")


@dataclass(frozen=True, slots=True)
class SharedPrefixCase:
    num_requests: int
    prefix_tokens: int
    max_tokens: int
    kv_cache_bytes: int = 1 << 30


CHAT = ChatCase(num_prompts=64, max_tokens=1024, kv_cache_bytes=64 << 20)
CHAT_QUICK = ChatCase(num_prompts=8, max_tokens=64, kv_cache_tokens=256)
SHARED_PREFIX = SharedPrefixCase(num_requests=64, prefix_tokens=1024, max_tokens=16)
SHARED_PREFIX_QUICK = SharedPrefixCase(num_requests=8, prefix_tokens=128, max_tokens=4)


def load_data(name: str) -> Any:
    return json.loads(resources.files("loramux.bench").joinpath("data", name).read_text())


class Prompts:
    """Token ids of chat conversations, rendered with the model's own chat template."""

    MARK = "@@SYSTEM@@"

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        if not self.tokenizer.chat_template:
            raise CommandFailed(f"the model in {model_dir} has no chat template")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    def chat(self, instructions: list[str]) -> list[list[int]]:
        return [
            self.encode(self.render([{"role": "user", "content": text}], True))
            for text in instructions
        ]

    def shared_prefix(
        self, system: str, questions: list[str], prefix_tokens: int
    ) -> list[list[int]]:
        """The system turn as exactly ``prefix_tokens`` ids (its text repeated or trimmed
        to fit), then each question's user turn and the assistant's opening."""
        system_turn = self.render([{"role": "system", "content": self.MARK}], False)
        head, _, tail = (self.encode(part) for part in system_turn.partition(self.MARK))
        body_len = prefix_tokens - len(head) - len(tail)
        if body_len < 1:
            raise CommandFailed(f"a {prefix_tokens}-token system turn leaves no room for text")
        body = self.encode(system)
        while len(body) < body_len:
            body += self.encode("\n\n" + system)
        prefix = head + body[:body_len] + tail
        prompts = []
        for question in questions:
            conversation = self.render(
                [{"role": "system", "content": self.MARK}, {"role": "user", "content": question}],
                True,
            )
            if not conversation.startswith(system_turn):
                raise CommandFailed("the chat template does not render the system turn first")
            prompts.append(prefix + self.encode(conversation[len(system_turn) :]))
        return prompts


def _engine(model_dir: Path, **config: Any) -> Any:
    from loramux_engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(str(model_dir), dtype="float32", **config))
    engine.generate([[engine.model_args.vocab_size // 2] * 8], SamplingParams(max_tokens=2))
    return engine


def kv_budget_bytes(case: ChatCase, model_dir: Path) -> int:
    from loramux_engine.models.config import load_model_args

    if case.kv_cache_bytes is not None:
        return case.kv_cache_bytes
    per_token = load_model_args(str(model_dir)).kv_bytes_per_token * 4  # fp32
    return (case.kv_cache_tokens or 0) * per_token


def run_chat(model_dir: Path, case: ChatCase) -> SystemResult:
    from loramux_engine import SamplingParams

    prompts = Prompts(model_dir).chat(load_data("chat_prompts.json")[: case.num_prompts])
    kv_bytes = kv_budget_bytes(case, model_dir)
    engine = _engine(model_dir, max_num_seqs=len(prompts), kv_cache_bytes=kv_bytes)
    params = SamplingParams(temperature=0.0, max_tokens=case.max_tokens)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    before = engine.stats()
    ttft: dict[str, float] = {}
    running: list[int] = []
    stored_while_waiting = 0
    num_tokens = num_stopped = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter() - start
        stats = engine.stats()
        if stats.num_steps_total - before.num_steps_total > len(running):  # the model ran
            running.append(stats.num_running + sum(out.finished for out in outputs))
        if stats.num_waiting:
            stored_while_waiting = max(stored_while_waiting, stats.kv_tokens_stored)
        for out in outputs:
            if out.error is not None:
                raise out.error
            num_tokens += len(out.new_token_ids)
            if out.new_token_ids:
                ttft.setdefault(out.request_id, now)
            num_stopped += out.finish_reason == "stop"
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    engine.close()
    return SystemResult.from_run(
        num_tokens,
        elapsed,
        list(ttft.values()),
        elapsed_s=elapsed,
        num_steps=len(running),
        num_output_tokens=num_tokens,
        num_stopped_at_eos=num_stopped,
        num_preemptions=stats.num_preemptions_total - before.num_preemptions_total,
        running_mean=sum(running) / max(len(running), 1),
        running_max=max(running, default=0),
        kv_cache_bytes=kv_bytes,
        kv_cache_tokens_total=stats.kv_cache_tokens_total,
        kv_block_size=stats.kv_block_size,
        kv_tokens_stored_max_while_waiting=stored_while_waiting,
    )


def kv_utilization(chat: SystemResult) -> float | None:
    """None when no request ever waited: the cache was never what held them back."""
    stored = chat.extra["kv_tokens_stored_max_while_waiting"]
    return stored / chat.extra["kv_cache_tokens_total"] if stored else None


def run_shared_prefix(model_dir: Path, case: SharedPrefixCase, caching: bool) -> SystemResult:
    from loramux_engine import SamplingParams

    data = load_data("shared_prefix.json")
    prompts = Prompts(model_dir).shared_prefix(
        data["system"], data["questions"][: case.num_requests], case.prefix_tokens
    )
    engine = _engine(
        model_dir,
        max_num_seqs=len(prompts),
        kv_cache_bytes=case.kv_cache_bytes,
        enable_prefix_caching=caching,
    )
    params = SamplingParams(temperature=0.0, max_tokens=case.max_tokens, ignore_eos=True)
    submitted: dict[str, float] = {}
    ttft: dict[str, float] = {}
    num_tokens = 0

    def submit(i: int) -> None:
        engine.add_request(str(i), prompts[i], params, fairness_key=TENANT)
        submitted[str(i)] = time.perf_counter()

    before = engine.stats()
    start = time.perf_counter()
    submit(0)  # the prefix's first use
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.error is not None:
                raise out.error
            num_tokens += len(out.new_token_ids)
            if out.new_token_ids:
                ttft.setdefault(out.request_id, now - submitted[out.request_id])
        if len(submitted) == 1 and "0" in ttft:
            for i in range(1, len(prompts)):
                submit(i)
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    engine.close()
    queries = stats.prefix_cache_queries_tokens_total - before.prefix_cache_queries_tokens_total
    hits = stats.prefix_cache_hits_tokens_total - before.prefix_cache_hits_tokens_total
    return SystemResult.from_run(
        num_tokens,
        elapsed,
        [ttft[str(i)] for i in range(len(prompts))],
        elapsed_s=elapsed,
        prefix_cache=caching,
        prefix_cache_queries_tokens=queries,
        prefix_cache_hits_tokens=hits,
        prefix_cache_hit_rate=hits / queries if queries else 0.0,
        num_prompt_tokens=sum(len(p) for p in prompts),
        num_preemptions=stats.num_preemptions_total - before.num_preemptions_total,
    )


def run_memory_cases(
    model_dir: Path, quick: bool
) -> tuple[dict[str, SystemResult], dict[str, float | None], dict[str, dict[str, Any]]]:
    """The systems, the ratios and each case's workload."""
    chat_case = CHAT_QUICK if quick else CHAT
    prefix_case = SHARED_PREFIX_QUICK if quick else SHARED_PREFIX
    systems = {
        "chat": run_chat(model_dir, chat_case),
        "shared_prefix_cache_on": run_shared_prefix(model_dir, prefix_case, caching=True),
        "shared_prefix_cache_off": run_shared_prefix(model_dir, prefix_case, caching=False),
    }
    on, off = systems["shared_prefix_cache_on"], systems["shared_prefix_cache_off"]
    ratios: dict[str, float | None] = {
        "kv_utilization_chat": kv_utilization(systems["chat"]),
        "prefix_cache_ttft_speedup": off.ttft_p50_s / on.ttft_p50_s,
    }
    cases = {
        "chat": {
            **asdict(chat_case),
            "kv_cache_bytes": systems["chat"].extra["kv_cache_bytes"],
            "greedy": True,
            "stop_at_eos": True,
        },
        "shared_prefix": {
            **asdict(prefix_case),
            "greedy": True,
            "stop_at_eos": False,
            "fairness_key": TENANT,
            "submission": "request 0 alone, the rest once it has produced its first token",
        },
    }
    return systems, ratios, cases


def describe(systems: dict[str, SystemResult], cases: dict[str, dict[str, Any]]) -> str:
    chat, on = systems["chat"].extra, systems["shared_prefix_cache_on"].extra
    off = systems["shared_prefix_cache_off"].extra
    c, p = cases["chat"], cases["shared_prefix"]
    return "\n".join(
        [
            f"chat: {c['num_prompts']} prompts, max_tokens {c['max_tokens']}, KV "
            f"{chat['kv_cache_bytes'] / (1 << 20):.1f} MiB = {chat['kv_cache_tokens_total']} "
            f"tokens in blocks of {chat['kv_block_size']}: {chat['num_output_tokens']} tokens "
            f"out ({chat['num_stopped_at_eos']} stopped at EOS), {chat['num_preemptions']} "
            f"preemptions, running mean {chat['running_mean']:.1f} max {chat['running_max']}, "
            f"at most {chat['kv_tokens_stored_max_while_waiting']} tokens stored while "
            "requests waited",
            f"shared prefix: {p['num_requests']} requests, a {p['prefix_tokens']}-token "
            f"system prompt: prefix cache hit rate {on['prefix_cache_hit_rate']:.2f} on, "
            f"{off['prefix_cache_hit_rate']:.2f} off",
        ]
    )
