"""bench.eval_cost's quick mode: the exact ranker agrees with the trie scorer (the bench stops
otherwise) and the JSON holds the measured counts."""

import json
from pathlib import Path

from bench.eval_cost import main


def test_eval_cost_quick_mode_writes_its_table(tmp_path: Path) -> None:
    target = tmp_path / "cost.json"
    argv = ["--model", "tiny-llama", "--texts", "2", "--whole-below", "48", "0", "48",
            "--note", "idle", "--json", str(target)]  # fmt: skip
    document = main(argv)
    saved = json.loads(target.read_text())
    base = saved["results"]["base"]
    assert saved["results"] == document["results"]
    assert base["texts"] == 2 and base["trie_nodes_per_text"] == 382
    assert base["ranker_prompt_tokens_per_text"] < base["prompt_tokens_per_text"]
    # One entry per cut-off (the repeat dropped); the top-level numbers are the first's.
    assert sorted(base["by_whole_below"]) == ["0", "48"]
    assert base["ranker_nodes_per_text"] == base["by_whole_below"]["48"]["ranker_nodes_per_text"]
    assert saved["note"] == "idle" and saved["whole_below"] == [48, 0]
    assert saved["command"] == "python -m bench.eval_cost " + " ".join(argv)
