"""Prepared volumes cached for follow-ups: same answers as fresh runs, never shared across volumes or settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from medpruner import InputError, PruningConfig
from medpruner.phantom import make_phantom_ct
from medpruner.pipeline import AskRequest, run_ask
from medpruner.prepared_cache import PreparedCache, volume_key


@pytest.fixture(scope="module")
def ct():
    return make_phantom_ct(shape=(12, 64, 64))


def _answer(report):
    return report["answer"], report["generated_token_ids"], report["slices"]["kept_voxel_indices"]


def test_follow_up_is_answered_from_the_cache_like_a_fresh_run(engine, ct, tmp_path):
    cache = PreparedCache(max_bytes=2**30)
    first = run_ask(engine, ct, AskRequest("Is there a liver lesion?", max_new_tokens=6), tmp_path / "a",
                    prepared_cache=cache)
    assert not first["prefix_reused"] and len(cache) == 1 and first["volume_id"] in cache
    follow = run_ask(engine, ct, AskRequest("Where is it?", max_new_tokens=6), tmp_path / "b", prepared_cache=cache)
    assert follow["prefix_reused"] and follow["volume_id"] == first["volume_id"]
    assert follow["timings_s"]["vision"] == 0.0 and first["timings_s"]["vision"] > 0
    fresh = run_ask(engine, ct, AskRequest("Where is it?", max_new_tokens=6), tmp_path / "c")
    assert _answer(follow) == _answer(fresh)
    # By id, without the volume: the same answer and the same heatmaps.
    by_id = run_ask(engine, None, AskRequest("Where is it?", max_new_tokens=6), tmp_path / "d",
                    prepared_cache=cache, volume_id=first["volume_id"])
    assert _answer(by_id) == _answer(fresh)
    for name in ("heatmap_kept.nrrd", "heatmap_attention.nrrd"):
        a = sitk.ReadImage(str(tmp_path / "c" / name))
        b = sitk.ReadImage(str(tmp_path / "d" / name))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()


def test_other_volumes_and_settings_never_share_an_entry(engine, ct, tmp_path):
    cache = PreparedCache(max_bytes=2**30)
    base = run_ask(engine, ct, AskRequest("Q?", max_new_tokens=2), tmp_path / "a", prepared_cache=cache)
    flipped = sitk.Flip(ct, [False, False, True])
    flipped.CopyInformation(ct)
    shifted = sitk.Image(ct)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    variants = [
        (flipped, AskRequest("Q?", max_new_tokens=2)),                                   # other voxels
        (shifted, AskRequest("Q?", max_new_tokens=2)),                                   # other geometry
        (ct, AskRequest("Q?", pruning=PruningConfig(tau=0.5), max_new_tokens=2)),        # other pruning
        (ct, AskRequest("Q?", window="lung", max_new_tokens=2)),                         # other preprocessing
    ]
    ids = {base["volume_id"]}
    for i, (image, request) in enumerate(variants):
        report = run_ask(engine, image, request, tmp_path / f"v{i}", prepared_cache=cache)
        assert not report["prefix_reused"]
        ids.add(report["volume_id"])
    assert len(ids) == 5 and len(cache) == 5


def test_volume_id_errors(engine, ct, tmp_path):
    cache = PreparedCache(max_bytes=2**30)
    report = run_ask(engine, ct, AskRequest("Q?", max_new_tokens=2), tmp_path / "a", prepared_cache=cache)
    with pytest.raises(InputError, match="No prepared volume") as unknown:
        run_ask(engine, None, AskRequest("Q?"), tmp_path / "b", prepared_cache=cache, volume_id="0" * 32)
    with pytest.raises(InputError, match="settings differ") as mismatch:
        run_ask(engine, None, AskRequest("Q?", pruning=PruningConfig(tau=0.3)), tmp_path / "c",
                prepared_cache=cache, volume_id=report["volume_id"])
    # the codes a client keys its fallback (send the volume again) on
    assert (unknown.value.code, mismatch.value.code) == ("unknown_volume", "settings_mismatch")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_least_recently_used_entries_go_first_within_the_budget():
    cache = PreparedCache(max_bytes=100)
    assert cache.put("a", "A", 40) and cache.put("b", "B", 40)
    assert cache.get("a") == "A"            # a is now the most recent
    assert cache.put("c", "C", 40)          # evicts b, the least recently used
    assert "b" not in cache and cache.get("a") == "A" and cache.get("c") == "C"
    assert not cache.put("huge", "H", 101) and "huge" not in cache
    assert cache.total_bytes <= 100
    cache.clear()
    assert len(cache) == 0


def test_memory_pressure_drops_the_oldest_entries_first(tmp_path):
    from medpruner.prepared_cache import _linux_available_fraction, free_memory_fraction

    cache = PreparedCache(max_bytes=1000)
    for key in "abcd":
        cache.put(key, key.upper(), 10)
    cache.get("a")                                   # order, oldest first: b c d a
    free = {"fraction": 0.02}

    def under_pressure():
        free["fraction"] += 0.03                     # each dropped entry frees some memory
        return free["fraction"] < 0.10
    assert cache.evict_while(under_pressure) == 2
    assert "b" not in cache and "c" not in cache and "d" in cache and "a" in cache
    assert cache.evict_while(lambda: False) == 0 and len(cache) == 2
    assert cache.evict_while(lambda: True) == 2 and len(cache) == 0    # stops when empty

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:    6000000 kB\n")
    assert _linux_available_fraction(meminfo) == 0.25
    meminfo.write_text("garbage\n")
    assert _linux_available_fraction(meminfo) is None
    fraction = free_memory_fraction("cpu")
    assert fraction is None or 0.0 < fraction <= 1.0
    assert free_memory_fraction("meta") is None


def test_volume_key_depends_on_every_input():
    voxels = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    geometry, settings = {"spacing": (1, 1, 1)}, {"tau": 0.9}
    secret = b"s" * 32

    def key_of(v, g=geometry, s=settings):
        return volume_key(v, g, s, secret=secret)

    key = key_of(voxels)
    assert key == key_of(voxels.copy())
    assert key != key_of(voxels.astype(np.int32))
    assert key != key_of(voxels.reshape(3, 2, 4))
    changed = voxels.copy()
    changed[1, 2, 3] += 1
    assert key != key_of(changed)
    assert key != key_of(voxels, {"spacing": (1, 1, 2)})
    assert key != key_of(voxels, geometry, {"tau": 0.8})
    json.dumps({"key": key})


def test_volume_ids_are_keyed_per_server():
    """An id reveals nothing about the voxels: another secret (another server, a restart) gives another id,
    and no unkeyed hash of the same bytes reproduces it."""
    import hashlib

    voxels = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    geometry, settings = {"spacing": (1, 1, 1)}, {"tau": 0.9}
    one, two = PreparedCache(2**20), PreparedCache(2**20)
    assert one.secret != two.secret and len(one.secret) >= 16
    first = one.key_for(voxels, geometry, settings)
    assert first == one.key_for(voxels.copy(), geometry, settings)
    assert first != two.key_for(voxels, geometry, settings)
    plain = hashlib.blake2b(digest_size=16)
    plain.update(f"{voxels.dtype.str}{voxels.shape}".encode())
    plain.update(voxels.tobytes())
    plain.update(json.dumps({"geometry": geometry, "settings": settings}, sort_keys=True, default=str).encode())
    assert first != plain.hexdigest()
    with pytest.raises(ValueError):
        volume_key(voxels, geometry, settings, secret=b"")
