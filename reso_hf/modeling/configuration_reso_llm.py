"""ResoLLM configuration (SPEC §2).

Self-contained: copied into every checkpoint, so only transformers/stdlib imports.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import LlamaConfig, PretrainedConfig

from .crystalline import INITIALIZERS, PLATONIC_SOLIDS

RESO_HF_VERSION = "0.1.0"
GOLDEN_RATIO = (1 + math.sqrt(5)) / 2
ROPE_SPECTRA = ("geometric", "golden")
MEMORY_STORES = ("list", "indexed")
MEMORY_STORE_COMPRESSIONS = ("fp32", "fp16", "int8")
STANDARD_ACTIVATIONS = ("silu", "gelu", "relu", "gelu_pytorch_tanh")
HIDDEN_ACTIVATIONS = STANDARD_ACTIVATIONS + PLATONIC_SOLIDS


def _check(condition: bool, field_name: str, value, allowed: str):
    if not condition:
        raise ValueError(f"{field_name}={value!r} is invalid: expected {allowed}")


def _check_bool(owner: str, name: str, value):
    _check(isinstance(value, bool), f"{owner}{name}", value, "a bool (True or False)")


def _check_positive_int(owner: str, name: str, value, minimum: int = 1):
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{owner}{name}", value, f"an int >= {minimum}",
    )


def _check_range(owner: str, name: str, value, low: float, high: float, low_open=False, high_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    brackets = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")
    _check(ok, f"{owner}{name}", value, f"a number in {brackets}")


class _SubConfig:
    """Shared behaviour of the component sub-configs: validation and dict round trip."""

    _name = ""

    def __post_init__(self):
        self.validate()

    def validate(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.metadata.get("kind")
            owner = f"{self._name}."
            if kind == "bool":
                _check_bool(owner, f.name, value)
            elif kind == "int":
                _check_positive_int(owner, f.name, value, f.metadata.get("min", 1))
            elif kind == "range":
                low, high = f.metadata["range"]
                _check_range(owner, f.name, value, low, high, f.metadata.get("low_open", False))
            elif kind == "choice":
                _check(value in f.metadata["choices"], f"{owner}{f.name}", value, f"one of {f.metadata['choices']}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, value, field_name: str):
        """Accept an instance, a dict of its fields, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"{field_name} has unknown fields {unknown}; allowed: {sorted(known)}")
            return cls(**value)
        raise ValueError(f"{field_name} must be a {cls.__name__} or a dict, got {type(value).__name__}")


def _flag(default: bool, help: str):
    return field(default=default, metadata={"kind": "bool", "help": help})


def _count(default: int, help: str, minimum: int = 1):
    return field(default=default, metadata={"kind": "int", "min": minimum, "help": help})


def _choice(default: str, choices: tuple, help: str):
    return field(default=default, metadata={"kind": "choice", "choices": choices, "help": help})


def _number(default: float, low: float, high: float, help: str, low_open: bool = False):
    return field(default=default, metadata={"kind": "range", "range": (low, high), "low_open": low_open, "help": help})


@dataclass
class AgencyConfig(_SubConfig):
    """Goals as attention prefix slots and attention foci (SPEC §3.6)."""

    _name = "agency"
    enabled: bool = _flag(False, "Enable goal prefix slots and attention foci.")
    max_foci: int = _count(5, "Maximum number of attention foci reported per step.")
    max_goals: int = _count(10, "Maximum number of simultaneously active goals.")
    novelty_weight: float = _number(0.4, 0.0, 1.0, "Weight of novelty in the focus score.")
    intensity_weight: float = _number(0.3, 0.0, 1.0, "Weight of attention mass in the focus score.")
    relevance_weight: float = _number(0.3, 0.0, 1.0, "Weight of goal relevance in the focus score.")
    goal_coherence_threshold: float = _number(0.7, 0.0, 1.0, "Goal progress at which a goal counts as achieved.")
    goal_dropout: float = _number(0.5, 0.0, 1.0, "Probability that SFT feeds the answer's goal vector.")


@dataclass
class PRSCConfig(_SubConfig):
    """Prime Resonance Semantic Coherence concept bank (SPEC §3.5)."""

    _name = "prsc"
    enabled: bool = _flag(False, "Enable the concept bank after the embedding.")
    coherence_threshold: float = _number(0.7, 0.0, 1.0, "Minimum coherence for a composed binding to be reported.")
    max_bindings: int = _count(1000, "Number of concept slots M (0 disables).", minimum=0)


@dataclass
class TemporalSMFConfig(_SubConfig):
    """Temporal sedenion memory field (SPEC §3.7)."""

    _name = "temporal_smf"
    enabled: bool = _flag(False, "Enable the episodic memory store and memory prefix slots.")
    memory_decay_rate: float = _number(0.01, 0.0, 10.0, "Decay rate lambda of memory strength per model step.")
    max_moments: int = _count(1000, "Capacity of the store; the weakest entry is evicted.")
    episodic_tagging: bool = _flag(True, "Tag entries with an episode id.")
    importance_threshold: float = _number(0.01, 0.0, 1.0, "Entries whose strength falls below this are pruned.")
    recall_k: int = _count(3, "Number of recalled entries that enter attention as prefix slots.")
    store: str = _choice("list", MEMORY_STORES, "Where entries live: 'list' (in the model object, searched by brute "
                         "force) or 'indexed' (SQLite + ANN index; needs `import reso_hf` and the `memory` extra).")
    store_compression: str = _choice("fp16", MEMORY_STORE_COMPRESSIONS, "Stored key precision of the indexed store.")
    semantic_decay_rate: float = _number(0.0, 0.0, 10.0, "Decay rate of semantic (consolidated) entries.")


@dataclass
class StabilityConfig(_SubConfig):
    """Predictive stability monitor (SPEC §3.9)."""

    _name = "stability"
    enabled: bool = _flag(False, "Enable the Lyapunov stability monitor during generation.")
    lyapunov_threshold: float = _number(0.1, 0.0, 100.0, "Threshold theta between stability classes.", low_open=True)
    auto_temperature_adjust: bool = _flag(True, "Adapt the sampling temperature to the stability class.")
    predictive_horizon: int = _count(5, "Steps ahead for predicting a class crossing.")
    window_size: int = _count(16, "Entropy window for the Lyapunov estimate.", minimum=5)
    min_temperature: float = _number(0.1, 0.0, 10.0, "Lower clamp of the adjusted temperature.", low_open=True)
    max_temperature: float = _number(1.5, 0.0, 10.0, "Upper clamp of the adjusted temperature.", low_open=True)


@dataclass
class EntanglementConfig(_SubConfig):
    """Multi-agent shared state (SPEC §3.11)."""

    _name = "entanglement"
    enabled: bool = _flag(False, "Share memory and goal registry between agents of a group.")
    node_id: str = field(default="node_0", metadata={"help": "Identifier of this agent in a group."})

    def validate(self):
        super().validate()
        _check(isinstance(self.node_id, str) and self.node_id != "", "entanglement.node_id", self.node_id,
               "a non-empty string")


@dataclass
class StochasticResonanceConfig(_SubConfig):
    """Noise injection against repetition loops (SPEC §3.8)."""

    _name = "stochastic_resonance"
    enabled: bool = _flag(False, "Add noise to the logits when the output repeats.")
    noise_amplitude: float = _number(0.1, 0.0, 10.0, "Noise std in units of the logits' std.")
    repetition_window: int = _count(32, "Number of recent tokens scored for repetition.", minimum=2)
    escape_threshold: float = _number(0.5, 0.0, 1.0, "Repetition score above which noise is added.")


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


@dataclass
class GroupAttentionConfig(_SubConfig):
    """Group-structured attention (README "Group-structured attention"): head h with prime p_h lets query i attend
    key j iff j <= i and ((i - j) % p_h == 0 or i - j < local_window)."""

    _name = "group_attention"
    enabled: bool = _flag(False, "Restrict each head to the coset of its prime's cyclic subgroup plus a local window.")
    primes: object = field(default="auto", metadata={"help": "'auto' (the first num_attention_heads primes: "
                                                              "2, 3, 5, ...) or one prime per attention head."})
    local_window: int = _count(32, "Keys closer than this many positions are always visible.")
    learned_selection: bool = _flag(False, "Mix, per head, the outputs under every distinct prime of `primes` with "
                                           "learned softmax weights (adaptive symmetry discovery).")

    def validate(self):
        super().validate()
        allowed = "'auto' or a non-empty list of primes (ints >= 2), one per attention head"
        if isinstance(self.primes, tuple):
            self.primes = list(self.primes)
        if self.primes != "auto":
            ok = isinstance(self.primes, list) and len(self.primes) > 0 and all(
                isinstance(p, int) and not isinstance(p, bool) and _is_prime(p) for p in self.primes)
            _check(ok, "group_attention.primes", self.primes, allowed)


EXIT_LOSS_WEIGHTS = ("layerskip", "uniform")


@dataclass
class AdaptiveDepthConfig(_SubConfig):
    """Entropy-based early exit per token and the per-layer losses that train for it (README "Adaptive depth").

    In evaluation mode, after decoder layer l (1-based) with min_layers <= l < num_hidden_layers, a token whose
    next-token distribution softmax(lm_head(norm(h_l))) has entropy below the threshold exits: its state is frozen,
    its logits are those, and the later layers compute only its keys and values, from the frozen state (CALM)."""

    _name = "adaptive_depth"
    enabled: bool = _flag(False, "Exit early by default (threshold `entropy_threshold`); `generate(..., "
                                 "exit_entropy_threshold=...)` and `forward` override the threshold either way.")
    min_layers: int = _count(2, "The first layer after which a token may exit (1-based); < num_hidden_layers.")
    entropy_threshold: float = _number(0.0, 0.0, 1e6, "Entropy (nats) below which a token exits; 0 = never.")
    loss_scale: float = _number(0.0, 0.0, 1e6, "LayerSkip e_scale of the per-layer early-exit losses in training; "
                                               "0 trains the last layer only (the plain LM loss).")
    loss_weights: str = _choice("layerskip", EXIT_LOSS_WEIGHTS, "Shape of the per-layer loss weights: 'layerskip' "
                                "(quadratic in depth, Elhoushi et al. 2024) or 'uniform'.")


# Tensor parallelism of the resonant parts, beside Llama's plan for the attention and MLP projections: the Kuramoto
# phase projection and per-head coupling are split by key/value head like `k_proj` (the module then runs on its local
# shards), and the goal/memory prefix projections like `k_proj`/`v_proj`. The prime code, coherence gates and concept
# bank act on full hidden states and stay replicated.
RESONANT_TP_PLAN = {
    "layers.*.self_attn.kuramoto.phase_proj": "colwise",
    "layers.*.self_attn.kuramoto.coupling": "colwise",
    "layers.*.self_attn.kuramoto": "local_params",
    "layers.*.self_attn.prefix_key_proj": "colwise",
    "layers.*.self_attn.prefix_value_proj": "colwise",
}

SUB_CONFIGS = {
    "agency": AgencyConfig,
    "prsc": PRSCConfig,
    "temporal_smf": TemporalSMFConfig,
    "stability": StabilityConfig,
    "entanglement": EntanglementConfig,
    "stochastic_resonance": StochasticResonanceConfig,
    "group_attention": GroupAttentionConfig,


    "adaptive_depth": AdaptiveDepthConfig,
}


class ResoLLMConfig(PretrainedConfig):
    r"""Configuration of a ResoLLM model.

    Standard decoder fields use the Hugging Face names; the seed's names are accepted as aliases
    (`dim`, `num_layers`, `num_heads`, `ffn_dim`, `max_seq_len`). The resonant components:

    - `prime_embedding` (bool): add the learned projection of each token's prime phasor code (SPEC §3.1).
    - `prime_code_dim` (int, even): length of the [cos, sin] phasor code (K = prime_code_dim / 2 frequencies).
    - `rope_spectrum` ("geometric" | "golden"): rotary wavelengths spaced by `rope_theta` or by powers of phi (§3.2).
    - `kuramoto` (bool): causal Kuramoto phase coupling on a reserved 2-d slice of each head (§3.3).
    - `kuramoto_keeps_position` (bool): the content phase is added to the reserved pair's positional angle instead
      of replacing it, so a zero phase projection leaves standard RoPE intact (models converted from Llama set it).
    - `hidden_act` (str): the MLP's gate activation, a standard one (silu, gelu, relu, gelu_pytorch_tanh) or a
      Platonic solid (tetrahedron, cube, octahedron, dodecahedron, icosahedron: `crystalline.py`, README
      "Crystalline components").
    - `initializer` ("normal" | "phi_harmonic"): weights ~ N(0, initializer_range^2), or the decoder projections with
      the phi-harmonic std schedule across depth and width (`crystalline.phi_harmonic_std`).
    - `coherence_gating` (bool): full-range sigmoid gate on each MLP output (§3.4).
    - `coherence_gate_normalized` (bool): divide each gate by its value at the initial score (bias 2, weight 0), so a
      gate there is exactly 1 and trainable (models converted from Llama set it and start there).
    - `source_model` (str): the pretrained model this one was converted from (`from_llama`), or None.
    - `agency`, `prsc`, `temporal_smf`, `stability`, `entanglement`, `stochastic_resonance`, `group_attention`:


    - `agency`, `prsc`, `temporal_smf`, `stability`, `entanglement`, `stochastic_resonance`, `adaptive_depth`:
      sub-configs (objects or dicts) for the v2 extensions.
    """

    model_type = "reso_llm"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {**LlamaConfig.base_model_tp_plan, **RESONANT_TP_PLAN}
    base_model_pp_plan = dict(LlamaConfig.base_model_pp_plan)
    attribute_map = {
        "dim": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "ffn_dim": "intermediate_size",
        "max_seq_len": "max_position_embeddings",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 704,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        initializer: str = "normal",
        hidden_act: str = "silu",
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        rope_theta: float = 10000.0,
        rope_parameters: dict | None = None,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        prime_embedding: bool = True,
        prime_code_dim: int = 64,
        rope_spectrum: str = "golden",
        kuramoto: bool = True,
        kuramoto_coupling_init: float = 0.5,
        kuramoto_keeps_position: bool = False,
        coherence_gating: bool = True,
        coherence_threshold: float = 1 / GOLDEN_RATIO,
        coherence_sharpness: float = 12.0,
        coherence_gate_normalized: bool = False,
        agency=None,
        prsc=None,
        temporal_smf=None,
        stability=None,
        entanglement=None,
        stochastic_resonance=None,
        group_attention=None,


        adaptive_depth=None,
        source_model: str | None = None,
        reso_hf_version: str = RESO_HF_VERSION,
        **kwargs,
    ):
        # The seed's names win over the defaults of the canonical names they alias.
        aliased = {canonical: kwargs.pop(alias) for alias, canonical in self.attribute_map.items() if alias in kwargs}
        hidden_size = aliased.get("hidden_size", hidden_size)
        num_hidden_layers = aliased.get("num_hidden_layers", num_hidden_layers)
        num_attention_heads = aliased.get("num_attention_heads", num_attention_heads)
        intermediate_size = aliased.get("intermediate_size", intermediate_size)
        max_position_embeddings = aliased.get("max_position_embeddings", max_position_embeddings)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.initializer = initializer
        self.hidden_act = hidden_act
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.rope_theta = rope_theta
        # transformers standardises this dict (rope_type, rope_theta, scaling fields; a legacy `rope_scaling`
        # kwarg is folded into it) in `PretrainedConfig.__init__`.
        self.rope_parameters = dict(rope_parameters) if rope_parameters is not None else None
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
        self.prime_embedding = prime_embedding
        self.prime_code_dim = prime_code_dim
        self.rope_spectrum = rope_spectrum
        self.kuramoto = kuramoto
        self.kuramoto_coupling_init = kuramoto_coupling_init
        self.kuramoto_keeps_position = kuramoto_keeps_position
        self.coherence_gating = coherence_gating
        self.coherence_gate_normalized = coherence_gate_normalized
        self.coherence_threshold = coherence_threshold
        self.coherence_sharpness = coherence_sharpness
        for name, cls in SUB_CONFIGS.items():
            setattr(self, name, cls.coerce(locals()[name], name))
        self.source_model = source_model
        self.reso_hf_version = reso_hf_version
        self._validate_fields()
        self.head_dim = self.resolved_head_dim  # as Llama does; transformers' RoPE functions read it
        try:
            super().__init__(
                pad_token_id=pad_token_id,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
                tie_word_embeddings=tie_word_embeddings,
                **kwargs,
            )
        except KeyError as error:  # transformers' RoPE validation names the missing keys
            if "rope_parameters" not in str(error):
                raise
            raise ValueError(f"rope_parameters={self.rope_parameters!r} is invalid: {error.args[0]}") from error
        self._validate_rope_parameters()

    def _validate_fields(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _check_positive_int("", name, getattr(self, name))
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
               self.num_key_value_heads, f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            _check(self.hidden_size % self.num_attention_heads == 0, "hidden_size", self.hidden_size,
                   f"a multiple of num_attention_heads={self.num_attention_heads} (or set head_dim)")
        else:
            _check_positive_int("", "head_dim", self.head_dim)
        _check(self.resolved_head_dim % 2 == 0, "head_dim", self.resolved_head_dim, "an even number")
        # Kuramoto takes a 2-d slice of each head; rotary needs at least one pair beside it.
        _check(not self.kuramoto or self.resolved_head_dim >= 4, "head_dim", self.resolved_head_dim,
               ">= 4 when kuramoto=True")
        _check(self.rope_spectrum in ROPE_SPECTRA, "rope_spectrum", self.rope_spectrum, f"one of {ROPE_SPECTRA}")
        for name in ("prime_embedding", "kuramoto", "kuramoto_keeps_position", "coherence_gating",
                     "coherence_gate_normalized", "tie_word_embeddings", "use_cache", "mlp_bias"):
            _check_bool("", name, getattr(self, name))
        _check_positive_int("", "prime_code_dim", self.prime_code_dim, minimum=2)
        _check(self.prime_code_dim % 2 == 0, "prime_code_dim", self.prime_code_dim, "an even int (cos and sin halves)")
        _check_range("", "rms_norm_eps", self.rms_norm_eps, 0.0, 1.0, low_open=True)
        _check_range("", "initializer_range", self.initializer_range, 0.0, 10.0, low_open=True)
        _check_range("", "attention_dropout", self.attention_dropout, 0.0, 1.0, high_open=True)
        _check_range("", "rope_theta", self.rope_theta, 1.0, 1e9, low_open=True)
        _check_range("", "kuramoto_coupling_init", self.kuramoto_coupling_init, -10.0, 10.0)
        _check_range("", "coherence_threshold", self.coherence_threshold, 0.0, 1.0, low_open=True, high_open=True)
        _check_range("", "coherence_sharpness", self.coherence_sharpness, 0.0, 1000.0, low_open=True)
        _check(self.hidden_act in HIDDEN_ACTIVATIONS, "hidden_act", self.hidden_act, f"one of {HIDDEN_ACTIVATIONS}")
        _check(self.initializer in INITIALIZERS, "initializer", self.initializer, f"one of {INITIALIZERS}")
        primes = self.group_attention.primes
        _check(primes == "auto" or len(primes) == self.num_attention_heads, "group_attention.primes", primes,
               f"'auto' or one prime per attention head ({self.num_attention_heads} of them)")


        depth = self.adaptive_depth
        _check(not (depth.enabled or depth.loss_scale > 0) or depth.min_layers < self.num_hidden_layers,
               "adaptive_depth.min_layers", depth.min_layers,
               f"an int in [1, {self.num_hidden_layers - 1}] (below num_hidden_layers={self.num_hidden_layers})")

    def _validate_rope_parameters(self):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        _check(isinstance(self.rope_parameters, dict), "rope_parameters", self.rope_parameters,
               "a dict such as {'rope_type': 'llama3', 'factor': 8.0, ...} or None")
        rope_type = self.rope_parameters["rope_type"]
        allowed = ("default", *ROPE_INIT_FUNCTIONS)
        _check(rope_type in allowed, "rope_parameters['rope_type']", rope_type, f"one of {allowed}")
        _check(rope_type == "default" or self.rope_spectrum == "geometric", "rope_parameters['rope_type']", rope_type,
               "'default' with rope_spectrum='golden' (RoPE scaling rescales the geometric spectrum)")
        # One value, two names: `rope_theta` stays readable and the rotary embedding reads `rope_parameters`.
        self.rope_theta = self.rope_parameters["rope_theta"]
        _check_range("", "rope_parameters['rope_theta']", self.rope_theta, 1.0, 1e9, low_open=True)
        try:  # transformers' own checks of the scaling fields (factor, original length, ...)
            self.validate_rope()
        except KeyError as error:
            raise ValueError(f"rope_parameters={self.rope_parameters!r} is invalid: {error.args[0]}") from error

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        output = super().to_dict()
        for name in SUB_CONFIGS:
            value = output.get(name)
            if isinstance(value, _SubConfig):
                output[name] = value.to_dict()
        return output


def _preset(defaults: dict, overrides: dict) -> ResoLLMConfig:
    return ResoLLMConfig(**{**defaults, **overrides})


def tiny_config(**overrides) -> ResoLLMConfig:
    """About 5M parameters with a 32k vocabulary: for tests and the demo."""
    return _preset(dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=1024), overrides)


def small_config(**overrides) -> ResoLLMConfig:
    """4 layers, 256 dim (the seed's development preset)."""
    return _preset(dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, max_position_embeddings=2048), overrides)


def medium_config(**overrides) -> ResoLLMConfig:
    """8 layers, 512 dim."""
    return _preset(dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, max_position_embeddings=4096), overrides)


def large_config(**overrides) -> ResoLLMConfig:
    """24 layers, 1024 dim."""
    return _preset(dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                        num_key_value_heads=8, max_position_embeddings=4096), overrides)


def multi_agent_config(node_id: str, **overrides) -> ResoLLMConfig:
    """The small preset with entanglement enabled for agent `node_id` (SPEC §3.11)."""
    entanglement = EntanglementConfig(enabled=True, node_id=node_id)
    return small_config(entanglement=entanglement, **overrides)
