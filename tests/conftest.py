"""Shared fixtures: one tiny real-class checkpoint per test session, loaded through from_pretrained."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory):
    """Path of a tiny Qwen3-VL checkpoint saved in the layout of a real one."""
    from medpruner.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-vl", family="qwen3_vl")


@pytest.fixture(scope="session")
def engine(tiny_qwen3_vl):
    from medpruner import MedPruner

    return MedPruner.from_pretrained(tiny_qwen3_vl, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def redundant_slices():
    """8 slices of 224x224 with exact repeats (the slice filter must drop them) and distinct ones."""
    rng = np.random.default_rng(7)
    distinct = rng.integers(0, 256, size=(5, 224, 224, 3), dtype=np.uint8)
    order = [0, 0, 1, 2, 2, 2, 3, 4]
    return distinct[order]


@pytest.fixture(scope="session")
def real_server(tiny_qwen3_vl, tmp_path_factory):
    """URL of one real `medpruner serve` process (tiny model, CPU, token SERVER_TOKEN) for the Slicer tests."""
    pytest.importorskip("slicer", reason="slicer-core runs the Slicer scene tests")
    from slicer_helpers import running_server

    with running_server(tiny_qwen3_vl, tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.fixture(scope="module")
def stub(engine):
    """The issue-5 API over the real pipeline in a thread (tests/slicer_helpers.StubServer), per test module."""
    from slicer_helpers import StubServer

    server = StubServer(engine)
    yield server
    server.close()
