"""The synchronous engine: owns the scheduler and the model runner, one step at a time.

Not thread-safe: one thread calls ``add_request``/``step``/``abort``
(``AsyncLLMEngine`` runs that thread for asyncio servers).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, deque
from typing import Any

import torch

from loramux_engine.config import EngineConfig
from loramux_engine.engine.adapters import adapter_cache_stats, build_adapter_cache, check_adapter
from loramux_engine.engine.detokenizer import IncrementalDetokenizer, find_stop
from loramux_engine.engine.kv_cache import BlockManager, kv_cache_capacity
from loramux_engine.engine.model_runner import ModelRunner
from loramux_engine.engine.scheduler import Scheduler
from loramux_engine.engine.sequence import Sequence
from loramux_engine.engine.spec_decode import build_speculator
from loramux_engine.engine.step_isolation import run_isolated
from loramux_engine.engine.thread_team import ThreadTeam
from loramux_engine.errors import (
    EngineConfigError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    SequenceFailedError,
)
from loramux_engine.layers.sampler import SampledToken
from loramux_engine.lora.merge import read_adapter_for_model
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.models.config import load_model_args
from loramux_engine.outputs import EngineStats, RequestOutput
from loramux_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_RATE_WINDOW_S = 10.0
_IDLE_LOAD_WAIT_S = 0.05


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        return None  # token ids still work; text and stop strings need a tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.threads = ThreadTeam(config.num_threads)
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        self.model_args = args = load_model_args(config.model_dir)
        num_blocks, self.max_model_len = kv_cache_capacity(
            args,
            self.dtype.itemsize,
            config.kv_cache_bytes,
            config.kv_block_size,
            config.max_model_len,
        )
        num_cache_rows = num_blocks * config.kv_block_size
        if self.max_model_len > args.max_position_embeddings:
            raise EngineConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's context "
                f"{args.max_position_embeddings}"
            )
        if num_cache_rows < self.max_model_len:
            raise EngineConfigError(
                f"kv_cache_bytes holds {num_cache_rows} tokens, fewer than max_model_len "
                f"{self.max_model_len}"
            )
        self.tokenizer = _load_tokenizer(config.model_dir)
        self.eos_token_ids = frozenset(args.eos_token_ids)
        self.runner = ModelRunner(
            config.model_dir,
            args,
            self.max_model_len,
            num_blocks,
            config.kv_block_size,
            self.dtype,
            self.device,
            config.cpu_decode_kernel,
            config.cpu_onednn_matmul,
            cpu_gemv_kernel=config.cpu_gemv_kernel,
            max_num_seqs=config.max_num_seqs,
            cuda_graphs=config.cuda_graphs,
            quantization=config.quantization,
            quantization_group_size=config.quantization_group_size,
            quantize_lm_head=config.quantize_lm_head,
            merged_adapter=(
                read_adapter_for_model(
                    config.model_dir, config.merged_adapter, config.max_lora_rank
                )
                if config.merged_adapter is not None
                else None
            ),
        )
        self.adapters = build_adapter_cache(config, self.dtype, self.device)
        if self.adapters is not None:
            self.runner.attach_lora(self.adapters.pool)
        self.speculator = build_speculator(config, args.vocab_size, self.device)
        self.scheduler = Scheduler(
            config.max_num_seqs,
            config.max_num_batched_tokens,
            BlockManager(num_blocks, config.kv_block_size, config.enable_prefix_caching),
            self.adapters,
            speculator=self.speculator,
        )
        self._seqs: dict[str, Sequence] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._pending: list[RequestOutput] = []
        self._seed_source = random.Random()
        self._recent: deque[tuple[float, int, int]] = deque()
        self._stats = EngineStats(kv_cache_tokens_total=num_cache_rows)

    def validate_request(
        self, prompt_token_ids: list[int], params: SamplingParams, adapter: object | None = None
    ) -> None:
        """Raise the error ``add_request`` would; safe to call from any thread."""
        check_adapter(adapter, self.adapters)
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(prompt_token_ids), self.max_model_len)
        vocab = self.model_args.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise InvalidSamplingParamsError("stop strings need a tokenizer in the model directory")

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        fairness_key: str = "",
        priority: int = 0,
        adapter: object | None = None,
    ) -> None:
        if request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        self.validate_request(prompt_token_ids, params, adapter)
        max_len = self.max_model_len
        if params.max_tokens is not None:
            max_len = min(max_len, len(prompt_token_ids) + params.max_tokens)
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._seed_source.getrandbits(63)
            generator = torch.Generator(self.device).manual_seed(seed)
        seq = Sequence(
            request_id,
            prompt_token_ids,
            params,
            max_len,
            fairness_key,
            priority,
            adapter,
            generator,
        )
        self._seqs[request_id] = seq
        if self.tokenizer is not None:
            self._detokenizers[request_id] = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, params.skip_special_tokens
            )
        self.scheduler.add(seq)

    def abort(self, request_id: str, emit_output: bool = True) -> None:
        """Stop a request; the next ``step`` reports it with finish_reason "abort"."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.is_finished:
            return
        self.scheduler.finish(seq, "abort")
        if emit_output:
            self._pending.append(self._output(seq, []))
        self._forget(seq)

    def drop_adapter(self, ref: AdapterRef) -> None:
        """Forget a deleted adapter version in every cache tier (running requests finish)."""
        if self.adapters is not None:
            self.adapters.drop(ref)

    def close(self) -> None:
        """Stop the adapter loader threads; the engine is unusable afterwards."""
        if self.adapters is not None:
            self.adapters.close()

    def unfinished_request_ids(self) -> list[str]:
        return list(self._seqs)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if self.adapters is not None:
            self.adapters.poll()  # a failed load fails its requests at their admission
        seqs = self.scheduler.schedule()
        for seq in self.scheduler.failed:
            outputs.append(self._output(seq, []))
            self._forget(seq)
        self.scheduler.failed.clear()
        if not seqs:
            if self.adapters is not None and not outputs:
                self.adapters.wait_for_load(_IDLE_LOAD_WAIT_S)  # nothing to run until one lands
            return outputs
        num_tokens = sum(s.num_scheduled_tokens for s in seqs)
        num_prompt = sum(
            max(0, min(s.num_prompt_tokens - s.num_computed_tokens, s.num_scheduled_tokens))
            for s in seqs
        )
        num_rows = sum(s.num_sampled_rows for s in seqs)
        self.threads.before_step()
        sampled = run_isolated(self.runner.run, seqs)
        # A sequence that failed does not advance: its blocks may hold keys and values it
        # never finished writing, which must not reach the prefix cache. It is failed below.
        advanced = [
            (s, r) for s, r in zip(seqs, sampled, strict=True) if r is None or r.error is None
        ]
        self.scheduler.postprocess(
            [s for s, _ in advanced],
            [[t.token_id for t in r.tokens] if r is not None else [] for _, r in advanced],
        )
        num_generated = 0
        for seq, result in zip(seqs, sampled, strict=True):
            if result is None:
                continue
            if result.error is not None:
                outputs.append(self._fail(seq, result.error))
                continue
            try:
                output = self._advance(seq, result)
            except Exception as error:  # e.g. its detokenizer: that request's failure alone
                logger.warning("request %s failed after its step", seq.request_id, exc_info=True)
                output = self._fail(
                    seq, SequenceFailedError.caused_by(error, "process this request's token")
                )
            num_generated += len(output.new_token_ids)
            outputs.append(output)
        self._record(num_tokens, num_prompt, num_generated, num_rows)
        return outputs

    def _fail(self, seq: Sequence, error: SequenceFailedError) -> RequestOutput:
        """Finish one sequence with reason "error"; the scheduler frees what it held."""
        seq.error = error
        self.scheduler.finish(seq, "error")
        seq.finish_reason = "error"  # also when it had just finished otherwise, then failed
        output = self._output(seq, [])
        self._forget(seq)
        return output

    def _advance(self, seq: Sequence, result: SampledToken) -> RequestOutput:
        """Take the step's tokens one by one, as plain decoding would: the first that ends
        the sequence (a stop, its length) drops the ones after it (accepted drafts)."""
        params = seq.params
        tokens = result.tokens
        first = len(seq) - len(tokens)  # index of the step's first token in token_ids
        detokenizer = self._detokenizers.get(seq.request_id)
        reason = None
        for i, token in enumerate(tokens):
            token_id = token.token_id
            if token.logprob is not None:
                seq.logprobs.append(token.logprob)
                if token.top_logprobs is not None:
                    seq.top_logprobs.append(token.top_logprobs)
            if token_id in params.stop_token_ids or (
                not params.ignore_eos and token_id in self.eos_token_ids
            ):
                reason = "stop"
            elif first + i + 1 >= seq.max_len:
                reason = "length"
            if detokenizer is not None:
                delta = detokenizer.push([token_id])
                if reason is not None:
                    delta += detokenizer.flush()
                seq.output_text += delta
                if params.stop and delta:
                    at = find_stop(seq.output_text, len(delta), params.stop)
                    if at >= 0:
                        seq.output_text = seq.output_text[:at]
                        reason = "stop"
            if reason is not None:
                del seq.token_ids[first + i + 1 :]
                break
        if reason is not None:
            self.scheduler.finish(seq, reason)
        output = self._output(seq, seq.output_token_ids[seq.num_emitted_tokens :])
        if reason is not None:
            self._forget(seq)
        return output

    def _output(self, seq: Sequence, new_token_ids: list[int]) -> RequestOutput:
        holdback = 0
        if not seq.is_finished and seq.params.stop:
            holdback = max(len(s) for s in seq.params.stop) - 1
        end = max(seq.num_emitted_chars, len(seq.output_text) - holdback)
        text = seq.output_text[seq.num_emitted_chars : end]
        seq.num_emitted_chars = end
        first = seq.num_emitted_tokens
        seq.num_emitted_tokens += len(new_token_ids)
        wants = seq.params.wants_logprobs
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_token_ids,
            text=text,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            logprobs=seq.logprobs[first : seq.num_emitted_tokens] if wants else None,
            top_logprobs=(
                seq.top_logprobs[first : seq.num_emitted_tokens]
                if wants and seq.params.num_top_logprobs
                else None
            ),
            error=seq.error,
        )

    def _forget(self, seq: Sequence) -> None:
        self._seqs.pop(seq.request_id, None)
        self._detokenizers.pop(seq.request_id, None)
        self._stats.num_finished_total += 1

    def _record(self, num_tokens: int, num_prompt: int, num_generated: int, num_rows: int) -> None:
        now = time.monotonic()
        self._recent.append((now, num_prompt, num_generated))
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
            self._recent.popleft()
        s = self._stats
        s.num_steps_total += 1
        s.num_prompt_tokens_total += num_prompt
        s.num_generation_tokens_total += num_generated
        s.last_step_num_tokens = num_tokens
        s.last_step_num_sampled = num_rows
        span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else _RATE_WINDOW_S
        s.prompt_tokens_per_s = sum(r[1] for r in self._recent) / span
        s.generation_tokens_per_s = sum(r[2] for r in self._recent) / span

    def stats(self) -> EngineStats:
        s = self._stats
        kv_cache = self.scheduler.kv_cache
        speculator = self.speculator
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv_cache.usage,
            kv_cache_tokens_total=kv_cache.num_blocks * kv_cache.block_size,
            kv_block_size=kv_cache.block_size,
            kv_blocks_total=kv_cache.num_blocks,
            kv_cache_bytes=kv_cache.num_blocks
            * kv_cache.block_size
            * self.model_args.kv_bytes_per_token
            * self.dtype.itemsize,
            kv_blocks_used=kv_cache.num_used_blocks,
            kv_tokens_stored=kv_cache.tokens_stored(self.scheduler.running),
            prefix_cache_queries_tokens_total=kv_cache.prefix_queries_tokens,
            prefix_cache_hits_tokens_total=kv_cache.prefix_hits_tokens,
            num_preemptions_total=self.scheduler.num_preemptions,
            prompt_tokens_per_s=s.prompt_tokens_per_s,
            generation_tokens_per_s=s.generation_tokens_per_s,
            num_prompt_tokens_total=s.num_prompt_tokens_total,
            num_generation_tokens_total=s.num_generation_tokens_total,
            num_finished_total=s.num_finished_total,
            num_steps_total=s.num_steps_total,
            last_step_num_tokens=s.last_step_num_tokens,
            last_step_num_sampled=s.last_step_num_sampled,
            spec_decode_num_draft_tokens_total=speculator.num_draft_tokens_total,
            spec_decode_num_accepted_tokens_total=speculator.num_accepted_tokens_total,
            spec_decode_num_drafting_steps_total=speculator.num_drafting_steps_total,
            num_running_by_key=dict(Counter(seq.fairness_key for seq in self.scheduler.running)),
            num_waiting_by_key=dict(Counter(seq.fairness_key for seq in self.scheduler.waiting)),
            resident_adapters=self.adapters.residents() if self.adapters else [],
            extra={**adapter_cache_stats(self.adapters), **self.threads.stats()},
        )

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        adapters: list[AdapterRef | None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; one aggregated output per prompt, in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapter_list = adapters or [None] * len(prompts)
        ids = [f"generate-{id(self)}-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for request_id, prompt, p, adapter in zip(
            ids, prompts, params_list, adapter_list, strict=True
        ):
            self.add_request(request_id, prompt, p, adapter=adapter)
        done: dict[str, RequestOutput] = {}
        while any(i not in done or not done[i].finished for i in ids):
            for out in self.step():
                if out.request_id in done:
                    merged = done[out.request_id]
                    merged.new_token_ids += out.new_token_ids
                    merged.text += out.text
                    merged.finish_reason = out.finish_reason
                    merged.error = out.error
                    merged.num_output_tokens = out.num_output_tokens
                    if merged.logprobs is not None and out.logprobs is not None:
                        merged.logprobs += out.logprobs
                    if merged.top_logprobs is not None and out.top_logprobs is not None:
                        merged.top_logprobs += out.top_logprobs
                else:
                    done[out.request_id] = out
        return [done[i] for i in ids]
