"""`ResoLLMInference`: the seed's inference API (SPEC §3.10) on top of Hugging Face `generate`.

    engine = ResoLLMInference(model, tokenizer, config)
    result = engine.generate("Once upon a time", max_length=100)
    result.text, result.stability, result.lyapunov, result.entropy_trace, ...

`max_length` follows the seed: the number of NEW tokens (it becomes `max_new_tokens`); it is reduced
to what fits in `max_position_embeddings`, with a `truncated_max_length` warning in the result.

The engine (and `reso-hf generate` / `chat`) takes any causal LM that can generate, also with a PEFT
adapter (LoRA or DynamicLoRA) on it. The ResoLLM telemetry (stability, Lyapunov, traces, goals) is
filled in only when the model under the adapter is a `ResoLLMForCausalLM`; for any other model those
fields are None or empty and the result holds the text, the token ids, the count and the time.
"""

import time
from dataclasses import dataclass, field

import torch

from ..modeling.generation_reso_llm import _eos_list, _tokens_generated
from ..modeling.modeling_reso_llm import ResoLLMForCausalLM, ResoLLMModel

DEFAULT_GOAL_TYPE = "exploratory"


@dataclass
class GenerationResult:
    """One generated text with the seed's metrics (see `ResoGenerateOutput` for the definitions).

    `stability` and `lyapunov` are None, and the traces empty, for a model without ResoLLM telemetry."""

    text: str
    prompt: str = ""
    token_ids: list = field(default_factory=list)
    tokens_generated: int = 0
    stability: str | None = "critical"
    lyapunov: float | None = 0.0
    entropy_trace: list = field(default_factory=list)
    lyapunov_trace: list = field(default_factory=list)
    temperature_trace: list = field(default_factory=list)
    coherence_trace: list = field(default_factory=list)
    goals_achieved: list = field(default_factory=list)
    attention_summary: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    generation_time_ms: float = 0.0
    agent: str | None = None

    def metrics_line(self) -> str:
        """One-line summary used by the chat session."""
        if self.stability is None:  # no ResoLLM telemetry
            return (f"[metrics] tokens={self.tokens_generated} time={self.generation_time_ms:.1f}ms "
                    f"warnings={len(self.warnings)}")
        temperature = self.temperature_trace[-1] if self.temperature_trace else float("nan")
        coherence = sum(self.coherence_trace) / len(self.coherence_trace) if self.coherence_trace else float("nan")
        return (f"[metrics] stability={self.stability} lyapunov={self.lyapunov:.4f} tokens={self.tokens_generated} "
                f"time={self.generation_time_ms:.1f}ms temperature={temperature:.2f} coherence={coherence:.3f} "
                f"warnings={len(self.warnings)}")


def _check_not_backbone(model, role: str) -> None:
    if isinstance(model, ResoLLMModel):
        raise TypeError(
            f"{role} is a ResoLLMModel (the backbone, which returns hidden states and cannot generate); "
            "use ResoLLMForCausalLM(config) or AutoModelForCausalLM.from_pretrained(...) instead"
        )


def check_causal_lm(model, role: str = "model") -> ResoLLMForCausalLM:
    """Raise a clear error unless `model` is a generating ResoLLM (what the agent group needs)."""
    _check_not_backbone(model, role)
    if not isinstance(model, ResoLLMForCausalLM):
        raise TypeError(f"{role} must be a ResoLLMForCausalLM, got {type(model).__name__}")
    return model


def unwrap_adapter(model):
    """The transformers model under a PEFT adapter (the model itself when it has none)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def telemetry_model(model) -> ResoLLMForCausalLM | None:
    """The ResoLLM that provides telemetry, goals and stability for `model` (also under an adapter), or None."""
    inner = unwrap_adapter(model)
    return inner if isinstance(inner, ResoLLMForCausalLM) else None


def describe_model(model) -> str:
    """The model's class, and its adapter's PEFT type when it has one ("LlamaForCausalLM + LORA adapter")."""
    inner = unwrap_adapter(model)
    if inner is model:
        return type(model).__name__
    peft_type = model.peft_config[model.active_adapter].peft_type
    return f"{type(inner).__name__} + {getattr(peft_type, 'value', peft_type)} adapter"


def check_generating_model(model, role: str = "model"):
    """Raise a clear error unless `model` is a causal LM that can generate (with or without a PEFT adapter)."""
    _check_not_backbone(model, role)
    inner = unwrap_adapter(model)
    _check_not_backbone(inner, role)
    can_generate = getattr(inner, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        raise TypeError(f"{role} must be a causal LM that can generate (e.g. loaded with AutoModelForCausalLM), "
                        f"got {type(inner).__name__}")
    return model


def check_max_length(max_length, name: str = "max_length") -> int:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"{name}={max_length!r} is invalid: expected an int >= 1 (number of new tokens)")
    return max_length


def fit_new_tokens(model, prompt_length: int, max_new_tokens: int) -> tuple[int, list]:
    """Reduce max_new_tokens to what fits in the model's context; the warning says when it did."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:  # the config states no context length
        return max_new_tokens, []
    if prompt_length >= limit:
        raise ValueError(f"the prompt has {prompt_length} tokens; max_position_embeddings={limit} leaves no room "
                         "for new tokens: shorten the prompt")
    fitted = min(max_new_tokens, limit - prompt_length)
    warnings = []
    if fitted < max_new_tokens:
        warnings.append({"step": 0, "type": "truncated_max_length",
                         "message": f"max_length reduced from {max_new_tokens} to {fitted} new tokens to fit "
                                    f"max_position_embeddings={limit}"})
    return fitted, warnings


def result_from_output(output, row: int, tokenizer, prompt_length: int, prompt: str, extra_warnings=(),
                       agent: str | None = None) -> GenerationResult:
    """Build a `GenerationResult` from row `row` of a `ResoGenerateOutput`."""
    count = output.tokens_generated[row]
    new_ids = output.sequences[row, prompt_length:prompt_length + count].tolist()
    return GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        prompt=prompt,
        token_ids=new_ids,
        tokens_generated=count,
        stability=output.stability[row],
        lyapunov=output.lyapunov[row],
        entropy_trace=output.entropy_trace[row],
        lyapunov_trace=output.lyapunov_trace[row],
        temperature_trace=output.temperature_trace[row],
        coherence_trace=output.coherence_trace[row],
        goals_achieved=output.goals_achieved[row],
        attention_summary=output.attention_summary[row],
        warnings=list(extra_warnings) + output.warnings[row],
        generation_time_ms=output.generation_time_ms[row],
        agent=agent,
    )


def plain_result(sequences, tokenizer, prompt_length: int, prompt: str, eos_token_id, warnings: list,
                 generation_time_ms: float, agent: str | None = None) -> GenerationResult:
    """A `GenerationResult` without ResoLLM telemetry (row 0 of `sequences`, cut after the first EOS)."""
    new_tokens = sequences[:1, prompt_length:]
    count = _tokens_generated(new_tokens, _eos_list(eos_token_id))[0]
    new_ids = new_tokens[0, :count].tolist()
    return GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True), prompt=prompt, token_ids=new_ids,
        tokens_generated=count, stability=None, lyapunov=None, warnings=list(warnings),
        generation_time_ms=generation_time_ms, agent=agent,
    )


def agent_name(model, index: int) -> str:
    entanglement = model.config.entanglement
    return entanglement.node_id if entanglement.enabled else f"agent_{index}"


def generate_result(model, tokenizer, prompt: str, max_new_tokens: int, do_sample: bool = True,
                    temperature: float = 0.7, top_k: int | None = 50, top_p: float | None = None,
                    seed: int | None = None, agent: str | None = None, **generate_kwargs) -> GenerationResult:
    """Encode `prompt`, run `model.generate(..., return_dict_in_generate=True)`, decode the result."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    check_max_length(max_new_tokens)
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(model.device)
    if input_ids.shape[1] == 0:
        input_ids = torch.tensor([[tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                   else model.config.bos_token_id]], device=model.device)
    max_new_tokens, warnings = fit_new_tokens(model, input_ids.shape[1], max_new_tokens)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, return_dict_in_generate=True,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id)
    if tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        if seed is not None:
            torch.manual_seed(seed)
    reso = telemetry_model(model)
    if seed is not None and reso is not None:
        kwargs["seed"] = seed  # ResoLLM's generate also seeds its stochastic-resonance noise with it
    kwargs.update(generate_kwargs)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    if reso is None:
        return plain_result(output.sequences, tokenizer, input_ids.shape[1], prompt, kwargs.get("eos_token_id"),
                            warnings, 1000.0 * (time.perf_counter() - start), agent)
    return result_from_output(output, 0, tokenizer, input_ids.shape[1], prompt, warnings, agent)


class ResoLLMInference:
    """The seed's inference engine: `generate`, `generate_with_goal`, `generate_multi_agent`,
    `interactive_session`, each returning `GenerationResult`s with the seed's fields.

    Args:
        model: a causal LM that can generate: a `ResoLLMForCausalLM` (telemetry, goals), any other
            `AutoModelForCausalLM` model, or either with a PEFT adapter (a `ResoLLMModel` backbone is an error).
        tokenizer: its tokenizer (e.g. `create_default_tokenizer()`).
        config: optional; must be the model's config or agree with it on `vocab_size` (the seed passes it).
        temperature, do_sample, top_k, top_p: sampling defaults of `generate`.
    """

    def __init__(self, model, tokenizer, config=None, temperature: float = 0.7, do_sample: bool = True,
                 top_k: int | None = 50, top_p: float | None = None):
        self.model = check_generating_model(model)
        if config is not None and config is not model.config and config.vocab_size != model.config.vocab_size:
            raise ValueError(f"config.vocab_size={config.vocab_size} differs from the model's "
                             f"vocab_size={model.config.vocab_size}: pass the model's own config")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                             f"{model.config.vocab_size}: build the model with vocab_size >= {len(tokenizer)}")
        self.tokenizer = tokenizer
        self.config = model.config
        self.reso_model = telemetry_model(model)
        if self.reso_model is not None:
            self.reso_model.attach_tokenizer(tokenizer)  # goals, memories and concept names are encoded with it
        self.temperature = temperature
        self.do_sample = do_sample
        self.top_k = top_k
        self.top_p = top_p
        self.model.eval()

    def _sampling(self, overrides: dict) -> dict:
        options = dict(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        options.update(overrides)
        return options

    def generate(self, prompt: str, max_length: int = 100, **kwargs) -> GenerationResult:
        """Continue `prompt` by up to `max_length` new tokens. Extra keyword arguments: `do_sample`,
        `temperature`, `top_k`, `top_p`, `seed`, or any `generate` argument."""
        return generate_result(self.model, self.tokenizer, prompt, check_max_length(max_length),
                               **self._sampling(kwargs))

    def create_goal(self, goal_description: str, goal_type: str = DEFAULT_GOAL_TYPE):
        """`model.create_goal(description, goal_type=...)` (agency, SPEC §3.6), with clear errors."""
        if not isinstance(goal_description, str) or not goal_description.strip():
            raise ValueError(f"goal_description={goal_description!r} is invalid: expected a non-empty text")
        if self.reso_model is None:
            raise ValueError(f"goals need a ResoLLM with agency.enabled=True; {describe_model(self.model)} has none")
        return self.reso_model.create_goal(goal_description.strip(), goal_type=goal_type, tokenizer=self.tokenizer)

    def generate_with_goal(self, prompt: str, goal_description: str, max_length: int = 100,
                           goal_type: str = DEFAULT_GOAL_TYPE, **kwargs) -> GenerationResult:
        """Create the goal on the model (it stays active in the model's goal registry), then generate;
        `result.goals_achieved` lists the goals the generation achieved."""
        check_max_length(max_length)
        self.create_goal(goal_description, goal_type=goal_type)
        return self.generate(prompt, max_length=max_length, **kwargs)

    def generate_multi_agent(self, prompt: str, other_agents: list, coordination_strategy: str = "consensus",
                             max_length: int = 100, **kwargs) -> list[GenerationResult]:
        """Coordinate this engine's model with the models of `other_agents` (engines or models) through
        `ResoAgentGroup`; one result per agent (see `ResoAgentGroup.generate`)."""
        from .agents import ResoAgentGroup

        models = [self.model] + [agent.model if isinstance(agent, ResoLLMInference) else agent
                                 for agent in other_agents]
        group = ResoAgentGroup(models, self.tokenizer)
        return group.generate(prompt, strategy=coordination_strategy, max_new_tokens=max_length,
                              **self._sampling(kwargs))

    def interactive_session(self, show_metrics: bool = True, max_length: int = 128, input_stream=None,
                            output_stream=None) -> int:
        """Chat on stdin/stdout with the seed's commands: `exit`, `goal <description>`, `status`, `metrics`."""
        from .chat import ChatSession

        return ChatSession(self, show_metrics=show_metrics, max_new_tokens=max_length, input_stream=input_stream,
                           output_stream=output_stream).run()
