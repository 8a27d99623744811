"""Preference pairs: HH-RLHF parsing, own files, clear errors, splitting and tokenizing."""

import copy
import gzip
import json
from pathlib import Path

import pytest

from task_data import (
    IGNORE_INDEX,
    DataError,
    collate_pairs,
    lazy_tokenized_pairs,
    load_hh_rlhf,
    load_preference_file,
    load_preferences,
    pair_batch_iterator,
    parse_hh_dialogue,
    partition_records,
    split_preferences,
    tokenize_pair,
)
from task_data.sources import default_data_dir

HH_FILE = default_data_dir() / "hh_rlhf" / "harmless-base-test.jsonl.gz"


def _raw_hh_rows() -> list[dict]:
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hh_rlhf_pairs_match_the_raw_dialogues() -> None:
    raw = _raw_hh_rows()
    pairs, skipped = load_hh_rlhf(HH_FILE)
    assert len(raw) == 2312
    assert dict(skipped) == {"empty answer": 4}  # four rows whose chosen answer is empty
    assert len(pairs) == 2308 == len(load_preferences("hh-rlhf"))
    for pair in pairs:
        roles = [m["role"] for m in pair["prompt"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        assert pair["chosen"].strip() and pair["chosen"] != pair["rejected"]
    # Row 1 is a clean dialogue: rebuilding it from the pair gives the raw text back.
    first, row = pairs[0], raw[0]
    speaker = {"user": "Human", "assistant": "Assistant"}
    history = "".join(f"\n\n{speaker[m['role']]}: {m['content']}" for m in first["prompt"])
    assert history + "\n\nAssistant: " + first["chosen"] == row["chosen"]
    assert history + "\n\nAssistant: " + first["rejected"] == row["rejected"]
    assert first["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert len(first["prompt"]) == 5
    # Every turn and answer is raw text, in order (merged turns piece by piece).
    rows = [r for r in raw if not r["chosen"].rstrip().endswith("Assistant:")]
    for pair, row in zip(pairs, rows, strict=True):
        for side in ("chosen", "rejected"):
            position = 0
            for text in [m["content"] for m in pair["prompt"]] + [pair[side]]:
                for piece in text.split("\n\n"):
                    position = row[side].index(piece, position) + len(piece)
            assert not row[side][position:].strip()


def test_repeated_assistant_markers_are_merged_into_one_turn() -> None:
    messages = parse_hh_dialogue(
        "  \n\nHuman:   hi there \n\n\n  Assistant: first part\nAssistant:  second part \n\n"
        "Human: ok\n\nAssistant:"
    )
    assert messages == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "first part\n\nsecond part"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("dialogue", "message"),
    [
        ("just some text", "no 'Human:' or 'Assistant:' turn"),
        ("Preamble\n\nHuman: hi\n\nAssistant: yo", "text before the first turn"),
        (
            "\n\nAssistant: hello\n\nHuman: hi\n\nAssistant: yo",
            "the dialogue must start with a 'Human:' turn",
        ),
        (
            "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: and?",
            "the dialogue must end with an 'Assistant:' turn",
        ),
    ],
)
def test_malformed_dialogues_name_file_line_and_field(
    tmp_path: Path, dialogue: str, message: str
) -> None:
    good = {
        "chosen": "\n\nHuman: hi\n\nAssistant: yes",
        "rejected": "\n\nHuman: hi\n\nAssistant: no",
    }
    path = _write_jsonl(tmp_path / "hh.jsonl", [good, {**good, "rejected": dialogue}])
    with pytest.raises(DataError, match=rf"hh.jsonl line 2 field 'rejected': {message}"):
        load_hh_rlhf(path)


def test_hh_rows_with_different_histories_are_skipped_not_fatal(tmp_path: Path) -> None:
    rows = [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: yes",
            "rejected": "\n\nHuman: hey\n\nAssistant: no",
        },
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: same",
            "rejected": "\n\nHuman: hi\n\nAssistant: same",
        },
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: good",
            "rejected": "\n\nHuman: hi\n\nAssistant: bad",
        },
    ]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pairs, skipped = load_hh_rlhf(path)
    assert pairs == [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "good", "rejected": "bad"}
    ]
    assert dict(skipped) == {"histories differ": 1, "identical answers": 1}
    _write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"chosen": rows[0]["chosen"]}])
    with pytest.raises(DataError, match=r"bad.jsonl line 2: missing field 'rejected'"):
        load_hh_rlhf(tmp_path / "bad.jsonl")


def test_own_json_and_jsonl_preference_files(tmp_path: Path) -> None:
    history = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Insult me."},
    ]
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": history, "chosen": "I'd rather not.", "rejected": "You fool."},
        {"prompt": "Say hi.", "chosen": "hi", "rejected": ""},
    ]
    listed = tmp_path / "prefs.json"
    listed.write_text(json.dumps(rows))
    lines = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    for path in (listed, lines):
        pairs, skipped = load_preference_file(path)
        assert dict(skipped) == {"empty answer": 1}
        assert pairs[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
        assert pairs[1]["prompt"] == history and pairs[1]["rejected"] == "You fool."
    assert load_preferences(str(lines))[1]["chosen"] == "I'd rather not."


def test_bad_preference_files_name_file_line_and_field(tmp_path: Path) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = tmp_path / "prefs.jsonl"
    cases = [
        ("{broken", r"prefs.jsonl line 2: invalid JSON"),
        (
            json.dumps({"prompt": "q", "chosen": "a"}),
            r"prefs.jsonl line 2: missing field 'rejected'",
        ),
        (
            json.dumps({"chosen": "a", "rejected": "b"}),
            r"prefs.jsonl line 2: missing field 'prompt'",
        ),
        (json.dumps({**good, "chosen": 3}), r"prefs.jsonl line 2: field 'chosen' must be a string"),
        (
            json.dumps(
                {**good, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant"}]}
            ),
            r"prefs.jsonl line 2 field 'prompt': message 1 needs a role",
        ),
        (
            json.dumps({**good, "prompt": [{"role": "assistant", "content": "q"}]}),
            r"prefs.jsonl line 2 field 'prompt': the last message must be a user turn",
        ),
    ]
    for line, message in cases:
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(DataError, match=message):
            load_preference_file(path)
    listed = tmp_path / "prefs.json"
    listed.write_text(json.dumps([good, {**good, "prompt": 7}]))
    with pytest.raises(DataError, match=r"prefs.json record 2 field 'prompt'"):
        load_preference_file(listed)
    with pytest.raises(ValueError, match="unknown preference data 'mnist'"):
        load_preferences("mnist")
    with pytest.raises(DataError, match="no such file"):
        load_preferences("hh-rlhf", data_dir=tmp_path)


def test_split_keeps_conversation_openings_together_and_is_deterministic() -> None:
    pairs = load_preferences("hh-rlhf")
    train, held_out = split_preferences(pairs, 0.1, seed=3)
    assert len(train) + len(held_out) == len(pairs)
    assert abs(len(held_out) - 0.1 * len(pairs)) < 20
    openings = {p["prompt"][0]["content"] for p in held_out}
    assert not openings & {p["prompt"][0]["content"] for p in train}
    assert (train, held_out) == split_preferences(pairs, 0.1, seed=3)
    assert held_out != split_preferences(pairs, 0.1, seed=4)[1]
    parts = [partition_records(train, 3, i, "iid", seed=1) for i in range(3)]
    assert sum(len(p) for p in parts) == len(train)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def _response(example: dict[str, list[int]]) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def test_tokenize_pair_masks_the_shared_prompt(smollm_tokenizer) -> None:
    pair = load_preferences("hh-rlhf")[0]
    example = tokenize_pair(smollm_tokenizer, pair, 1024)
    chosen, rejected = example["chosen"], example["rejected"]
    n_prompt = len(chosen["labels"]) - len(_response(chosen))
    assert chosen["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert chosen["input_ids"][:n_prompt] == rejected["input_ids"][:n_prompt]
    assert chosen["labels"][n_prompt:] == chosen["input_ids"][n_prompt:]
    eos = smollm_tokenizer.eos_token_id
    for side in ("chosen", "rejected"):
        tokens = _response(example[side])
        assert tokens[-1] == eos
        assert smollm_tokenizer.decode(tokens[:-1]) == pair[side]
    prompt_text = smollm_tokenizer.decode(chosen["input_ids"][:n_prompt])
    assert prompt_text.count("<|im_start|>user") == 3 and prompt_text.endswith("assistant\n")
    assert pair["prompt"][-1]["content"] in prompt_text


def test_tokenize_pair_truncation_and_plain_format(smollm_tokenizer) -> None:
    pair = {
        "prompt": [{"role": "user", "content": "word " * 400}],
        "chosen": "Yes.",
        "rejected": "No way.",
    }
    example = tokenize_pair(smollm_tokenizer, pair, 64)
    for side in ("chosen", "rejected"):
        assert len(example[side]["input_ids"]) <= 64
        decoded = smollm_tokenizer.decode(_response(example[side]), skip_special_tokens=True)
        assert decoded == pair[side]
    long = {**pair, "prompt": [{"role": "user", "content": "Count."}], "chosen": "one two " * 200}
    example = tokenize_pair(smollm_tokenizer, long, 64)
    assert (
        len(example["chosen"]["input_ids"]) == 64
        and example["chosen"]["labels"][-1] != IGNORE_INDEX
    )
    plain = copy.deepcopy(smollm_tokenizer)
    plain.chat_template = None
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    example = tokenize_pair(plain, {**pair, "prompt": history}, 256)
    prompt = example["chosen"]["input_ids"][: -len(_response(example["chosen"]))]
    assert plain.decode(prompt).endswith(
        "### Instruction:\nUser: Hi\n\nAssistant: Hello\n\nUser: Bye\n\n### Response:\n"
    )


def test_pair_batches_stack_chosen_then_rejected(smollm_tokenizer) -> None:
    pairs = load_preferences("hh-rlhf")[:5]
    examples = [tokenize_pair(smollm_tokenizer, p, 256) for p in pairs]
    batch = collate_pairs(examples[:3], pad_token_id=0)
    width = max(len(e[s]["input_ids"]) for e in examples[:3] for s in ("chosen", "rejected"))
    assert batch["input_ids"].shape == (6, width)
    for row, (index, side) in enumerate([(i, s) for s in ("chosen", "rejected") for i in range(3)]):
        n = len(examples[index][side]["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == examples[index][side]["input_ids"]
        assert not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    batches = pair_batch_iterator(examples, 2, seed=0, pad_token_id=0)
    assert all(next(batches)["input_ids"].shape[0] == 4 for _ in range(6))


def test_a_clients_pairs_are_tokenized_when_used_and_as_tokenize_pair_does(
    smollm_tokenizer,
) -> None:
    """A pair that cannot be tokenized (no rejected answer) fails only when reached, and the
    batches drawn are those drawn from the eagerly tokenized list."""
    pairs = load_preferences("hh-rlhf")[:5]
    broken = {"prompt": pairs[0]["prompt"], "chosen": "Yes."}
    lazy = lazy_tokenized_pairs(smollm_tokenizer, [*pairs, broken], 128)
    expected = [tokenize_pair(smollm_tokenizer, p, 128) for p in pairs]
    assert len(lazy) == 6 and lazy[3] == expected[3] and lazy[0:5] == expected
    with pytest.raises(KeyError, match="rejected"):
        lazy[5]
    drawn = pair_batch_iterator(lazy_tokenized_pairs(smollm_tokenizer, pairs, 128), 2, 0, 0)
    again = pair_batch_iterator(expected, 2, 0, 0)
    for _ in range(3):
        assert next(drawn)["input_ids"].tolist() == next(again)["input_ids"].tolist()
