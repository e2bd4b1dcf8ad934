"""ResoTokenizer (SPEC §4): lossless byte-level BPE, prime map, guanaco chat template, save/load,
trust_remote_code loading without reso_hf, and the bundled guanaco-format sample."""

import ast
import json
import re
import sys
from importlib import resources
from pathlib import Path

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerFast

from reso_hf.modeling.primes import first_primes
from reso_hf.tokenization import GUANACO_CHAT_TEMPLATE, ResoTokenizer, create_default_tokenizer, train_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from isolation import run_without_reso_hf  # noqa: E402

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"

# Pieces that break naive tokenizers: emoji with skin tones and ZWJ, CJK, Hangul, RTL scripts with
# direction marks, combining accents, BOM, controls, NUL, CRLF, the last code point, special-token text.
TRICKY_PIECES = [
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇪🇸", "日本語", "中文", "한국어", "שלום", "مرحبا", "\u200f", "\u200e",
    "e\u0301", "é", "\ufeff", "\x00", "\x01", "\x1b", "\x7f", "\x85", "\r\n", "\r", "\n", "\t", " ", "  ",
    "\u00a0", "\u2028", "\U0010ffff", "\ufffd", "Ǆ", "ß", "İ", "<|eos|>", "<|bos|>", "<|pad|>", "<|", "|>",
    "###", "### Human:", "'s", "don't", "123", "3.14", "hello", " world", "Привет", "¿Qué?",
]
TRICKY_STRINGS = [
    "",
    " leading space",
    "trailing space ",
    "a\r\nb\rc\nd",
    "👨\u200d👩\u200d👧 family 日本語 שלום مرحبا",
    "\x00\x01\x7f\ufeff\U0010ffff",
    "<|eos|>inside<|bos|> text<|pad|>",
    "### Human: hi### Assistant: hello",
    "Ünïcödé  double  spaces\t\ttabs",
]
tricky_text = st.one_of(
    st.text(),
    st.lists(st.sampled_from(TRICKY_PIECES), max_size=12).map("".join),
    st.lists(st.one_of(st.sampled_from(TRICKY_PIECES), st.text(max_size=4)), max_size=8).map("".join),
)

SAMPLE_PATH = Path(resources.files("reso_hf") / "data" / "guanaco_sample.jsonl")


def _sample_texts():
    return [json.loads(line)["text"] for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def default_tok():
    return create_default_tokenizer()


@pytest.fixture(scope="module")
def trained_tok():
    return train_tokenizer(_sample_texts() * 2, vocab_size=600)


@pytest.fixture(scope="module", params=["default", "trained"])
def any_tok(request, default_tok, trained_tok):
    return default_tok if request.param == "default" else trained_tok


def _pipeline_json(tok) -> dict:
    return json.loads(tok.backend_tokenizer.to_str())


# ------------------------------------------------------------------------------------ layout


def test_default_tokenizer_layout(default_tok):
    tok = default_tok
    assert isinstance(tok, ResoTokenizer)
    assert len(tok) == tok.vocab_size == 259
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD, BOS, EOS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.unk_token is None
    assert tok.padding_side == "right"
    assert tok.add_bos_token is False and tok.add_eos_token is False
    assert tok.model_input_names == ["input_ids", "attention_mask"]
    assert tok.clean_up_tokenization_spaces is False
    # one token per UTF-8 byte, byte b -> id 3 + b, nothing added around the text
    text = "Hé 😀\n"
    assert tok(text)["input_ids"] == [3 + b for b in text.encode("utf-8")]
    assert tok.encode(text) == tok.encode(text, add_special_tokens=False)
    # pipeline: no normalizer, ByteLevel pre-tokenizer without prefix space, ByteLevel decoder
    pipeline = _pipeline_json(tok)
    assert pipeline["normalizer"] is None
    assert pipeline["pre_tokenizer"]["type"] == "ByteLevel"
    assert pipeline["pre_tokenizer"]["add_prefix_space"] is False
    assert pipeline["decoder"]["type"] == "ByteLevel"
    assert pipeline["model"]["type"] == "BPE" and pipeline["model"]["merges"] == []
    assert tok.chat_template == GUANACO_CHAT_TEMPLATE


def test_bos_is_opt_in():
    tok = create_default_tokenizer()
    tok.add_bos_token = True
    assert tok("a")["input_ids"] == [1, 3 + ord("a")]
    assert tok.decode(tok("a")["input_ids"], skip_special_tokens=True) == "a"


def test_right_padding_batch(default_tok):
    batch = default_tok(["abc", "a"], padding=True)
    assert batch["input_ids"][1] == [3 + ord("a"), 0, 0]
    assert batch["attention_mask"] == [[1, 1, 1], [1, 0, 0]]


def test_trained_tokenizer_layout(trained_tok):
    tok = trained_tok
    assert 259 < len(tok) <= 600  # merges were learned
    assert tok.convert_ids_to_tokens([0, 1, 2]) == [PAD, BOS, EOS]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.chat_template == GUANACO_CHAT_TEMPLATE
    assert _pipeline_json(tok)["pre_tokenizer"] == _pipeline_json(create_default_tokenizer())["pre_tokenizer"]
    assert _pipeline_json(tok)["decoder"] == _pipeline_json(create_default_tokenizer())["decoder"]
    # all 256 byte symbols are in the vocabulary, so nothing is ever unknown
    vocab = tok.get_vocab()
    default_vocab = create_default_tokenizer().get_vocab()
    assert set(default_vocab) <= set(vocab)
    # merges compress: the trained tokenizer needs fewer tokens than bytes on in-domain text
    text = "### Human: What is the difference between weather and climate?"
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_train_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match=r"vocab_size must be >= 259.*got 258"):
        train_tokenizer(["abc"], vocab_size=258)
    with pytest.raises(ValueError, match="vocab_size must be an integer"):
        train_tokenizer(["abc"], vocab_size="300")
    with pytest.raises(ValueError, match="single str"):
        train_tokenizer("abc", vocab_size=300)
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str, got int"):
        train_tokenizer(["abc", 5], vocab_size=300)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(["abc"], vocab_size=300, min_frequency=0)


def test_train_tokenizer_accepts_a_generator_and_minimum_size():
    tok = train_tokenizer((t for t in ["aaaa bbbb", "aaaa"]), vocab_size=259, min_frequency=1)
    assert len(tok) == 259
    assert tok.decode(tok.encode("aaaa bbbb")) == "aaaa bbbb"


# ------------------------------------------------------------------------------------ lossless


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=tricky_text)
def test_roundtrip_default(default_tok, text):
    ids = default_tok.encode(text)
    assert default_tok.decode(ids) == text
    assert len(ids) >= len(text.encode("utf-8")) - 7 * text.count("<|")  # specials are single tokens


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=tricky_text)
def test_roundtrip_trained(trained_tok, text):
    assert trained_tok.decode(trained_tok.encode(text)) == text


@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_roundtrip_tricky_strings_and_batches(any_tok, text):
    assert any_tok.decode(any_tok.encode(text)) == text
    batch = any_tok([text, text + "x"], padding=True)
    decoded = any_tok.batch_decode(
        [[i for i, m in zip(ids, mask) if m] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    )
    assert decoded == [text, text + "x"]


def test_decode_skips_ids_past_the_vocabulary_like_fast_tokenizers(any_tok):
    # A model whose embedding is padded past the tokenizer may sample such an id: decoding must not crash,
    # and (as in transformers' fast tokenizers) it decodes to nothing.
    size = len(any_tok)
    text = "a b"
    ids = any_tok.encode(text)
    assert any_tok.decode(ids + [size, size + 100]) == any_tok.decode(ids) == text
    assert any_tok.batch_decode([[size], ids + [size + 1]]) == ["", text]
    plain = PreTrainedTokenizerFast(tokenizer_object=any_tok.backend_tokenizer)
    assert plain.decode(ids + [size]) == plain.decode(ids)  # the convention we follow
    with pytest.raises(ValueError, match=r"token id -1 is invalid: expected an int >= 0"):
        any_tok.decode([-1])


# ------------------------------------------------------------------------------------ prime map


def test_prime_map_known_values(default_tok):
    tok = default_tok
    assert tok.token_to_prime(0) == 2
    assert tok.token_to_prime(1) == 3
    assert tok.token_to_prime(4) == 11
    assert tok.token_to_prime(258) == 1637  # the 259th prime
    assert tok.prime_to_token(2) == 0
    assert tok.prime_to_token(11) == 4
    assert tok.prime_to_token(1637) == 258
    primes = first_primes(len(tok))
    assert all(tok.prime_to_token(tok.token_to_prime(i)) == i for i in range(len(tok)))
    assert all(tok.token_to_prime(tok.prime_to_token(p)) == p for p in primes)
    assert tok.signature("") == 1
    assert tok.tokens_from_signature(1) == []
    # "ab" is bytes 97, 98 -> ids 100, 101
    assert tok.signature("ab") == primes[100] * primes[101]
    assert tok.signature("<|eos|>") == 5  # the special token as the encoding yields it


def test_prime_map_errors(default_tok):
    tok = default_tok
    for bad in (-1, 259, 10**6):
        with pytest.raises(ValueError, match=rf"token_id {bad} is out of range; allowed range is 0\.\.258"):
            tok.token_to_prime(bad)
    for bad in ("3", 2.0, None, True):
        with pytest.raises(ValueError, match="token_id must be an integer"):
            tok.token_to_prime(bad)
    for not_prime in (0, 1, 4, 9, 1636):
        with pytest.raises(ValueError, match=rf"{not_prime} is not a prime; allowed primes are the first 259 primes, 2\.\.1637"):
            tok.prime_to_token(not_prime)
    with pytest.raises(ValueError, match=r"prime 1657 is outside the vocabulary; allowed primes are the first 259 primes, 2\.\.1637"):
        tok.prime_to_token(1657)  # the 260th prime
    with pytest.raises(ValueError, match="prime must be an integer"):
        tok.prime_to_token("11")
    for bad in (0, -6):
        with pytest.raises(ValueError, match=rf"signature must be a positive integer.*got {bad}"):
            tok.tokens_from_signature(bad)
    with pytest.raises(ValueError, match=r"signature 3314 is not a product of vocabulary primes.*2\.\.1637"):
        tok.tokens_from_signature(2 * 1657)
    with pytest.raises(ValueError, match="text must be a str"):
        tok.signature(["a"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=tricky_text)
def test_signature_roundtrip(any_tok, text):
    ids = any_tok.encode(text, add_special_tokens=False)
    signature = any_tok.signature(text)
    assert isinstance(signature, int) and signature >= 1
    assert any_tok.tokens_from_signature(signature) == sorted(ids)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=0, max_value=258), max_size=40))
def test_signature_factorisation_recovers_any_multiset(default_tok, ids):
    signature = 1
    for i in ids:
        signature *= default_tok.token_to_prime(i)
    assert default_tok.tokens_from_signature(signature) == sorted(ids)


def test_signature_is_a_multiset_code(default_tok):
    # One token per byte: anagrams share a signature, repetition raises it to a power.
    assert default_tok.signature("listen") == default_tok.signature("silent")
    assert default_tok.signature("ab" * 50) == default_tok.signature("ab") ** 50
    assert default_tok.signature("ab") != default_tok.signature("abb")


# ------------------------------------------------------------------------------------ chat template

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "3+3 is 6."},
]


def test_chat_template_renders_guanaco(any_tok):
    rendered = any_tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == (
        "### Human: What is 2+2?### Assistant: 2+2 is 4.<|eos|>"
        "### Human: And 3+3?### Assistant: 3+3 is 6.<|eos|>"
    )
    prompt = any_tok.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    assert prompt == "### Human: What is 2+2?### Assistant: 2+2 is 4.<|eos|>### Human: And 3+3?### Assistant:"
    no_prompt = any_tok.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "### Human: What is 2+2?### Assistant: 2+2 is 4.<|eos|>### Human: And 3+3?"


def test_chat_template_tokenized(any_tok):
    out = any_tok.apply_chat_template(CONVERSATION, tokenize=True)
    assert isinstance(out, BatchEncoding)
    rendered = any_tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert out["input_ids"] == any_tok.encode(rendered, add_special_tokens=False)
    assert out["input_ids"].count(any_tok.eos_token_id) == 2
    assert BOS not in any_tok.convert_ids_to_tokens(out["input_ids"])
    # The generation prompt tokenizes as a strict prefix of the full conversation (no trailing space
    # in "### Assistant:"), so generation continues exactly as in training.
    prompt_ids = any_tok.apply_chat_template(CONVERSATION[:3], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert out["input_ids"][: len(prompt_ids)] == prompt_ids
    assert any_tok.decode(out["input_ids"][len(prompt_ids):]) == " 3+3 is 6.<|eos|>"


def test_chat_template_assistant_mask(any_tok):
    out = any_tok.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    spans, current = [], []
    for token_id, m in zip(ids, mask):
        if m:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert [any_tok.decode(span) for span in spans] == [" 2+2 is 4.<|eos|>", " 3+3 is 6.<|eos|>"]


def test_chat_template_system_parts_and_errors(default_tok):
    tok = default_tok
    with_system = [{"role": "system", "content": "Answer briefly."}] + CONVERSATION[:1]
    assert tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "Answer briefly.\n\n### Human: What is 2+2?### Assistant:"
    )
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "### Human: Hi there"
    with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role tool; allowed roles: system, user, assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="only allowed as the first message"):
        tok.apply_chat_template(CONVERSATION[:1] + [{"role": "system", "content": "x"}], tokenize=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="Unsupported content part type image"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "x"}]}], tokenize=False)


# ------------------------------------------------------------------------------------ save / load


def _assert_same_tokenizer(a, b):
    assert type(b).__name__ == "ResoTokenizer"
    for text in TRICKY_STRINGS + ["### Human: ¿Qué tal?### Assistant: Bien 😀<|eos|>"]:
        assert a.encode(text) == b.encode(text)
        assert b.decode(b.encode(text)) == text
    pa, pb = _pipeline_json(a), _pipeline_json(b)
    for part in ("normalizer", "pre_tokenizer", "decoder", "post_processor", "model", "added_tokens"):
        assert pa[part] == pb[part], part
    assert a.chat_template == b.chat_template == GUANACO_CHAT_TEMPLATE
    assert a.special_tokens_map == b.special_tokens_map
    assert [a.pad_token_id, a.bos_token_id, a.eos_token_id] == [b.pad_token_id, b.bos_token_id, b.eos_token_id]
    assert (b.padding_side, b.add_bos_token, b.add_eos_token) == ("right", False, False)
    assert b.clean_up_tokenization_spaces is False
    assert len(a) == len(b)
    assert a.signature("prime map") == b.signature("prime map")


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory, default_tok, trained_tok):
    root = tmp_path_factory.mktemp("tokenizers")
    default_tok.save_pretrained(root / "default")
    trained_tok.save_pretrained(root / "trained")
    return root


@pytest.mark.parametrize("name", ["default", "trained"])
def test_saved_folder_carries_code_and_auto_map(saved_dirs, name):
    folder = saved_dirs / name
    files = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "tokenization_reso_llm.py", "primes.py"} <= files
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_reso_llm.ResoTokenizer"
    assert config["tokenizer_class"] == "ResoTokenizer"
    assert (folder / "chat_template.jinja").read_text() == GUANACO_CHAT_TEMPLATE
    # the copied code is self-contained: relative import of .primes, else only stdlib/tokenizers/transformers
    tree = ast.parse((folder / "tokenization_reso_llm.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module == "primes"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            for module in names:
                top = module.split(".")[0]
                assert top in {"tokenizers", "transformers"} or top in sys.stdlib_module_names, module


@pytest.mark.parametrize("name", ["default", "trained"])
def test_save_load_keeps_whole_pipeline(saved_dirs, default_tok, trained_tok, name):
    original = default_tok if name == "default" else trained_tok
    reloaded = ResoTokenizer.from_pretrained(saved_dirs / name)
    _assert_same_tokenizer(original, reloaded)
    via_auto = AutoTokenizer.from_pretrained(saved_dirs / name)
    assert type(via_auto) is ResoTokenizer
    _assert_same_tokenizer(original, via_auto)
    # and it survives a second save/load cycle unchanged
    reloaded.save_pretrained(saved_dirs / f"{name}-again")
    _assert_same_tokenizer(original, ResoTokenizer.from_pretrained(saved_dirs / f"{name}-again"))


_ISOLATED_CHILD = """
import json
from transformers import AutoTokenizer
strings = {strings!r}
conversation = {conversation!r}
result = {{}}
for name in ("default", "trained"):
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    backend = json.loads(tok.backend_tokenizer.to_str())
    result[name] = dict(
        module=type(tok).__module__, cls=type(tok).__name__,
        ids=[tok.encode(s) for s in strings],
        roundtrip=all(tok.decode(tok.encode(s)) == s for s in strings),
        pipeline={{k: backend[k] for k in ("normalizer", "pre_tokenizer", "decoder", "post_processor", "added_tokens")}},
        chat_template=tok.chat_template,
        chat=tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
        specials=[tok.pad_token, tok.bos_token, tok.eos_token, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id],
        padding_side=tok.padding_side, size=len(tok),
        prime4=tok.token_to_prime(4), signature=str(tok.signature("prime map")),
    )
print(json.dumps(result))
"""


def test_trust_remote_code_load_without_reso_hf(saved_dirs, default_tok, trained_tok, tmp_path_factory):
    code = _ISOLATED_CHILD.format(strings=TRICKY_STRINGS, conversation=CONVERSATION[:3])
    out = run_without_reso_hf(code, saved_dirs)
    result = json.loads(out.strip().splitlines()[-1])
    for name, tok in (("default", default_tok), ("trained", trained_tok)):
        child = result[name]
        assert child["module"].startswith("transformers_modules."), child["module"]  # the copied code ran
        assert child["cls"] == "ResoTokenizer"
        assert child["ids"] == [tok.encode(s) for s in TRICKY_STRINGS]
        assert child["roundtrip"] is True
        backend = _pipeline_json(tok)
        assert child["pipeline"] == {k: backend[k] for k in child["pipeline"]}
        assert child["chat_template"] == GUANACO_CHAT_TEMPLATE
        assert child["chat"] == tok.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
        assert child["specials"] == [PAD, BOS, EOS, 0, 1, 2]
        assert child["padding_side"] == "right"
        assert child["size"] == len(tok)
        assert child["prime4"] == 11
        assert int(child["signature"]) == tok.signature("prime map")


# ------------------------------------------------------------------------------------ the sample

_TURN = re.compile(r"### (Human|Assistant): ")


def _parse_guanaco(text):
    """Split a guanaco row into chat messages; raises AssertionError on malformed rows."""
    pieces = _TURN.split(text)
    assert pieces[0] == "", f"row must start with '### Human: ': {text[:60]!r}"
    roles, contents = pieces[1::2], pieces[2::2]
    assert roles == ["Human", "Assistant"] * (len(roles) // 2) and len(roles) % 2 == 0, roles
    assert all(c.strip() == c and c for c in contents), f"empty or padded turn in {text[:60]!r}"
    return [{"role": "user" if r == "Human" else "assistant", "content": c} for r, c in zip(roles, contents)]


_STOPWORDS = {
    "en": {"the", "and", "is", "of", "to", "you", "it", "that", "in", "for", "a", "are", "with", "your", "what", "how"},
    "es": {"el", "los", "las", "que", "y", "es", "por", "para", "se", "como", "más", "una", "del", "muy", "hay", "qué", "cómo"},
    "de": {"der", "die", "das", "und", "ist", "nicht", "sie", "ein", "eine", "mit", "für", "auf", "wie", "man", "ihre"},
    "fr": {"le", "les", "et", "est", "une", "des", "pour", "qui", "dans", "pas", "sur", "au", "du", "il", "on"},
    "it": {"il", "di", "che", "è", "per", "della", "sono", "gli", "tra", "molto", "solo", "si"},
}


def _language(text):
    if re.search(r"[\u0400-\u04ff]", text):
        return "ru"
    if re.search(r"[\u3040-\u30ff]", text):
        return "ja"
    if re.search(r"[\u4e00-\u9fff]", text):
        return "zh"
    words = re.findall(r"[^\W\d_]+", text.lower())
    scores = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    return max(scores, key=scores.get)


def test_sample_file_format_and_mix(default_tok):
    lines = SAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    assert 100 <= len(lines) <= 150
    rows = [json.loads(line) for line in lines]
    assert all(set(row) == {"text"} for row in rows)
    texts = [row["text"] for row in rows]
    assert len(set(texts)) == len(texts)
    multi_turn = 0
    for text in texts:
        assert "### Human: " in text and "### Assistant: " in text
        messages = _parse_guanaco(text)
        multi_turn += len(messages) > 2
        # the chat template reproduces the row exactly (the rows carry no eos)
        assert default_tok.apply_chat_template(messages, tokenize=False).replace(EOS, "") == text
        assert default_tok.decode(default_tok.encode(text)) == text
    n = len(texts)
    assert 0.10 <= multi_turn / n <= 0.20
    languages = [_language(t) for t in texts]
    counts = {lang: languages.count(lang) for lang in set(languages)}
    assert 0.60 <= counts["en"] / n <= 0.80, counts
    assert 0.12 <= counts["es"] / n <= 0.18, counts
    assert 0.08 <= counts["ru"] / n <= 0.12, counts
    others = {lang: c for lang, c in counts.items() if lang not in ("en", "es", "ru")}
    assert len(others) >= 3 and sum(others.values()) >= 4, counts
