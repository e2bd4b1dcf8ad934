"""Configuration of the multimodal ResoLLM (images and audio into the decoder, issue 16).

Self-contained: copied into every checkpoint, so only transformers/stdlib and relative imports.
"""

from transformers import AutoConfig, PretrainedConfig

from .configuration_reso_llm import ResoLLMConfig, _check, _check_bool, _check_positive_int, _check_range

IMAGE_TOKEN = "<|image|>"
AUDIO_TOKEN = "<|audio|>"
PROJECTOR_ACTIVATIONS = ("gelu", "silu", "relu")


def _sub_config(value, field_name: str, default_type: str, defaults: dict):
    """A transformers config from an instance, a dict with `model_type`, or None (the tiny default)."""
    if value is None:
        return AutoConfig.for_model(default_type, **defaults)
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        model_type = value.get("model_type", default_type)
        fields = {key: item for key, item in value.items() if key != "model_type"}
        return AutoConfig.for_model(model_type, **fields)
    raise ValueError(f"{field_name}={value!r} is invalid: expected a PretrainedConfig, a dict with model_type, or None")


# Tiny towers for 8x8 images and 1 s of 16 kHz audio (40 log-mel frames): random initialisation, trained in minutes on a CPU.
DEFAULT_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      image_size=8, patch_size=2, num_channels=3, vision_use_head=False)
DEFAULT_AUDIO = dict(num_mel_bins=64, d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                     max_source_positions=20, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                     vocab_size=8, max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     decoder_start_token_id=1)


class ResoLLMMultimodalConfig(PretrainedConfig):
    r"""Configuration of `ResoLLMForConditionalGeneration`: a ResoLLM decoder (`text_config`), a vision tower
    (`vision_config`, any transformers vision encoder config; default a tiny SigLIP vision transformer) and a
    Whisper-style log-mel audio encoder (`audio_config`, a `WhisperConfig` whose encoder is used).

    - `image_token_id` / `audio_token_id`: the placeholder token ids; each image takes `image_seq_length` of them and
      each audio clip `audio_seq_length` (derived from the towers: patches, and encoder positions / `audio_pool`).
    - `audio_pool` (int): average-pool the audio encoder's positions by this factor before projecting.
    - `modality_prime_codes` (bool): placeholder position j of a modality adds `W_p [cos, sin](c(p))` for the prime
      p of index `vocab_size + band offset + j` (SPEC §3.1's phasor code with the text model's own `W_p`): every
      modality owns a band of primes after the text vocabulary's, so products of text and modality primes still
      bind by the phasor identity. Needs `text_config.prime_embedding`.
    - `contrastive_dim` (int): size of the shared space of the pooled image / audio / text embeddings (InfoNCE).
    - `logit_scale_init` (float): initial log inverse temperature of the contrastive logits (CLIP: ln(1/0.07)).
    - `projector_hidden_act` (str): activation of the two-layer projectors (tower width -> decoder width).
    """

    model_type = "reso_llm_multimodal"
    sub_configs = {"text_config": ResoLLMConfig, "vision_config": AutoConfig, "audio_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        audio_config=None,
        image_token_id: int | None = None,
        audio_token_id: int | None = None,
        audio_pool: int = 2,
        modality_prime_codes: bool = True,
        contrastive_dim: int = 64,
        logit_scale_init: float = 2.6592,
        projector_hidden_act: str = "gelu",
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = ResoLLMConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        self.text_config = text_config if text_config is not None else ResoLLMConfig(
            vocab_size=261, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        _check(isinstance(self.text_config, ResoLLMConfig), "text_config", type(self.text_config).__name__,
               "a ResoLLMConfig or a dict of its fields")
        self.vision_config = _sub_config(vision_config, "vision_config", "siglip_vision_model", DEFAULT_VISION)
        self.audio_config = _sub_config(audio_config, "audio_config", "whisper", DEFAULT_AUDIO)
        vocab_size = self.text_config.vocab_size
        self.image_token_id = vocab_size - 2 if image_token_id is None else image_token_id
        self.audio_token_id = vocab_size - 1 if audio_token_id is None else audio_token_id
        self.audio_pool = audio_pool
        self.modality_prime_codes = modality_prime_codes
        self.contrastive_dim = contrastive_dim
        self.logit_scale_init = logit_scale_init
        self.projector_hidden_act = projector_hidden_act
        self._validate_fields()
        # The special token ids are the decoder's (a saved config repeats them; the text config's win).
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            kwargs[name] = getattr(self.text_config, name)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _validate_fields(self):
        vocab_size = self.text_config.vocab_size
        for name in ("image_token_id", "audio_token_id"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size, name, value,
                   f"a token id in [0, {vocab_size - 1}] (text_config.vocab_size={vocab_size})")
        _check(self.image_token_id != self.audio_token_id, "audio_token_id", self.audio_token_id,
               f"an id other than image_token_id={self.image_token_id}")
        _check_positive_int("", "audio_pool", self.audio_pool)
        _check_positive_int("", "contrastive_dim", self.contrastive_dim)
        _check_bool("", "modality_prime_codes", self.modality_prime_codes)
        _check(not self.modality_prime_codes or self.text_config.prime_embedding, "modality_prime_codes",
               self.modality_prime_codes, "False when text_config.prime_embedding=False (they share its W_p)")
        _check_range("", "logit_scale_init", self.logit_scale_init, 0.0, 4.6052)
        _check(self.projector_hidden_act in PROJECTOR_ACTIVATIONS, "projector_hidden_act", self.projector_hidden_act,
               f"one of {PROJECTOR_ACTIVATIONS}")
        vision = self.vision_config
        for name in ("image_size", "patch_size", "hidden_size"):
            _check(hasattr(vision, name), f"vision_config.{name}", None,
                   "a vision tower config with image_size, patch_size and hidden_size (e.g. siglip_vision_model)")
        _check(vision.image_size % vision.patch_size == 0, "vision_config.patch_size", vision.patch_size,
               f"a divisor of vision_config.image_size={vision.image_size}")
        _check(self.audio_config.model_type == "whisper", "audio_config.model_type", self.audio_config.model_type,
               "'whisper' (its encoder reads log-mel features)")
        _check(self.audio_config.max_source_positions % self.audio_pool == 0, "audio_pool", self.audio_pool,
               f"a divisor of audio_config.max_source_positions={self.audio_config.max_source_positions}")

    @property
    def image_seq_length(self) -> int:
        """Placeholder tokens per image: one per patch of the vision tower."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def audio_seq_length(self) -> int:
        """Placeholder tokens per audio clip: the audio encoder's positions, pooled by `audio_pool`."""
        return self.audio_config.max_source_positions // self.audio_pool

    @property
    def audio_num_frames(self) -> int:
        """Log-mel frames the audio encoder reads (its two convolutions halve them)."""
        return 2 * self.audio_config.max_source_positions

    def modality_prime_bands(self) -> dict:
        """Prime indices of each modality: text tokens, then image positions, then audio positions (disjoint)."""
        vocab_size = self.text_config.vocab_size
        image_end = vocab_size + self.image_seq_length
        return {"text": range(0, vocab_size), "image": range(vocab_size, image_end),
                "audio": range(image_end, image_end + self.audio_seq_length)}

    def get_text_config(self, *args, **kwargs):
        return self.text_config

    def to_dict(self) -> dict:
        output = super().to_dict()
        for name in ("text_config", "vision_config", "audio_config"):
            value = getattr(self, name)
            output[name] = value.to_dict() if isinstance(value, PretrainedConfig) else value
        return output
