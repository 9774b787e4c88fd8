"""The replica set's rules without a cluster: the job board, the publisher, routing ranks, the resource plan,
and that a server without --replicas never imports Ray."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medpruner.errors import InputError
from medpruner.server.cluster_board import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobBoard
from medpruner.server.cluster_front import plan_replicas
from medpruner.server.cluster_replica import BoardPublisher


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def board_with(replicas: int = 2, max_queue: int = 3, keep_jobs: int = 50, keep_seconds: float = 60.0):
    clock = Clock()
    board = JobBoard(max_queue, keep_jobs, keep_seconds, clock=clock)
    for index in range(replicas):
        board.register(f"r{index}", {"model_id": "m", "model_family": "qwen3_vl", "demo_model": True,
                                     "device": "cpu", "dtype": "float32"})
    return board, clock


def test_admission_is_one_running_per_replica_plus_the_waiting_limit():
    board, _ = board_with(replicas=2, max_queue=3)
    assert [board.reserve() for _ in range(6)] == [True] * 5 + [False]
    board.release()                                   # a refused upload gives its place back
    assert board.reserve() and not board.reserve()
    for index in range(5):
        board.create(f"j{index}", None)
    assert board.reserved == 0 and not board.reserve()
    board.finish("j0", DONE)                          # a finished job frees its place
    assert board.reserve()


def test_a_lost_replica_shrinks_the_capacity_and_forgets_its_volumes():
    board, _ = board_with(replicas=2, max_queue=1)
    board.create("a", None)
    board.accepted("a", "r0")
    board.started("a", "r0")
    board.finish("a", DONE, answer="yes", volume_id="v" * 32)
    assert board.volume_owner("v" * 32) == "r0"
    board.replica_lost("r0")
    assert board.volume_owner("v" * 32) is None and board.capacity() == 2
    assert board.status("a")["state"] == DONE         # finished answers stay


def test_the_first_outcome_wins_and_late_updates_are_ignored():
    board, _ = board_with()
    board.create("a", None)
    board.accepted("a", "r1")
    assert board.started("a", "r1")
    board.update("a", stage="answer", progress=0.5, answer="Th")
    board.finish("a", FAILED, {"code": "replica_lost", "message": "m", "hint": "h"})
    board.update("a", answer="The liver")             # arrives after the outcome
    board.finish("a", DONE, answer="other")
    status = board.status("a")
    assert status["state"] == FAILED and status["answer_so_far"] == "Th" and status["replica"] == "r1"
    assert status["error"]["code"] == "replica_lost"


def test_an_answer_never_shrinks_and_a_done_job_keeps_the_full_answer():
    board, _ = board_with()
    board.create("a", None)
    board.started("a", "r0")
    board.update("a", answer="The liv")
    board.update("a", answer="The")                   # an older update overtaken on the way
    assert board.status("a")["answer_so_far"] == "The liv"
    board.finish("a", DONE, answer="The liver is normal.")
    assert board.status("a")["answer_so_far"] == "The liver is normal." and board.status("a")["progress"] == 1.0


def test_cancel_before_a_replica_begins_is_final_and_the_replica_then_skips_it():
    board, _ = board_with()
    board.create("a", None)
    board.accepted("a", "r0")
    assert board.cancel("a")["state"] == CANCELLED
    assert board.started("a", "r0") is False
    board.create("b", None)
    board.started("b", "r1")
    assert board.cancel("b")["state"] == RUNNING      # its replica stops it at its next stage or token
    assert board.cancel("missing") is None


def test_position_counts_the_waiting_jobs_ahead_in_the_same_line():
    board, _ = board_with(replicas=2, max_queue=8)
    for name in "abcdef":
        board.create(name, None)
    board.started("a", "r0")
    for name, replica in (("b", "r0"), ("c", "r1"), ("d", "r0")):
        board.accepted(name, replica)
    positions = {name: board.status(name)["position"] for name in "abcdef"}
    assert positions == {"a": 0, "b": 1, "c": 1, "d": 2, "e": 1, "f": 2}
    health = board.health()
    assert health["queue_length"] == 5
    assert {r["id"]: (r["queue_length"], r["running"]) for r in health["replicas"]} == {"r0": (2, 1), "r1": (1, 0)}


def test_finished_jobs_expire_by_age_then_by_count():
    board, clock = board_with(max_queue=10, keep_jobs=2, keep_seconds=60)
    for index in range(4):
        board.create(f"j{index}", None)
        clock.now += 1
        board.finish(f"j{index}", DONE)
    assert sorted(board.jobs) == ["j2", "j3"]
    clock.now += 61
    assert sorted(board.expire()) == ["j2", "j3"] and board.jobs == {}


def test_stopping_refuses_new_jobs():
    board, _ = board_with()
    board.create("a", None)
    assert board.stop() == ["a"]
    assert board.reserve() is False and board.create("b", None) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reserve", "release", "create", "start", "finish", "lose"]),
                          st.integers(0, 9)), max_size=60),
       st.integers(1, 3), st.integers(0, 4))
def test_admitted_jobs_never_exceed_the_capacity(operations, replicas, max_queue):
    """Whatever the order of events, outstanding + reserved never passes one per live replica + max_queue at
    the moment of admission, and the reservation count never goes negative."""
    board, _ = board_with(replicas=replicas, max_queue=max_queue)
    made = 0
    for operation, index in operations:
        if operation == "reserve":
            before = board.outstanding() + board.reserved
            if board.reserve():
                assert before < board.capacity()
        elif operation == "release" and board.reserved:
            board.release()
        elif operation == "create" and board.reserved:
            board.create(f"j{made}", None)
            made += 1
        elif operation == "start" and made:
            board.started(f"j{index % made}", f"r{index % replicas}")
        elif operation == "finish" and made:
            board.finish(f"j{index % made}", DONE)
        elif operation == "lose":
            board.replica_lost(f"r{index % replicas}")
        assert board.reserved >= 0
        assert all(job.state in (QUEUED, RUNNING, DONE) for job in board.jobs.values())


def test_the_publisher_sends_each_new_stage_at_once_and_the_rest_at_most_every_interval():
    clock = Clock()
    sent = []
    publisher = BoardPublisher(lambda **fields: sent.append(fields), interval=0.05, clock=clock)
    publisher.progress("load", 0.0)
    publisher.progress("load", 0.01)                  # same stage, too soon: held
    publisher.progress("vision", 0.2)                 # new stage: at once
    for token in range(10):
        clock.now += 0.01
        publisher.text("x", "x" * (token + 1))
    assert sent[0] == {"stage": "load", "progress": 0.0}
    assert sent[1] == {"stage": "vision", "progress": 0.2}
    answers = [fields["answer"] for fields in sent if "answer" in fields]
    assert 1 <= len(answers) <= 3 and answers == sorted(answers, key=len)
    assert all("stage" in fields for fields in sent)  # progress travels with the answer


def replica(unique_id: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def test_routing_ranks_target_the_holder_else_rotate_all_replicas():
    pytest.importorskip("ray.serve")
    from medpruner.server.cluster_router import chosen_replicas

    candidates = [replica("b"), replica("a"), replica("c")]
    assert [[r.replica_id.unique_id for r in rank] for rank in chosen_replicas(candidates, "c", 0)] == [["c"]]
    firsts = [chosen_replicas(candidates, None, turn)[0][0].replica_id.unique_id for turn in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]   # idle replicas take turns
    gone = chosen_replicas(candidates, "zz", 1)        # the holder is gone: any replica, which answers 404
    assert sorted(r.replica_id.unique_id for r in gone[0]) == ["a", "b", "c"]


def test_the_resource_plan_says_what_the_cluster_lacks():
    assert plan_replicas(2, "auto", None, 4, 32, False).gpus_per_replica == 1
    assert plan_replicas(2, "auto", None, 0, 2, True).device == "cpu"
    assert plan_replicas(4, "cuda", 0.5, 2, 8, False).gpus_per_replica == 0.5
    with pytest.raises(InputError, match="need 4 GPUs; the Ray cluster has 2"):
        plan_replicas(4, "auto", 1, 2, 32, False)
    with pytest.raises(InputError, match="cuda:1 cannot be used"):
        plan_replicas(2, "cuda:1", None, 2, 8, False)
    with pytest.raises(InputError, match="1/k"):
        plan_replicas(2, "cuda", 0.3, 2, 8, False)
    with pytest.raises(InputError, match="--device cpu"):
        plan_replicas(2, "cpu", 1, 2, 8, False)
    with pytest.raises(InputError, match="need 3 CPUs"):
        plan_replicas(3, "cpu", None, 0, 2, False)


@pytest.mark.parametrize("arguments, message", [
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--ray-address", "10.0.0.1:6379"], "only apply to a replica set"),
    (["--gpus-per-replica", "1"], "only apply to a replica set"),
])
def test_serve_refuses_bad_replica_options_before_anything_starts(arguments, message):
    run = subprocess.run([sys.executable, "-m", "medpruner", "serve", "--model", "tiny", "--port", "0", *arguments],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr


def test_a_server_without_replicas_never_imports_ray(tiny_qwen3_vl, tmp_path):
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from medpruner.engine import MedPruner\n"
        "from medpruner.server.app import ServerSettings, create_app\n"
        "from medpruner.server.jobs import JobManager\n"
        f"engine = MedPruner.from_pretrained({str(tiny_qwen3_vl)!r}, device='cpu')\n"
        f"manager = JobManager(engine, Path({str(tmp_path)!r}), 2, 2, 60)\n"
        f"create_app(manager, ServerSettings(token=None, max_upload_bytes=1 << 20, upload_root=Path({str(tmp_path)!r})))\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
