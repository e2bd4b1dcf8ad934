"""Guanaco data pipeline: parsing, malformed rows, assistant-only labels, EOS, packing, loading errors."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reso_hf
from reso_hf.training.arguments import DataArguments
from reso_hf.training.data import (
    IGNORE_INDEX,
    DataFileError,
    DataSourceError,
    MalformedRowError,
    build_datasets,
    pack_documents,
    parse_guanaco,
    tokenize_messages,
)

GUANACO = reso_hf.GUANACO_CHAT_TEMPLATE
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return reso_hf.create_default_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------- parsing


def test_parse_multi_turn():
    text = "### Human: Hi there### Assistant: Hello!### Human: How are you?### Assistant: Fine, thanks."
    assert parse_guanaco(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
    ]


@pytest.mark.parametrize("text, reason", [
    (None, "must be a str"),
    (42, "must be a str"),
    ("", "empty text"),
    ("   \n", "empty text"),
    ("### Human: only a question", "no '### Assistant:' turn"),
    ("preamble ### Human: q### Assistant: a", "text before the first"),
    ("### Assistant: a### Human: q", "must start with"),
    ("### Human: q### Assistant:   ", "empty assistant turn"),
])
def test_parse_malformed(text, reason):
    with pytest.raises(MalformedRowError, match=reason):
        parse_guanaco(text)


def test_malformed_rows_skipped_and_counted_on_the_console_or_rejected_in_strict_mode(tmp_path, tokenizer, caplog):
    good = "### Human: q### Assistant: a"
    # (a non-string cell cannot share an arrow column with strings; parse_guanaco's type check is tested above)
    rows = [{"text": good}, {"text": ""}, {"text": "### Human: no answer"}, {"text": "7"}, {"text": good}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    args = DataArguments(data_files=[path], eval_fraction=0.0, block_size=32)
    with caplog.at_level("WARNING", logger="reso_hf.training.data"):
        train, evaluation, stats = build_datasets(args, tokenizer)
    summary = stats.to_dict()
    assert evaluation is None
    assert summary["rows"]["train"] == 5
    assert summary["malformed_rows"]["train"] == 3
    assert summary["malformed_reasons"]["train"] == {
        "empty text": 1, "no '### Assistant:' turn": 1, "text before the first '### Human:' marker: '7'": 1}
    assert [r.getMessage() for r in caplog.records] == [
        "train: skipped 3 of 5 rows that are not guanaco conversations (1 x empty text; 1 x no '### Assistant:' "
        "turn; 1 x text before the first '### Human:' marker: '7'); --strict true stops at the first one and names "
        "its line"]
    with pytest.raises(MalformedRowError, match=r"rows\.jsonl line 2: not a guanaco conversation: empty text "
                                                 r"\(3 such rows in the train split"):
        build_datasets(DataArguments(data_files=[path], eval_fraction=0.0, block_size=32, strict=True), tokenizer)


def test_strict_names_the_file_line_not_the_shuffled_index(tmp_path, tokenizer):
    good = {"text": "### Human: q### Assistant: a"}
    first = write_jsonl(tmp_path / "first.jsonl", [good] * 30)
    # blank lines are not rows: the malformed row is the 8th row of second.jsonl but its line 10
    second = tmp_path / "second.jsonl"
    second.write_text("\n".join([json.dumps(good)] * 3 + ["", ""] + [json.dumps(good)] * 4
                               + [json.dumps({"text": "no markers"})] + [json.dumps(good)] * 20) + "\n")
    args = DataArguments(data_files=[first, str(second)], eval_fraction=0.2, split_seed=3, block_size=32, strict=True)
    with pytest.raises(MalformedRowError, match=r"second\.jsonl line 10: not a guanaco conversation: text before"):
        build_datasets(args, tokenizer)
    args.streaming, args.max_eval_samples = True, 2
    train, _, _ = build_datasets(args, tokenizer)
    with pytest.raises(MalformedRowError, match=r"second\.jsonl line 10: not a guanaco conversation"):
        list(train)


GOOD_LINE = json.dumps({"text": "### Human: q### Assistant: a"})


@pytest.mark.parametrize("name, content, message", ids=lambda value: value if isinstance(value, str) and
                         value.endswith((".json", ".jsonl")) else "", argvalues=[
    ("empty.jsonl", b"", r"empty\.jsonl: the file is empty \(no rows\)"),
    ("blank.jsonl", b"\n  \n", r"blank\.jsonl: the file is empty \(no rows\)"),
    ("broken.jsonl", (GOOD_LINE + "\n" + GOOD_LINE[:-1] + "\n" + GOOD_LINE + "\n").encode(),
     r"broken\.jsonl line 2: not valid JSON: Expecting ',' delimiter \(column 40\)"),
    ("latin1.jsonl", (GOOD_LINE + "\n").encode() + '{"text": "### Human: caf\u00e9### Assistant: a"}\n'.encode("latin-1"),
     r"latin1\.jsonl line 2: not UTF-8 text \(byte 0xe9 at column 25\); save the file as UTF-8"),
    ("list.jsonl", (GOOD_LINE + "\n[1, 2]\n").encode(),
     r"list\.jsonl line 2: a row must be a JSON object like \{\"text\": \.\.\.\}, got list"),
    ("broken.json", b'[{"text": "a"},\n {"text": }]', r"broken\.json line 2: not valid JSON: Expecting value \(column 11\)"),
    ("other.jsonl", (json.dumps({"prompt": "q", "answer": "a"}) + "\n").encode() * 3,
     r"other\.jsonl: no 'text' column \(columns: \['prompt', 'answer'\]\); name the column .* with --text_field"),
    ("one.jsonl", (GOOD_LINE + "\n").encode(),
     r"one\.jsonl: 1 row\(s\) are too few to hold out eval_fraction=0\.1 of them for evaluation; .*--eval_fraction 0"),
])
def test_unusable_data_files_are_named_with_the_line_and_the_problem(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=message):
        build_datasets(DataArguments(data_files=[str(path)], block_size=32), tokenizer)


# ----------------------------------------------------------------------------------------------- labels


def labelled_text(tokenizer, ids, labels):
    """The text of the labelled tokens, with '|' between maximal labelled runs."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return "|".join(tokenizer.decode(run) for run in runs)


MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo there"},
    {"role": "user", "content": "Q?"},
    {"role": "assistant", "content": "A."},
]


def test_assistant_mask_is_exactly_the_assistant_spans_guanaco(tokenizer):
    ids, labels = tokenize_messages(tokenizer, MESSAGES, GUANACO, assistant_only=True)
    assert tokenizer.decode(ids) == "### Human: Hi### Assistant: Yo there<|eos|>### Human: Q?### Assistant: A.<|eos|>"
    assert labelled_text(tokenizer, ids, labels) == " Yo there<|eos|>| A.<|eos|>"


def test_assistant_mask_with_a_template_without_generation_markers(tokenizer):
    ids, labels = tokenize_messages(tokenizer, MESSAGES, CHATML, assistant_only=True)
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_end|>\n<|eos|>")  # EOS appended after the template's own end of turn
    assert labelled_text(tokenizer, ids, labels) == "Yo there<|im_end|>\n|A.<|im_end|>\n<|eos|>"


def test_assistant_mask_matches_transformers_generation_mask_on_the_sample(tokenizer):
    texts = [json.loads(line)["text"] for line in open(reso_hf.training.data.bundled_sample_path(), encoding="utf-8")]
    for text in texts:
        messages = parse_guanaco(text)
        ids, labels = tokenize_messages(tokenizer, messages, GUANACO, assistant_only=True)
        reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
        assert ids == list(reference["input_ids"])
        assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in reference["assistant_masks"]]


def test_all_tokens_labelled_without_assistant_only(tokenizer):
    ids, labels = tokenize_messages(tokenizer, MESSAGES, GUANACO, assistant_only=False)
    assert labels == ids and ids[-1] == tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------- packing


def test_packing_blocks_positions_eos_and_boundaries(tokenizer):
    docs = [tokenize_messages(tokenizer, [{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a"}],
                              GUANACO, assistant_only=False) for n in (3, 30, 7)]
    lengths = [len(ids) for ids, _ in docs]
    block = 24
    packed = pack_documents(docs, block, pad_token_id=tokenizer.pad_token_id)
    flat_ids = sum(packed["input_ids"], [])
    assert all(len(row) == block for key in packed for row in packed[key])
    assert flat_ids[: sum(lengths)] == sum((ids for ids, _ in docs), [])  # nothing lost, order kept
    assert flat_ids.count(tokenizer.eos_token_id) == len(docs)  # EOS between (after) documents
    # every segment restarts its position ids and its first token is never a target
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        for t, position in enumerate(positions):
            if position == 0:
                assert labels[t] == IGNORE_INDEX
            else:
                assert positions[t - 1] == position - 1
    starts = [i for i, p in enumerate(sum(packed["position_ids"], [])) if p == 0]
    doc_starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert set(doc_starts) <= set(starts)
    # the tail of the last block is a padding segment with no targets
    assert packed["labels"][-1][-1] == IGNORE_INDEX and packed["input_ids"][-1][-1] == tokenizer.pad_token_id


def separate_and_packed_logits(model, documents, block_size):
    packed = pack_documents(documents, block_size, pad_token_id=0)
    assert len(packed["input_ids"]) == 1
    batch = {key: torch.tensor(value) for key, value in packed.items()}
    # transformers builds the block-diagonal mask from position ids only when there is no cache: the training
    # entry points set config.use_cache=False for exactly this reason (see test_training_runs)
    batch["use_cache"] = False
    with torch.no_grad():
        packed_out = model(**batch)
        offset, packed_logits, separate_logits, separate_loss_sum, count = 0, [], [], 0.0, 0
        for ids, labels in documents:
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            n = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
            separate_loss_sum += out.loss.item() * n
            count += n
            separate_logits.append(out.logits[0])
            packed_logits.append(packed_out.logits[0, offset: offset + len(ids)])
            offset += len(ids)
    return packed_out.loss.item(), separate_loss_sum / count, packed_logits, separate_logits


def packed_case_documents(vocab_size):
    generator = torch.Generator().manual_seed(0)
    documents = []
    for length in (9, 5, 14):
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist() + [2]
        documents.append((ids, list(ids)))
    return documents


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_reso():
    torch.manual_seed(0)
    config = reso_hf.ResoLLMConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   prime_code_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return reso_hf.ResoLLMForCausalLM(config).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_reso], ids=["llama", "reso_llm"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_batch_loss_equals_separate_document_loss(build, attn_implementation):
    model = build()
    model.config._attn_implementation = attn_implementation
    documents = packed_case_documents(model.config.vocab_size)
    block = sum(len(ids) for ids, _ in documents) + 4  # one block, with a padding segment at the end
    packed_loss, separate_loss, packed_logits, separate_logits = separate_and_packed_logits(model, documents, block)
    for packed, separate in zip(packed_logits, separate_logits):
        torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
    assert packed_loss == pytest.approx(separate_loss, abs=1e-5)


# ----------------------------------------------------------------------------------------------- loading


def test_streaming_gives_the_same_blocks_and_counts_malformed_rows(tmp_path, tokenizer):
    texts = [json.loads(line)["text"] for line in open(reso_hf.training.data.bundled_sample_path(), encoding="utf-8")]
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in texts[:20]] + [{"text": ""}])
    in_memory, _, _ = build_datasets(DataArguments(data_files=[path], eval_fraction=0.0, block_size=64), tokenizer)
    streamed, _, stats = build_datasets(
        DataArguments(data_files=[path], eval_fraction=0.0, block_size=64, streaming=True), tokenizer)
    rows = list(streamed)
    assert [r["input_ids"] for r in rows] == in_memory["input_ids"]
    assert [r["labels"] for r in rows] == in_memory["labels"]
    assert [r["position_ids"] for r in rows] == in_memory["position_ids"]
    assert stats.to_dict()["malformed_rows"]["train"] == 1


def test_bundled_sample_splits_into_train_and_eval(tokenizer):
    train, evaluation, stats = build_datasets(DataArguments(use_bundled_sample=True, block_size=128), tokenizer)
    assert stats.rows == {"train": 108, "eval": 13}
    assert len(train) > 0 and len(evaluation) > 0


def test_hub_unreachable_without_local_data_fails_at_once_saying_how_to_pass_files(tokenizer, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(DataSourceError, match=r"--data_files train\.jsonl"):  # offline mode (HF_HUB_OFFLINE=1)
        build_datasets(DataArguments(dataset_name="timdettmers/openassistant-guanaco"), tokenizer)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    with pytest.raises(DataSourceError, match=r"unreachable.*--data_files train\.jsonl"):
        build_datasets(DataArguments(dataset_name="timdettmers/openassistant-guanaco"), tokenizer)


def test_bad_data_files_are_named(tmp_path, tokenizer):
    (tmp_path / "rows.csv").write_text("text\n")
    with pytest.raises(ValueError, match=r"unsupported extension '\.csv'.*allowed"):
        build_datasets(DataArguments(data_files=[str(tmp_path / "rows.csv")]), tokenizer)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_datasets(DataArguments(data_files=[str(tmp_path / "missing.jsonl")]), tokenizer)
