"""ResoTokenizer: lossless byte-level BPE with a prime map and a guanaco chat template (SPEC §4).

This file is SELF-CONTAINED: ``save_pretrained`` copies it (and ``primes.py``, its only relative
import) into every checkpoint, so ``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)``
works where ``reso_hf`` is not installed. Only ``tokenizers``, ``transformers`` and the standard
library may be imported besides ``.primes``.

Pipeline (identical for the default and the trained tokenizers):

* no normalizer (the text is never altered);
* ``ByteLevel`` pre-tokenizer, ``add_prefix_space=False``, ``use_regex=True`` (GPT-2 style split of
  words, numbers, punctuation and whitespace; every character, including control characters and
  ``\\r\\n``, lands in exactly one piece, so nothing is dropped);
* BPE model over the 256 byte symbols (no unknown token: every string is representable);
* ``ByteLevel`` decoder, ``clean_up_tokenization_spaces=False``;

hence ``decode(encode(s)) == s`` for every Unicode string ``s``.

Special tokens: ``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|eos|>`` = 2. Decoder-only convention: neither
bos nor eos is added by ``__call__``/``encode`` (``add_bos_token=False``); training code appends eos
between documents and the chat template puts eos after each assistant turn. Padding is on the right.

Prime map: token id ``i`` <-> the ``i``-th prime ``p_i`` (``p_0 = 2``), over ``len(tokenizer)`` ids.
"""

import math
import operator
from collections.abc import Iterable
from functools import lru_cache

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from .primes import factorize_over, first_primes


PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2 in this order
NUM_BYTES = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTES  # 259

# Guanaco format (timdettmers/openassistant-guanaco): turns abut directly, no separator:
#   "### Human: {user}### Assistant: {assistant}### Human: ..."
# eos follows every assistant turn. The generation prompt is "### Assistant:" WITHOUT a trailing
# space: byte-level BPE attaches the space to the next word (" The"), so the model generates the
# space itself, exactly as it saw it in training. The {% generation %} block covers what the model
# must produce after that prompt (" {content}<|eos|>"), for `return_assistant_tokens_mask=True`.
# A system message (first position only) is prepended as plain text followed by a blank line.
# Content is a string or a list of {"type": "text", "text": ...} parts; anything else raises.
GUANACO_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set parts = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] != 'text' -%}"
    "{{ raise_exception('Unsupported content part type ' ~ part['type'] ~ '; allowed: text') }}"
    "{%- endif -%}"
    "{%- set parts.text = parts.text ~ part['text'] -%}"
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


def _byte_to_unicode() -> dict:
    """The reversible byte -> printable character table of the ByteLevel pre-tokenizer.

    Bytes that are printable Latin-1 characters keep their own character; the others (controls,
    space, soft hyphen...) are shifted to code points 256, 257, ... in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table = {}
    shifted = 0
    for b in range(NUM_BYTES):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(NUM_BYTES + shifted)
            shifted += 1
    return table


def _configure_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _special_added_tokens() -> list:
    return [AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
            for t in SPECIAL_TOKENS]


@lru_cache(maxsize=8)
def _prime_to_index(count: int) -> dict:
    return {p: i for i, p in enumerate(first_primes(count))}


def _as_int(value, field: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{field} must be an integer, got {value!r} of type {type(value).__name__}") from None


class ResoTokenizer(TokenizersBackend):
    """Byte-level BPE tokenizer of Reso-LLM with a prime map (token id ``i`` <-> ``i``-th prime).

    Build one with :func:`create_default_tokenizer` (bytes only, no training) or
    :func:`train_tokenizer`; reload with ``ResoTokenizer.from_pretrained`` or ``AutoTokenizer``.
    The class deliberately has no ``__init__`` of its own: transformers then rebuilds it from
    ``tokenizer.json`` exactly (normalizer, pre-tokenizer, model, decoder, post-processor).
    """

    model = BPE
    model_input_names = ["input_ids", "attention_mask"]

    # ----------------------------------------------------------------------------- prime map
    def _prime_index(self) -> dict:
        return _prime_to_index(len(self))

    def token_to_prime(self, token_id: int) -> int:
        """The prime of token ``token_id``: the ``token_id``-th prime, ``p_0 = 2``."""
        token_id = _as_int(token_id, "token_id")
        size = len(self)
        if not 0 <= token_id < size:
            raise ValueError(f"token_id {token_id} is out of range; allowed range is 0..{size - 1}")
        return first_primes(size)[token_id]

    def prime_to_token(self, prime: int) -> int:
        """The token id whose prime is ``prime`` (inverse of :meth:`token_to_prime`)."""
        prime = _as_int(prime, "prime")
        index = self._prime_index()
        if prime in index:
            return index[prime]
        size = len(self)
        largest = first_primes(size)[-1]
        if prime > largest:
            raise ValueError(
                f"prime {prime} is outside the vocabulary; allowed primes are the first {size} primes, 2..{largest}"
            )
        raise ValueError(f"{prime} is not a prime; allowed primes are the first {size} primes, 2..{largest}")

    def signature(self, text: str) -> int:
        """Product of the primes of ``text``'s tokens (``add_special_tokens=False``); 1 for ``""``."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        primes = first_primes(len(self))
        return math.prod(primes[i] for i in self.encode(text, add_special_tokens=False))

    def tokens_from_signature(self, signature: int) -> list:
        """The multiset of token ids (sorted ascending) whose primes multiply to ``signature``."""
        signature = _as_int(signature, "signature")
        size = len(self)
        if signature < 1:
            raise ValueError(f"signature must be a positive integer (1 = no tokens), got {signature}")
        primes = first_primes(size)
        try:
            factors = factorize_over(signature, primes)
        except ValueError as err:
            raise ValueError(
                f"signature {signature} is not a product of vocabulary primes (the first {size} primes, "
                f"2..{primes[-1]}): {err}"
            ) from err
        index = self._prime_index()
        return sorted(index[p] for p, count in factors.items() for _ in range(count))

    # ----------------------------------------------------------------------------- decoding
    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        # Like every fast tokenizer, ids past the vocabulary decode to nothing: models often pad their embedding
        # matrix past the tokenizer (for speed), and a sampled padding id must not crash generation. A negative or
        # non-integer id cannot come from a model, so that stays an error.
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        for token_id in ids:
            if isinstance(token_id, bool) or int(token_id) != token_id or int(token_id) < 0:
                raise ValueError(f"token id {token_id!r} is invalid: expected an int >= 0")
        return super()._decode(
            token_ids,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )


# save_pretrained writes auto_map + copies this file and primes.py, so trust_remote_code loads work.
ResoTokenizer.register_for_auto_class("AutoTokenizer")


def _wrap(backend: Tokenizer) -> ResoTokenizer:
    for i, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != i:
            raise RuntimeError(f"special token {token} must have id {i}, got {backend.token_to_id(token)}")
    return ResoTokenizer(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=None,
        add_bos_token=False,
        add_eos_token=False,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        chat_template=GUANACO_CHAT_TEMPLATE,
    )


def create_default_tokenizer() -> ResoTokenizer:
    """Bytes-only tokenizer (no training, no network): 3 specials + 256 byte tokens = 259 ids.

    Byte ``b`` is token ``3 + b``; there are no merges, so one UTF-8 byte = one token.
    """
    table = _byte_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for b in range(NUM_BYTES):
        vocab[table[b]] = len(SPECIAL_TOKENS) + b
    backend = _configure_pipeline(Tokenizer(BPE(vocab=vocab, merges=[], dropout=None, fuse_unk=False)))
    backend.add_special_tokens(_special_added_tokens())
    return _wrap(backend)


def _checked_texts(texts):
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{position}] must be a str, got {type(text).__name__}")
        yield text


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    max_token_length: int | None = None,
    length: int | None = None,
) -> ResoTokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` ids (specials 0..2, then the 256 bytes).

    ``texts`` is any iterable of strings (streamed, not held in memory); ``length`` is its size if
    known (only used by the trainer for batching). No progress bar is shown. The result may be
    smaller than ``vocab_size`` when the corpus has too few pairs of ``min_frequency`` occurrences.
    """
    vocab_size = _as_int(vocab_size, "vocab_size")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB_SIZE} (3 special tokens + 256 bytes), got {vocab_size}"
        )
    min_frequency = _as_int(min_frequency, "min_frequency")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if max_token_length is not None:
        max_token_length = _as_int(max_token_length, "max_token_length")
        if max_token_length < 1:
            raise ValueError(f"max_token_length must be >= 1 or None, got {max_token_length}")
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, got a single str")
    backend = _configure_pipeline(Tokenizer(BPE(dropout=None, fuse_unk=False)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=_special_added_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
    )
    backend.train_from_iterator(_checked_texts(texts), trainer=trainer, length=length)
    return _wrap(backend)


__all__ = ["ResoTokenizer", "GUANACO_CHAT_TEMPLATE", "create_default_tokenizer", "train_tokenizer"]
