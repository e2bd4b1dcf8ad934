"""`ResoLLMProcessor`: text + images + audio -> inputs of `ResoLLMForConditionalGeneration` (issue 16).

Each `<|image|>` in the text becomes `image_seq_length` image placeholder tokens and each `<|audio|>`
`audio_seq_length` audio placeholder tokens; images go through the image processor (`pixel_values`), audio clips
through the Whisper log-mel feature extractor (`input_features`).

Self-contained: copied into checkpoints (`trust_remote_code=True`), so only numpy/transformers and relative imports.
"""

import numpy as np
from transformers import SiglipImageProcessorPil, WhisperFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .configuration_reso_llm_multimodal import AUDIO_TOKEN, IMAGE_TOKEN
from .tokenization_reso_llm import create_default_tokenizer

# The guanaco chat format of the text model (tokenization_reso_llm.GUANACO_CHAT_TEMPLATE) with two more content
# part types: {"type": "image"} writes <|image|> and {"type": "audio"} writes <|audio|>, where the processor expands
# them. Anything else still raises.
MULTIMODAL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set parts = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{%- set parts.text = parts.text ~ part['text'] -%}"
    "{%- elif part['type'] == 'image' -%}"
    "{%- set parts.text = parts.text ~ '" + IMAGE_TOKEN + "' -%}"
    "{%- elif part['type'] == 'audio' -%}"
    "{%- set parts.text = parts.text ~ '" + AUDIO_TOKEN + "' -%}"
    "{%- else -%}"
    "{{ raise_exception('Unsupported content part type ' ~ part['type'] ~ '; allowed: text, image, audio') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = parts.text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}"
    "{{ raise_exception('A system message is only allowed as the first message') }}"
    "{%- endif -%}"
    "{{ content ~ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "### Human: {{ content }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "### Assistant:{% generation %} {{ content }}{{ eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ raise_exception('Unknown role ' ~ message['role'] ~ '; allowed roles: system, user, assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}### Assistant:{%- endif -%}"
)


class ResoLLMProcessor(ProcessorMixin):
    """Turns text with `<|image|>` / `<|audio|>` markers, images and audio clips into model inputs.

    Args:
        image_processor: an image processor (default: SigLIP's PIL one at 8x8, mean and std 0.5).
        feature_extractor: a `WhisperFeatureExtractor` (default: 64 log-mel bins of 1 s at 16 kHz, 50 ms windows every 25 ms: 40 frames).
        tokenizer: a ResoTokenizer holding the two placeholder tokens.
        image_seq_length / audio_seq_length: placeholder tokens per image / clip (the model config's values).
    """

    def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chat_template=None,
                 image_seq_length: int = 16, audio_seq_length: int = 10, **kwargs):
        self.image_seq_length = image_seq_length
        self.audio_seq_length = audio_seq_length
        self.image_token, self.audio_token = IMAGE_TOKEN, AUDIO_TOKEN
        for token in (IMAGE_TOKEN, AUDIO_TOKEN):
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id) or len(
                    tokenizer.encode(token, add_special_tokens=False)) != 1:
                raise ValueError(f"tokenizer has no single token {token!r}: add it with "
                                 f"tokenizer.add_special_tokens({{'additional_special_tokens': [...]}})")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        if chat_template is None:
            chat_template = MULTIMODAL_CHAT_TEMPLATE
        super().__init__(image_processor, feature_extractor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_config(cls, config, tokenizer=None) -> "ResoLLMProcessor":
        """The default processor of a `ResoLLMMultimodalConfig`: sizes read from its towers; the bytes tokenizer
        plus the two placeholder tokens when `tokenizer` is None."""
        if tokenizer is None:
            tokenizer = create_multimodal_tokenizer()
        image_size = config.vision_config.image_size
        image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size},
                                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
        audio = config.audio_config
        feature_extractor = WhisperFeatureExtractor(feature_size=audio.num_mel_bins, sampling_rate=16000,
                                                    hop_length=400, chunk_length=1, n_fft=800)
        frames = feature_extractor.n_samples // feature_extractor.hop_length
        if frames != config.audio_num_frames:
            raise ValueError(f"audio_config.max_source_positions={audio.max_source_positions} needs "
                             f"{config.audio_num_frames} log-mel frames; the default feature extractor gives {frames} "
                             "(1 s at 16 kHz, hop 400): pass a matching config or build the processor yourself")
        return cls(image_processor, feature_extractor, tokenizer, image_seq_length=config.image_seq_length,
                   audio_seq_length=config.audio_seq_length)

    def _images(self, images) -> list:
        if not isinstance(images, (list, tuple)):
            images = [images]
        prepared = []
        for index, image in enumerate(images):
            if isinstance(image, np.ndarray):
                if image.ndim == 2:  # grayscale: the tower reads num_channels (3 by default) channels
                    image = np.repeat(image[..., None], 3, axis=-1)
                if image.ndim != 3:
                    raise ValueError(f"images[{index}] has shape {image.shape}; expected (height, width) or "
                                     "(height, width, channels) with values 0-255, or a PIL image")
            prepared.append(image)
        return prepared

    def _audio(self, audio, sampling_rate) -> list:
        expected = self.feature_extractor.sampling_rate
        if sampling_rate is not None and sampling_rate != expected:
            raise ValueError(f"sampling_rate={sampling_rate} is invalid: this processor's feature extractor reads "
                             f"{expected} Hz audio (resample first)")
        if isinstance(audio, np.ndarray) and audio.ndim == 1:
            audio = [audio]
        clips = []
        limit = self.feature_extractor.n_samples
        for index, clip in enumerate(audio):
            clip = np.asarray(clip, dtype=np.float32)
            if clip.ndim != 1:
                raise ValueError(f"audio[{index}] has shape {clip.shape}; expected one mono waveform (samples,)")
            if clip.shape[0] > limit:
                raise ValueError(f"audio[{index}] has {clip.shape[0]} samples; this processor reads at most {limit} "
                                 f"({limit / expected:g} s at {expected} Hz)")
            clips.append(clip)
        return clips

    def __call__(self, text=None, images=None, audio=None, sampling_rate=None, return_tensors="pt", padding=True,
                 **kwargs) -> BatchFeature:
        """`input_ids`/`attention_mask` (placeholders expanded), `pixel_values` and `input_features`.

        Images and clips are taken in order of their markers through the batch (row by row); their counts must
        match the markers'. Other keyword arguments go to the tokenizer (e.g. `padding_side="left"` for
        batched generation)."""
        if text is None:
            raise ValueError("text is required: write an <|image|> / <|audio|> marker where each input goes")
        texts = [text] if isinstance(text, str) else list(text)
        data = {}
        images = self._images(images) if images is not None else []
        clips = self._audio(audio, sampling_rate) if audio is not None else []
        for marker, items, name in ((IMAGE_TOKEN, images, "images"), (AUDIO_TOKEN, clips, "audio clips")):
            markers = sum(sample.count(marker) for sample in texts)
            if markers != len(items):
                raise ValueError(f"text holds {markers} {marker} marker(s) but {len(items)} {name} were given; "
                                 "give one per marker")
        expanded = [sample.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_seq_length)
                    .replace(AUDIO_TOKEN, AUDIO_TOKEN * self.audio_seq_length) for sample in texts]
        encoded = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **kwargs)
        data.update(encoded)
        if images:
            data["pixel_values"] = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        if clips:
            features = self.feature_extractor(clips, sampling_rate=self.feature_extractor.sampling_rate,
                                              return_tensors=return_tensors, padding="max_length")
            data["input_features"] = features["input_features"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "input_features"]


def create_multimodal_tokenizer():
    """The bytes-only ResoTokenizer (259 ids) plus `<|image|>` (259) and `<|audio|>` (260): 261 ids."""
    tokenizer = create_default_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, AUDIO_TOKEN]})
    return tokenizer


__all__ = ["ResoLLMProcessor", "MULTIMODAL_CHAT_TEMPLATE", "create_multimodal_tokenizer"]
