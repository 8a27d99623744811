"""A deployed SuperNode starts a process per message: the ClientApp answers the model offer,
the run's release and the budget question without importing the model and data libraries,
and still loads them for training."""

import subprocess
import sys
from pathlib import Path

from tests.flower_runtime import REPO

HEAVY = ("torch", "transformers", "peft", "datasets")

# One fresh process, as a SuperNode's ClientApp process is: Flower's ClientApp object
# dispatches each message to the registered handler by its type.
SCRIPT = """
import sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import app
from federation.messages import OFFER_QUERY, OFFER_RECORD, PRESENT_KEY, RELEASE_QUERY

HEAVY = {heavy!r}
loaded = lambda: [m for m in HEAVY if m in sys.modules]
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, 11, 1
context = Context(
    run_id=5, node_id=11, node_config={{"partition-id": 0, "num-partitions": 1}},
    state=RecordDict(), run_config={{"cache-dir": {cache!r}}},
)
print("import", loaded())
release = Message(RecordDict(), dst_node_id=11, message_type=RELEASE_QUERY)
reply = app(release, context)
print("release", loaded(), reply.has_error())
digest = "ab" * 32
offer = RecordDict({{"config": ConfigRecord({{"model-digest": digest}})}})
reply = app(Message(offer, dst_node_id=11, message_type=OFFER_QUERY), context)
print("offer", loaded(), repr(reply.content[OFFER_RECORD][PRESENT_KEY]))
import client_app.round_handlers
print("train", loaded())
"""


def test_query_messages_load_no_model_library_and_training_loads_them(tmp_path: Path) -> None:
    code = SCRIPT.format(heavy=HEAVY, cache=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert lines["import"] == "[]"
    assert lines["release"] == "[] False"  # the store's marks need no torch
    # Checking a stored entry hashes its tensors (torch), but loads no model or data library.
    assert lines["offer"] == "['torch'] ''"
    assert lines["train"] == str(list(HEAVY))
    # The node's store exists and holds no entry for the digest it was offered.
    assert (tmp_path / "weights").is_dir() and not (tmp_path / "weights" / ("ab" * 32)).exists()
