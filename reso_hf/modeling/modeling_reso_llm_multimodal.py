"""ResoLLM with images and audio (issue 16), LLaVA / Qwen2-Audio style: a vision tower and a Whisper-style log-mel
audio encoder (transformers' own building blocks), two-layer projectors into the decoder width, and the ResoLLM
decoder reading projected features at placeholder tokens. Each modality's placeholder positions carry prime phasor
codes from their own band of primes (SPEC §3.1), projected by the decoder's `W_p`.

Pooled embeddings of images, audio and text (the decoder's final hidden state at the last token, projected to
`contrastive_dim` and L2-normalised) live in one space for CLIP-style InfoNCE alignment, zero-shot classification
and retrieval; the decoder's language-model head captions.

Self-contained: only relative imports among `reso_hf/modeling/` plus torch/transformers, because `save_pretrained`
copies this file into the checkpoint for `trust_remote_code=True` loading.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import can_return_tuple

from .configuration_reso_llm_multimodal import ResoLLMMultimodalConfig
from .modeling_reso_llm import ResoLLMModel
from .primes import first_primes
from .resonance import prime_phasor

MAX_LOGIT_SCALE = 4.6052  # ln 100


@dataclass
class ResoLLMMultimodalOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): language-model loss on `labels`.
    logits (`torch.FloatTensor` of shape `(batch, seq_len, vocab_size)`).
    past_key_values (`Cache`, *optional*).
    hidden_states / attentions: as for `ResoLLMForCausalLM`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def modality_prime_code_table(config: ResoLLMMultimodalConfig, modality: str) -> torch.Tensor:
    """[cos, sin] phasor codes (positions, prime_code_dim) of the primes of `modality`'s band (float32)."""
    band = config.modality_prime_bands()[modality]
    primes = first_primes(band.stop)[band.start:]
    phasor = prime_phasor(torch.tensor(primes, dtype=torch.float64), config.text_config.prime_code_dim // 2)
    return torch.cat([phasor.real, phasor.imag], dim=-1).to(torch.float32)


class ResoLLMMultimodalProjector(nn.Module):
    """Tower width -> decoder width: Linear, activation, Linear (LLaVA's projector)."""

    def __init__(self, in_features: int, hidden_size: int, activation: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act = ACT2FN[activation]
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def info_nce_loss(first: torch.Tensor, second: torch.Tensor, logit_scale, positives: torch.Tensor | None = None):
    """Symmetric InfoNCE (CLIP) between L2-normalised embeddings `first` (N, D) and `second` (M, D).

    Logits `s * first @ second.T` with `s = exp(logit_scale)`. Without `positives` the pairs are (i, i) (N == M):
    the mean of the row and column cross-entropies. `positives` (N, M) bool marks every matching pair (captions
    shared by several items of one class): each row's (and column's) target is then uniform over its positives."""
    logits = first @ second.T * torch.as_tensor(logit_scale).exp()
    if positives is None:
        if first.shape[0] != second.shape[0]:
            raise ValueError(f"info_nce_loss without positives needs as many rows in first ({first.shape[0]}) as in "
                             f"second ({second.shape[0]})")
        targets = torch.arange(first.shape[0], device=first.device)
        return (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2
    positives = positives.to(logits.dtype)
    if bool((positives.sum(1) == 0).any()) or bool((positives.sum(0) == 0).any()):
        raise ValueError("info_nce_loss: every row and column of positives needs at least one positive pair")
    rows = -(positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    columns = -(positives / positives.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (rows + columns) / 2


class ResoLLMMultimodalPreTrainedModel(PreTrainedModel):
    config: ResoLLMMultimodalConfig
    config_class = ResoLLMMultimodalConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ResoLLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True
    input_modalities = ("image", "audio", "text")

    # Callables `hook(model, save_directory)` run after `save_pretrained` on the main process (reso_hf adds the one
    # that gives the weights the umask's file mode); empty where reso_hf is not installed.
    _post_save_hooks: list = []

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        result = super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if is_main_process:
            for hook in ResoLLMMultimodalPreTrainedModel._post_save_hooks:
                hook(self, save_directory)
        return result

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ResoLLMForConditionalGeneration):
            # transformers' init functions skip tensors that a checkpoint already filled
            init.constant_(module.logit_scale, self.config.logit_scale_init)
            for modality in ("image", "audio"):
                buffer = getattr(module, f"{modality}_prime_codes", None)
                if buffer is not None:  # not saved: recomputed whenever weights are initialised
                    init.copy_(buffer, modality_prime_code_table(self.config, modality))


class ResoLLMForConditionalGeneration(ResoLLMMultimodalPreTrainedModel, GenerationMixin):
    """ResoLLM decoder + vision tower + audio encoder + projectors; `generate` with images and audio in the prompt.

    `input_ids` hold `config.image_seq_length` image placeholder tokens per image (`pixel_values`, (N, C, H, W)) and
    `config.audio_seq_length` audio placeholder tokens per clip (`input_features`, (N, mel bins, frames)), in order;
    `ResoLLMProcessor` writes them. The placeholders' embeddings are replaced by the projected features plus their
    band's prime codes; everything else is `ResoLLMForCausalLM`'s decoder.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ResoLLMMultimodalConfig):
        super().__init__(config)
        text = config.text_config
        self.model = ResoLLMModel(text)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.audio_tower = WhisperEncoder(config.audio_config)
        self.vision_projector = ResoLLMMultimodalProjector(config.vision_config.hidden_size, text.hidden_size,
                                                           config.projector_hidden_act)
        self.audio_projector = ResoLLMMultimodalProjector(config.audio_config.d_model, text.hidden_size,
                                                          config.projector_hidden_act)
        if config.modality_prime_codes:
            for modality in ("image", "audio"):
                self.register_buffer(f"{modality}_prime_codes", modality_prime_code_table(config, modality),
                                     persistent=False)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.embedding_proj = nn.Linear(text.hidden_size, config.contrastive_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    # ---- modality features ---------------------------------------------------------------------------------

    def _band_codes(self, modality: str, positions: int) -> torch.Tensor | None:
        if not self.config.modality_prime_codes:
            return None
        codes = getattr(self, f"{modality}_prime_codes")[:positions]
        projection = self.model.prime_code.proj
        return projection(codes.to(projection.weight.dtype))

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """(images, image_seq_length, hidden_size): projected patch features plus the image band's prime codes."""
        expected = (self.config.vision_config.num_channels, self.config.vision_config.image_size,
                    self.config.vision_config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (images, *{expected}) "
                             "(vision_config num_channels, image_size, image_size): use ResoLLMProcessor")
        features = self.vision_tower(pixel_values=pixel_values.to(self.dtype)).last_hidden_state
        features = self.vision_projector(features)
        codes = self._band_codes("image", features.shape[1])
        return features if codes is None else features + codes

    def get_audio_features(self, input_features: torch.FloatTensor) -> torch.Tensor:
        """(clips, audio_seq_length, hidden_size): pooled, projected encoder states plus the audio band's codes."""
        expected = (self.config.audio_config.num_mel_bins, self.config.audio_num_frames)
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != expected:
            raise ValueError(f"input_features has shape {tuple(input_features.shape)}; expected (clips, *{expected}) "
                             "(audio_config num_mel_bins, 2 * max_source_positions): use ResoLLMProcessor")
        states = self.audio_tower(input_features.to(self.dtype)).last_hidden_state
        if self.config.audio_pool > 1:
            states = nn.functional.avg_pool1d(states.transpose(1, 2), self.config.audio_pool).transpose(1, 2)
        features = self.audio_projector(states)
        codes = self._band_codes("audio", features.shape[1])
        return features if codes is None else features + codes

    def _merge(self, input_ids, inputs_embeds, token_id, features, name, input_name):
        mask = input_ids == token_id
        count = int(mask.sum())
        if features is None:
            if count:
                raise ValueError(f"input_ids hold {count} {name} placeholder tokens (id {token_id}) but no "
                                 f"{input_name} was given")
            return inputs_embeds
        if count != features.shape[0] * features.shape[1]:
            raise ValueError(f"input_ids hold {count} {name} placeholder tokens (id {token_id}) but {input_name} "
                             f"gives {features.shape[0]} x {features.shape[1]} = {features.shape[0] * features.shape[1]}"
                             f" feature positions: each {name} needs exactly {features.shape[1]} placeholders")
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features.to(inputs_embeds.dtype))

    def embed_inputs(self, input_ids, pixel_values=None, input_features=None) -> torch.Tensor:
        """Token embeddings (with their prime codes) with the image / audio placeholders replaced by features."""
        embeddings = self.model.embed_tokens(input_ids)
        image_features = self.get_image_features(pixel_values) if pixel_values is not None else None
        audio_features = self.get_audio_features(input_features) if input_features is not None else None
        embeddings = self._merge(input_ids, embeddings, self.config.image_token_id, image_features, "image",
                                 "pixel_values")
        return self._merge(input_ids, embeddings, self.config.audio_token_id, audio_features, "audio",
                           "input_features")

    # ---- contrastive embeddings ----------------------------------------------------------------------------

    def _pooled(self, inputs_embeds, attention_mask) -> torch.Tensor:
        hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state
        # The last real token (any padding side): in a causal decoder it is the one position that has read all the
        # others, as CLIP's text tower reads its end token. Mean pooling drowns the one word that names the class.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.to(torch.long) * (positions + 1)).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return nn.functional.normalize(self.embedding_proj(pooled), dim=-1)

    def get_image_embeds(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """L2-normalised (images, contrastive_dim): the decoder reads the image placeholders alone; the last one's state."""
        features = self.get_image_features(pixel_values)
        return self._pooled(features, torch.ones(features.shape[:2], dtype=torch.long, device=features.device))

    def get_audio_embeds(self, input_features: torch.FloatTensor) -> torch.Tensor:
        """L2-normalised (clips, contrastive_dim), as `get_image_embeds`."""
        features = self.get_audio_features(input_features)
        return self._pooled(features, torch.ones(features.shape[:2], dtype=torch.long, device=features.device))

    def get_text_embeds(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised (texts, contrastive_dim): the decoder's final hidden state at the last real token."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._pooled(self.model.embed_tokens(input_ids), attention_mask)

    def contrastive_loss(self, modality_embeds, text_embeds, positives=None) -> torch.Tensor:
        """InfoNCE between pooled modality and text embeddings with the learned temperature (`info_nce_loss`),
        its log clamped at ln 100 as in CLIP so that the logits cannot blow up."""
        return info_nce_loss(modality_embeds, text_embeds, self.logit_scale.clamp(max=MAX_LOGIT_SCALE), positives)

    # ---- decoder -------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ResoLLMMultimodalOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(images, channels, height, width)`, *optional*):
            One entry per image, in the order of the image placeholders in `input_ids` (row by row).
        input_features (`torch.FloatTensor` of shape `(clips, num_mel_bins, frames)`, *optional*):
            Log-mel features (WhisperFeatureExtractor) of each audio clip, in placeholder order.
        """
        if kwargs.get("cache") is not None and past_key_values is None:  # transformers >= 5.24 names it `cache`
            past_key_values = kwargs.pop("cache")
        kwargs.pop("cache", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, input_features)
        elif pixel_values is not None or input_features is not None:
            raise ValueError("pixel_values / input_features need input_ids (their placeholders), not inputs_embeds")
        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return ResoLLMMultimodalOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    # ---- building from parts -------------------------------------------------------------------------------

    @classmethod
    def from_parts(cls, config: ResoLLMMultimodalConfig, text_model=None, vision_tower=None, audio_tower=None):
        """A model whose decoder and towers start from pretrained weights: `text_model` a ResoLLMForCausalLM (or its
        folder / Hub id), `vision_tower` a vision model or its folder / Hub id (loaded with `AutoModel`; a CLIP or
        SigLIP checkpoint gives its vision part), `audio_tower` a Whisper model / encoder or its folder / Hub id.
        The config's sub-configs are replaced by the loaded parts' configs; the projectors start random."""
        text_model = _load_part(text_model, "text_model")
        vision_tower = _load_part(vision_tower, "vision_tower")
        audio_tower = _load_part(audio_tower, "audio_tower")
        if vision_tower is not None and hasattr(vision_tower, "vision_model") and not hasattr(
                vision_tower.config, "image_size"):
            vision_tower = vision_tower.vision_model
        if audio_tower is not None and hasattr(audio_tower, "get_encoder"):
            audio_tower = audio_tower.get_encoder()
        fields = config.to_dict()
        if text_model is not None:
            fields["text_config"] = text_model.config.to_dict()
        if vision_tower is not None:
            fields["vision_config"] = vision_tower.config.to_dict()
        if audio_tower is not None:
            fields["audio_config"] = audio_tower.config.to_dict()
        for name in ("model_type", "transformers_version", "architectures", "auto_map"):
            fields.pop(name, None)
        model = cls(ResoLLMMultimodalConfig(**fields))
        if text_model is not None:
            model.model.load_state_dict(text_model.model.state_dict())
            model.lm_head.load_state_dict(text_model.lm_head.state_dict())
        if vision_tower is not None:
            model.vision_tower.load_state_dict(vision_tower.state_dict())
        if audio_tower is not None:
            model.audio_tower.load_state_dict(audio_tower.state_dict())
        return model


def _load_part(part, field_name: str):
    if part is None or isinstance(part, nn.Module):
        return part
    if not isinstance(part, str):
        raise ValueError(f"{field_name}={part!r} is invalid: expected a model, a folder or a Hub id")
    if field_name == "text_model":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(part)
    return AutoModel.from_pretrained(part)


__all__ = ["ResoLLMForConditionalGeneration", "ResoLLMMultimodalPreTrainedModel", "info_nce_loss",
           "modality_prime_code_table"]
