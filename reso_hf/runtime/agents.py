"""`ResoAgentGroup`: several ResoLLM agents on one prompt (SPEC §3.11).

Strategies:

- ``parallel``: every agent generates independently from the prompt.
- ``sequential``: agent 0 answers the prompt; agent i continues from the prompt followed by agent
  i−1's answer. Each result holds that agent's own new text.
- ``consensus``: ONE decoding loop. Each agent keeps its own KV cache and computes its next-token
  log-distribution; the group's distribution is the normalised geometric mean
  ``p(x) ∝ Π_a p_a(x)^(1/n)`` (log-space mean, then log-softmax). Greedy takes its argmax; sampling
  draws from it at `temperature` (optionally top-k) with a generator seeded by `seed`. With identical
  agents it equals single-agent greedy decoding. Every agent gets a result with the shared text and
  its own telemetry (entropy/Lyapunov of ITS distribution, its coherence, its goals).

Entangled state (agents sharing one SMF memory and goal registry when `entanglement.enabled`) is the
model's state API and is not wired here yet: agents keep their own state.
"""

import time

import torch

from ..modeling.generation_reso_llm import StabilityMonitor, _CoherenceRecorder
from .inference import (
    GenerationResult,
    agent_name,
    check_causal_lm,
    check_max_length,
    fit_new_tokens,
    generate_result,
)

STRATEGIES = ("parallel", "sequential", "consensus")


class ResoAgentGroup:
    """A group of `ResoLLMForCausalLM` agents sharing one tokenizer (hence one vocabulary).

    Agents whose config has `entanglement.enabled` share one state (goals, memory, concept bindings):
    what one agent stores, the others recall.

    Args:
        models: two or more `ResoLLMForCausalLM` (one is allowed: the group then acts alone).
        tokenizer: the shared tokenizer.
        names: optional agent names (default: `entanglement.node_id` when entangled, else `agent_<i>`).
    """

    def __init__(self, models, tokenizer, names: list[str] | None = None):
        models = list(models)
        if not models:
            raise ValueError("models is empty: ResoAgentGroup needs at least one ResoLLMForCausalLM")
        for index, model in enumerate(models):
            check_causal_lm(model, role=f"models[{index}]")
        vocab_sizes = [model.config.vocab_size for model in models]
        if len(set(vocab_sizes)) != 1:
            listing = ", ".join(f"agent {i}: vocab_size={size}" for i, size in enumerate(vocab_sizes))
            raise ValueError(f"agents have different vocabularies ({listing}); all agents of a group must share "
                             "one vocabulary (the same tokenizer and vocab_size)")
        if len(tokenizer) > vocab_sizes[0]:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the agents' vocab_size is "
                             f"{vocab_sizes[0]}")
        if names is not None and len(names) != len(models):
            raise ValueError(f"names has {len(names)} entries for {len(models)} models")
        self.models = models
        self.tokenizer = tokenizer
        self.names = list(names) if names is not None else [agent_name(m, i) for i, m in enumerate(models)]
        self._entangle([m for m in models if m.config.entanglement.enabled])

    @staticmethod
    def _entangle(models) -> None:
        """Agents with `entanglement.enabled` share one goal registry, memory and binding set (SPEC §3.11)."""
        if len(models) < 2:
            return
        sizes = {m.config.hidden_size for m in models}
        if len(sizes) != 1:
            raise ValueError(f"entangled agents must have one hidden_size to share goal and memory vectors, "
                             f"got {sorted(sizes)}")
        shared = models[0].reso_state
        for model in models[1:]:
            model.reso_state = shared

    def generate(self, prompt: str, strategy: str = "consensus", max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> list[GenerationResult]:
        """Run the group on `prompt`; one `GenerationResult` per agent, in agent order."""
        if strategy not in STRATEGIES:
            raise ValueError(f"coordination_strategy={strategy!r} is invalid: expected one of {STRATEGIES}")
        check_max_length(max_new_tokens, "max_new_tokens")
        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if strategy == "parallel":
            return [generate_result(model, self.tokenizer, prompt, max_new_tokens, agent=name, **sampling)
                    for model, name in zip(self.models, self.names)]
        if strategy == "sequential":
            results, context = [], prompt
            for model, name in zip(self.models, self.names):
                result = generate_result(model, self.tokenizer, context, max_new_tokens, agent=name, **sampling)
                results.append(result)
                context = context + result.text
            return results
        if top_p is not None:
            raise ValueError("top_p is not supported by the consensus strategy; use top_k or greedy decoding")
        return self._consensus(prompt, max_new_tokens, do_sample, temperature, top_k, seed)

    @torch.no_grad()
    def _consensus(self, prompt, max_new_tokens, do_sample, temperature, top_k, seed) -> list[GenerationResult]:
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected a number > 0 when sampling")
        start = time.perf_counter()
        device = self.models[0].device
        input_ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        prompt_length = input_ids.shape[1]
        max_new_tokens, extra_warnings = fit_new_tokens(self.models[0], prompt_length, max_new_tokens)
        eos_ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        for model in self.models:
            eos = model.generation_config.eos_token_id
            eos_ids.update([eos] if isinstance(eos, int) else (eos or []))
        generator = None
        if do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))

        monitors = [StabilityMonitor.from_config(model.config, active=False) for model in self.models]
        recorders = [_CoherenceRecorder(model) for model in self.models]
        caches = [None] * len(self.models)
        generated: list[int] = []
        step_input = input_ids
        try:
            for _ in range(max_new_tokens):
                log_probs = []
                for index, model in enumerate(self.models):
                    model.eval()
                    output = model(input_ids=step_input, past_key_values=caches[index], use_cache=True,
                                   logits_to_keep=1)
                    caches[index] = output.past_key_values
                    logits = output.logits[:, -1, :].float()
                    monitors[index](input_ids, logits)
                    log_probs.append(torch.log_softmax(logits, dim=-1))
                combined = torch.log_softmax(torch.stack(log_probs).mean(dim=0), dim=-1)
                if do_sample:
                    scores = combined / temperature
                    if top_k is not None and top_k > 0:
                        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
                        scores = scores.masked_fill(scores < kth, float("-inf"))
                    token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
                else:
                    token = combined.argmax(dim=-1, keepdim=True)
                generated.append(int(token))
                input_ids = torch.cat([input_ids, token], dim=-1)
                step_input = token
                if int(token) in eos_ids:
                    break
        finally:
            for recorder in recorders:
                recorder.remove()
        elapsed_ms = (time.perf_counter() - start) * 1000.0

        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        results = []
        for index, model in enumerate(self.models):
            summary = monitors[index].row_telemetry(0, len(generated))
            goals, attention = model.goal_telemetry(input_ids, prompt_length)
            coherence = [float(step[0]) for step in recorders[index].steps[:len(generated)]]
            results.append(GenerationResult(
                text=text, prompt=prompt, token_ids=list(generated), tokens_generated=len(generated),
                stability=summary["stability"], lyapunov=summary["lyapunov"],
                entropy_trace=summary["entropy_trace"], lyapunov_trace=summary["lyapunov_trace"],
                temperature_trace=summary["temperature_trace"], coherence_trace=coherence,
                goals_achieved=goals[0], attention_summary=attention[0],
                warnings=list(extra_warnings) + summary["warnings"], generation_time_ms=elapsed_ms,
                agent=self.names[index],
            ))
        return results
