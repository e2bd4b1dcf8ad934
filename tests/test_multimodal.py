"""Multimodal ResoLLM (issue 16): processor, model, save/load (also without reso_hf), generation, cache, prime bands,
InfoNCE, the DTMF generator and the training command, at tiny sizes."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from isolation import run_without_reso_hf
from transformers import AutoModelForImageTextToText, AutoProcessor

import reso_hf
from reso_hf import ResoLLMForConditionalGeneration, ResoLLMMultimodalConfig, ResoLLMProcessor
from reso_hf.modeling.modeling_reso_llm_multimodal import info_nce_loss, modality_prime_code_table
from reso_hf.modeling.primes import first_primes
from reso_hf.modeling.processing_reso_llm import create_multimodal_tokenizer
from reso_hf.modeling.resonance import prime_code_table, prime_phasor
from reso_hf.multimodal import dtmf
from reso_hf.multimodal.data import MultimodalSplit, audio_caption, image_caption


def tiny_config(**overrides) -> ResoLLMMultimodalConfig:
    text = reso_hf.ResoLLMConfig(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 prime_code_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 **overrides.pop("text", {}))
    fields = dict(
        text_config=text,
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=3,
                           vision_use_head=False),
        audio_config=dict(model_type="whisper", num_mel_bins=64, d_model=16, encoder_layers=1,
                          encoder_attention_heads=2, encoder_ffn_dim=32, max_source_positions=20, decoder_layers=1,
                          decoder_attention_heads=2, decoder_ffn_dim=16, vocab_size=8, max_target_positions=8,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
        audio_pool=4, contrastive_dim=16)
    return ResoLLMMultimodalConfig(**{**fields, **overrides})


_CACHE = {}


def tiny_model(**overrides):
    """(eval model, processor); the prime projection gets weights (it starts at zero) so the codes show."""
    key = json.dumps(overrides, sort_keys=True)
    if key not in _CACHE:
        torch.manual_seed(0)
        model = ResoLLMForConditionalGeneration(tiny_config(**overrides)).eval()
        if model.model.prime_code is not None:
            with torch.no_grad():
                model.model.prime_code.proj.weight.normal_(0, 0.5)
        _CACHE[key] = (model, ResoLLMProcessor.from_config(model.config))
    return _CACHE[key]


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)


def clip(key="7"):
    return dtmf.dtmf_tone(key, duration=0.2, start=0.1, snr_db=20)


def chat(processor, part):
    return processor.apply_chat_template([{"role": "user", "content": [part, {"type": "text", "text": "Say"}]}],
                                         add_generation_prompt=True, tokenize=False)


def test_processor_expands_each_marker_into_its_placeholders_in_order():
    model, processor = tiny_model()
    config = model.config
    assert (config.image_seq_length, config.audio_seq_length) == (4, 5)
    assert (processor.image_token_id, processor.audio_token_id) == (config.image_token_id, config.audio_token_id)
    inputs = processor(text=["ab<|image|>c<|audio|>", "<|audio|>d<|image|><|image|>"],
                       images=[image(0), image(1), image(2)], audio=[clip("1"), clip("2")])
    ids = inputs["input_ids"]
    tokenizer = processor.tokenizer
    first = tokenizer("ab")["input_ids"] + [259] * 4 + tokenizer("c")["input_ids"] + [260] * 5
    assert ids[0, :len(first)].tolist() == first
    assert (ids == 259).sum(1).tolist() == [4, 8] and (ids == 260).sum(1).tolist() == [5, 5]
    assert inputs["attention_mask"].sum(1).tolist() == [len(first), 5 + 1 + 8]
    assert tuple(inputs["pixel_values"].shape) == (3, 3, 8, 8)
    assert tuple(inputs["input_features"].shape) == (2, 64, 40)
    # the chat template writes the markers for image / audio parts
    assert chat(processor, {"type": "image"}) == "### Human: <|image|>Say### Assistant:"
    assert chat(processor, {"type": "audio"}) == "### Human: <|audio|>Say### Assistant:"


def test_processor_and_config_errors_name_the_field():
    _, processor = tiny_model()
    with pytest.raises(ValueError, match=r"text holds 2 <\|image\|> marker\(s\) but 1 images were given"):
        processor(text="<|image|><|image|>", images=[image()])
    with pytest.raises(ValueError, match=r"text holds 0 <\|audio\|> marker\(s\) but 1 audio clips were given"):
        processor(text="hi", audio=[clip()])
    with pytest.raises(ValueError, match="sampling_rate=8000 is invalid: .* reads 16000 Hz audio"):
        processor(text="<|audio|>", audio=[clip()], sampling_rate=8000)
    with pytest.raises(ValueError, match=r"audio\[0\] has shape \(2, 10\); expected one mono waveform"):
        processor(text="<|audio|>", audio=[np.zeros((2, 10))])
    with pytest.raises(ValueError, match=r"audio\[0\] has 32000 samples; this processor reads at most 16000 \(1 s"):
        processor(text="<|audio|>", audio=[np.zeros(32000)])
    with pytest.raises(ValueError, match=r"images\[0\] has shape \(8,\)"):
        processor(text="<|image|>", images=[np.zeros(8, dtype=np.uint8)])
    with pytest.raises(ValueError, match="tokenizer has no single token '<\\|image\\|>'"):
        ResoLLMProcessor(processor.image_processor, processor.feature_extractor, reso_hf.create_default_tokenizer())
    with pytest.raises(ValueError, match=r"modality_prime_codes=True is invalid: expected False when "
                                         r"text_config.prime_embedding=False"):
        tiny_config(text={"prime_embedding": False})
    with pytest.raises(ValueError, match=r"image_token_id=261 is invalid: expected a token id in \[0, 260\]"):
        tiny_config(image_token_id=261)
    with pytest.raises(ValueError, match="audio_pool=3 is invalid: expected a divisor of "
                                         "audio_config.max_source_positions=20"):
        tiny_config(audio_pool=3)
    with pytest.raises(ValueError, match="audio_config.model_type='siglip_vision_model' is invalid"):
        tiny_config(audio_config={"model_type": "siglip_vision_model"})


def test_model_errors_on_mismatched_placeholders_and_shapes():
    model, processor = tiny_model()
    inputs = processor(text="<|image|>", images=[image()])
    with pytest.raises(ValueError, match=r"input_ids hold 4 image placeholder tokens \(id 259\) but no pixel_values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"but pixel_values gives 2 x 4 = 8 feature positions: each image needs "
                                         r"exactly 4 placeholders"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"pixel_values has shape \(1, 1, 8, 8\); expected \(images, \*\(3, 8, 8\)\)"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"input_features has shape \(1, 64, 30\); expected \(clips, \*\(64, 40\)\)"):
        model.get_audio_features(torch.zeros(1, 64, 30))


def test_shapes_and_normalised_embeddings():
    model, processor = tiny_model()
    inputs = processor(text=["<|image|>x<|audio|>"] * 2, images=[image(0), image(1)], audio=[clip("3"), clip("4")])
    with torch.no_grad():
        output = model(**inputs)
        assert tuple(output.logits.shape) == (2, inputs["input_ids"].shape[1], 261)
        assert tuple(model.get_image_features(inputs["pixel_values"]).shape) == (2, 4, 32)
        assert tuple(model.get_audio_features(inputs["input_features"]).shape) == (2, 5, 32)
        for embeds in (model.get_image_embeds(inputs["pixel_values"]), model.get_audio_embeds(inputs["input_features"]),
                       model.get_text_embeds(processor.tokenizer(["a b"], return_tensors="pt")["input_ids"])):
            assert embeds.shape[-1] == 16
            assert torch.allclose(embeds.norm(dim=-1), torch.ones(embeds.shape[0]), atol=1e-5)
        # the placeholders read the features: other pixels give other logits at and after them
        other = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)}).logits
        assert not torch.allclose(other, output.logits)


def test_prime_bands_are_disjoint_and_bind_by_the_phasor_identity():
    config = tiny_config()
    bands = config.modality_prime_bands()
    assert bands == {"text": range(0, 261), "image": range(261, 265), "audio": range(265, 270)}
    primes = first_primes(270)
    text, image_primes, audio_primes = ({primes[i] for i in bands[name]} for name in ("text", "image", "audio"))
    assert not (text & image_primes) and not (text & audio_primes) and not (image_primes & audio_primes)
    assert max(text) < min(image_primes) and max(image_primes) < min(audio_primes)
    # the band tables are the §3.1 code of those primes (the text table's continuation)
    full = prime_code_table(270, 8)
    assert torch.equal(modality_prime_code_table(config, "image"), full[261:265])
    assert torch.equal(modality_prime_code_table(config, "audio"), full[265:270])
    # binding across modalities: c(p_text * p_image * p_audio) = c(p_text) c(p_image) c(p_audio)
    p_text, p_image, p_audio = primes[100], primes[262], primes[267]
    bound = prime_phasor(p_text * p_image * p_audio, 4)
    product = prime_phasor(p_text, 4) * prime_phasor(p_image, 4) * prime_phasor(p_audio, 4)
    assert torch.allclose(bound, product, atol=1e-9)


def test_band_codes_switch_on_and_off():
    model, processor = tiny_model()
    baseline, _ = tiny_model(text={"prime_embedding": False}, modality_prime_codes=False)
    pixels = processor(text="<|image|>", images=[image()])["pixel_values"]
    with torch.no_grad():
        codes = model.model.prime_code.proj(model.image_prime_codes)
        projected = model.vision_projector(model.vision_tower(pixel_values=pixels).last_hidden_state)
        assert torch.allclose(model.get_image_features(pixels), projected + codes, atol=1e-6)
        assert not torch.allclose(codes[0], codes[1])  # each position its own prime
        bare = baseline.vision_projector(baseline.vision_tower(pixel_values=pixels).last_hidden_state)
        assert torch.equal(baseline.get_image_features(pixels), bare)
    assert not hasattr(baseline, "image_prime_codes") and baseline.model.prime_code is None
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in baseline.parameters()) == 8 * 32


def test_info_nce_on_known_cases():
    n, scale = 4, 2.0
    identity = torch.eye(n)
    expected = math.log(1 + (n - 1) * math.exp(-scale))  # the positive scores s, the n - 1 negatives 0
    assert info_nce_loss(identity, identity, torch.tensor(math.log(scale))).item() == pytest.approx(expected, rel=1e-6)
    # two items share caption 0: its column target is uniform over both; rows 0 and 1 score identically
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    second = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[True, False], [True, False], [False, True]])
    loss = info_nce_loss(first, second, torch.tensor(0.0), positives)
    row = -math.log(math.e / (math.e + 1))
    column_0 = -0.5 * 2 * math.log(math.e / (2 * math.e + 1))
    column_1 = -math.log(math.e / (math.e + 2))
    assert loss.item() == pytest.approx((row + (column_0 + column_1) / 2) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="needs as many rows in first \\(3\\) as in second \\(2\\)"):
        info_nce_loss(first, second, torch.tensor(0.0))
    with pytest.raises(ValueError, match="every row and column of positives needs at least one positive pair"):
        info_nce_loss(first, second, torch.tensor(0.0), torch.zeros(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_generate_with_an_image_or_audio_matches_uncached_greedy_decoding(modality):
    model, processor = tiny_model()
    part = {"type": modality}
    inputs = processor(text=chat(processor, part), **({"images": [image()]} if modality == "image" else
                                                     {"audio": [clip()]}))
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        ids = inputs["input_ids"]
        extra = {k: v for k, v in inputs.items() if k in ("pixel_values", "input_features")}
        for _ in range(6):  # no cache: the whole sequence each step, features re-read every time
            logits = model(input_ids=ids, use_cache=False, **extra).logits[:, -1]
            logits[:, processor.tokenizer.eos_token_id] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert generated.tolist() == ids.tolist()


@settings(max_examples=8, deadline=None)
@given(split=st.integers(min_value=1, max_value=12), with_audio=st.booleans())
def test_cached_decoding_gives_the_uncached_logits(split, with_audio):
    model, processor = tiny_model()
    marker = "<|audio|>" if with_audio else "<|image|>"
    inputs = processor(text=f"ab{marker}cdefghijklmn", **({"audio": [clip()]} if with_audio else
                                                           {"images": [image()]}))
    ids = inputs["input_ids"]
    features = {k: v for k, v in inputs.items() if k in ("pixel_values", "input_features")}
    cut = ids.shape[1] - split
    with torch.no_grad():
        full = model(input_ids=ids, **features).logits
        prefix = model(input_ids=ids[:, :cut], use_cache=True, **features)
        cache = prefix.past_key_values
        rest = model(input_ids=ids[:, cut:], past_key_values=cache, use_cache=True).logits
    assert torch.allclose(torch.cat([prefix.logits, rest], dim=1), full, atol=1e-5)


def test_save_and_auto_load_round_trip(tmp_path):
    model, processor = tiny_model()
    torch.manual_seed(5)
    model = ResoLLMForConditionalGeneration(model.config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.25)  # a trained temperature must survive loading
        model.model.prime_code.proj.weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_reso_llm_multimodal.ResoLLMForConditionalGeneration")
    assert config["text_config"]["model_type"] == "reso_llm" and config["modality_prime_codes"] is True
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is ResoLLMForConditionalGeneration and type(loaded_processor) is ResoLLMProcessor
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied
    assert torch.equal(loaded.image_prime_codes, model.image_prime_codes)  # recomputed, not saved
    assert loaded.logit_scale.item() == 3.25
    text = "<|image|>then<|audio|>"
    inputs = processor(text=text, images=[image()], audio=[clip()])
    again = loaded_processor(text=text, images=[image()], audio=[clip()])
    assert inputs.keys() == again.keys()
    for name in inputs:
        assert torch.equal(inputs[name], again[name]), name
    assert loaded_processor.chat_template == processor.chat_template
    with torch.no_grad():
        assert torch.equal(loaded(**again).logits, model(**inputs).logits)
    np.savez(tmp_path / "expected.npz", logits=model(**inputs).logits.detach().numpy(), image=image(),
             clip=clip())


def test_the_saved_folder_loads_and_generates_without_reso_hf(tmp_path):
    model, processor = tiny_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    inputs = processor(text=chat(processor, {"type": "image"}), images=[image()])
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    np.savez(tmp_path / "expected.npz", generated=expected.numpy(), image=image())
    output = run_without_reso_hf(
        f"""
        import numpy as np, torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        expected = np.load({str(tmp_path / "expected.npz")!r})
        model = AutoModelForImageTextToText.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Say"}}]}}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, images=[expected["image"]])
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        assert np.array_equal(generated.numpy(), expected["generated"]), (generated, expected["generated"])
        print(type(model).__module__, type(processor).__module__)
        """,
        tmp_path,
    )
    model_module, processor_module = output.split()
    assert model_module.startswith("transformers_modules.") and processor_module.startswith("transformers_modules.")


@pytest.mark.parametrize("key", dtmf.KEYS)
def test_dtmf_tone_peaks_at_the_keys_two_frequencies(key):
    row, column = dtmf.key_frequencies(key)
    tone = dtmf.dtmf_tone(key, duration=0.5, start=0.25, snr_db=20, rng=np.random.default_rng(1))
    assert tone.dtype == np.float32 and tone.shape == (16000,)
    low, high = dtmf.dominant_frequencies(tone)
    assert abs(low - row) <= 2 and abs(high - column) <= 2  # 1 Hz FFT bins over the 1 s clip
    # the level: RMS over the tone's span is that of a -10 dBFS sine (plus -30 dB of noise)
    span = tone[4000 + 80:12000 - 80]
    assert 20 * math.log10(np.sqrt(np.mean(span**2)) * math.sqrt(2)) == pytest.approx(-10.0, abs=0.3)


def test_dtmf_generator_varies_within_tolerance_and_rejects_bad_input():
    rng = np.random.default_rng(3)
    for key in "0123456789":
        row, column = dtmf.key_frequencies(key)
        low, high = dtmf.dominant_frequencies(dtmf.random_dtmf_clip(key, rng))
        assert abs(low / row - 1) < 0.02 and abs(high / column - 1) < 0.02  # +-1.5 % plus a bin
    assert dtmf.key_frequencies("#") == (941.0, 1477.0) and dtmf.key_frequencies("A") == (697.0, 1633.0)
    with pytest.raises(ValueError, match="key='E' is invalid: expected one of 123A456B789C\\*0#D"):
        dtmf.key_frequencies("E")
    with pytest.raises(ValueError, match="start=0.9 and duration=0.2 must satisfy"):
        dtmf.dtmf_tone("1", start=0.9, duration=0.2)


def test_training_command_runs_both_stages_and_saves_a_loadable_model(tmp_path):
    from reso_hf.multimodal import training
    from reso_hf.training.arguments import parse_recipe

    rng = np.random.default_rng(0)

    def split(count):
        labels = np.arange(count) % 10
        audio = np.stack([dtmf.random_dtmf_clip(str(d), rng) for d in labels])
        return MultimodalSplit(rng.integers(0, 256, (count, 8, 8), dtype=np.uint8), labels, audio, labels.copy())

    splits = {"train": split(20), "dev": split(10), "test": split(10)}
    (args,) = parse_recipe(training.ARGUMENT_TYPES, "recipes/multimodal/digits_dtmf.yaml", [
        "--output_dir", str(tmp_path / "run"), "--contrastive_steps", "2", "--captioning_steps", "2",
        "--batch_size", "8", "--hidden_size", "32", "--logging_steps", "1"])
    summary = training.run(args, quiet=True, splits=splits)
    assert [entry["stage"] for entry in summary["log_history"]] == ["contrastive"] * 2 + ["captioning"] * 2
    assert set(summary["eval"]) == {"zero_shot_accuracy", "image_to_text_p_at_1", "audio_to_text_p_at_1",
                                    "image_to_audio_p_at_1", "image_caption_exact_match",
                                    "audio_caption_exact_match"}
    assert all(0.0 <= value <= 1.0 for value in summary["eval"].values())
    written = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert written["eval"] == summary["eval"] and (tmp_path / "run" / "loss_curves.png").stat().st_size > 0
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "model")
    assert loaded.config.modality_prime_codes is True and loaded.config.text_config.hidden_size == 32
    with pytest.raises(ValueError, match="eval_split='train' is invalid: expected one of \\('dev', 'test'\\)"):
        parse_recipe(training.ARGUMENT_TYPES, None, ["--eval_split", "train"])
    assert image_caption(7) == "a handwritten seven" and audio_caption(7) == "the tone for key 7"


def test_pretrained_towers_and_decoder_load_from_folders(tmp_path):
    from transformers import SiglipVisionModel, WhisperModel

    model, _ = tiny_model()
    config = model.config
    torch.manual_seed(1)
    vision = SiglipVisionModel(config.vision_config)
    whisper = WhisperModel(config.audio_config)
    text = reso_hf.ResoLLMForCausalLM(config.text_config)
    for name, part in (("vision", vision), ("whisper", whisper), ("text", text)):
        part.save_pretrained(tmp_path / name)
    built = ResoLLMForConditionalGeneration.from_parts(config, text_model=str(tmp_path / "text"),
                                                       vision_tower=str(tmp_path / "vision"),
                                                       audio_tower=str(tmp_path / "whisper"))
    for loaded, source in ((built.vision_tower, vision), (built.audio_tower, whisper.encoder), (built.model, text.model)):
        state = source.state_dict()
        assert sorted(loaded.state_dict()) == sorted(state)
        assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())
    assert built.lm_head.weight.data_ptr() == built.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="vision_tower=3 is invalid: expected a model, a folder or a Hub id"):
        ResoLLMForConditionalGeneration.from_parts(config, vision_tower=3)


def test_a_left_padded_batch_gives_each_rows_own_logits():
    model, processor = tiny_model()
    texts = [chat(processor, {"type": "image"}), "### Human: a longer prompt <|audio|><|image|>### Assistant:"]
    batch = processor(text=texts, images=[image(0), image(1)], audio=[clip("5")], padding_side="left")
    assert batch["attention_mask"][0, 0] == 0  # the shorter row is padded on the left
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        first = model(**processor(text=texts[0], images=[image(0)])).logits[0, -1]
        second = model(**processor(text=texts[1], images=[image(1)], audio=[clip("5")])).logits[0, -1]
    assert torch.allclose(batched[0], first, atol=1e-5) and torch.allclose(batched[1], second, atol=1e-5)
