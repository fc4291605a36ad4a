"""Feature cache: storage round trip, keys, and training with cached frozen experts.

Cached and uncached training give the same losses; a warm cache runs no expert at all; an
expert changed by an earlier stage (Eagle pre-alignment) gets a new key; experts the fusion
drives itself are never served from the cache. Maps are stored as one memory-mapped shard file
per expert and flush; the ``auto`` policy keeps the cache only where reading a map is cheaper
than computing it, and a later cache follows the recorded decision.
"""

from __future__ import annotations

import logging
import time
import types

import pytest
import torch
from accelerate.utils import set_seed
from torch import nn

from experts import FeatureMap, create_expert
from moe_vision.data.benchmark import BenchmarkPaths, BenchmarkSizes, generate_benchmark
from moe_vision.experiment.run_config import DatasetCache, RunConfig
from moe_vision.features.cache import FeatureCache, FeatureCacheError
from moe_vision.features.cache_keys import expert_cache_key, weights_fingerprint
from moe_vision.features.precompute import precompute_maps
from moe_vision.features.shards import stack_maps
from moe_vision.model.config import ModelConfig
from moe_vision.model.mllm import MoEVisionModel
from moe_vision.training.options import TrainOptions, make_accelerator
from moe_vision.training.recipe_stages import Recipe, Stage
from moe_vision.training.trainer import Trainer
from moe_vision.training.units import StepEvent


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> BenchmarkPaths:
    sizes = BenchmarkSizes(align=24, instruct=24, val=4, test=12)
    return generate_benchmark(tmp_path_factory.getbasetemp() / "tiny-bench", seed=0, sizes=sizes)


def test_put_get_round_trip_is_exact_and_atomic(tmp_path) -> None:
    cache = FeatureCache(tmp_path, policy="always")
    feats = torch.randn(2, 5, 3, 4)
    mask = torch.rand(2, 3, 4) > 0.3
    cache.put("k" * 32, "ab12", FeatureMap(feats, 14, "pix2struct-tiny", mask), index=1)
    got = cache.get("k" * 32, "ab12")
    assert torch.equal(got.features, feats[1:2]) and torch.equal(got.mask, mask[1:2])
    assert (got.stride, got.source) == (14, "pix2struct-tiny")
    assert cache.get("k" * 32, "cd34") is None
    (shard,) = cache.flush()  # one file for the expert's maps, read back memory-mapped
    again = FeatureCache(tmp_path).get("k" * 32, "ab12")
    assert torch.equal(again.features, feats[1:2]) and torch.equal(again.mask, mask[1:2])
    assert (again.stride, again.source) == (14, "pix2struct-tiny")
    assert again.features.untyped_storage().nbytes() == shard.stat().st_size  # a view of the map
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="invalid image key"):
        cache.get("k" * 32, "../escape")


def test_one_shard_holds_every_map_and_ragged_rows_keep_their_grid(tmp_path) -> None:
    cache = FeatureCache(tmp_path, policy="always")
    maps = {f"img{i}": torch.randn(1, 3, 2 + i, 4) for i in range(3)}  # grids 2x4, 3x4, 4x4
    for key, feats in maps.items():
        cache.put("e" * 32, key, FeatureMap(feats, 16, "convnext-tiny"))
    files = cache.flush()
    assert len(files) == 1 and files[0].parent.name == "e" * 32
    warm = FeatureCache(tmp_path)
    for key, feats in maps.items():
        got = warm.get("e" * 32, key)
        assert got.grid == feats.shape[-2:] and torch.equal(got.features, feats)
    stacked = stack_maps([warm.get("e" * 32, k) for k in maps])
    assert stacked.features.shape == (3, 3, 4, 4) and stacked.mask[0, 2:].sum() == 0


def test_stack_pads_ragged_grids_with_a_mask() -> None:
    a = FeatureMap(torch.ones(1, 2, 2, 3), 8, "x")
    b = FeatureMap(torch.ones(1, 2, 3, 2), 8, "x")
    out = stack_maps([a, b])
    assert out.features.shape == (2, 2, 3, 3)
    assert out.mask[0].tolist() == [[True] * 3, [True] * 3, [False] * 3]
    assert out.mask[1].tolist() == [[True, True, False]] * 3
    assert out.features[0, :, 2].abs().sum() == 0
    same = stack_maps([a, a])
    assert same.mask is None and torch.equal(same.features, torch.ones(2, 2, 2, 3))


def test_key_follows_spec_and_weights() -> None:
    torch.manual_seed(0)
    e1 = create_expert("clip-tiny")
    torch.manual_seed(0)
    e2 = create_expert("clip-tiny")
    assert expert_cache_key(e1) == expert_cache_key(e2)
    torch.manual_seed(0)
    e3 = create_expert("clip-tiny", input_size=(96, 96))  # other preprocessing -> other key
    assert expert_cache_key(e3) != expert_cache_key(e1)
    before = weights_fingerprint(e2)
    with torch.no_grad():
        next(e2.parameters()).add_(1e-6)  # an earlier stage trained it
    assert weights_fingerprint(e2) != before
    assert expert_cache_key(e2) != expert_cache_key(e1)


def test_key_follows_the_weights_not_the_checkpoint_location(tmp_path) -> None:
    """The same shipped weights in another checkout share their maps."""
    import shutil

    from experts.families.mini import mini_checkpoint

    shipped = mini_checkpoint("clip-mini")
    moved = tmp_path / "elsewhere" / "clip-mini.safetensors"
    moved.parent.mkdir()
    shutil.copy(shipped, moved)
    here = create_expert("clip-mini", pretrained=True)
    there = create_expert("clip-mini", checkpoint=str(moved))
    assert here.spec.checkpoint != there.spec.checkpoint
    assert expert_cache_key(here) == expert_cache_key(there)
    torch.manual_seed(0)
    assert expert_cache_key(create_expert("clip-mini")) != expert_cache_key(here)  # random init


def test_maps_computes_only_misses(tmp_path) -> None:
    torch.manual_seed(0)
    expert = create_expert("clip-tiny").eval()
    images = expert.preprocess([torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8)] * 3)
    cache = FeatureCache(tmp_path, policy="always")
    key = expert_cache_key(expert)
    with torch.no_grad():
        ref = expert(images).features
    cache.maps(expert, key, {k: v[:1] for k, v in images.items()}, ["i0"])
    calls = []
    expert.register_forward_pre_hook(lambda m, args: calls.append(args[0]["pixel_values"].shape[0]))
    got = cache.maps(expert, key, images, ["i0", "i1", "i2"])
    assert calls == [2]  # only the two misses ran
    assert (cache.hits, cache.misses) == (1, 3)
    torch.testing.assert_close(got.features, ref, rtol=1e-5, atol=1e-6)


def _train(bench, out, cache, hooks=(), seed=0):
    set_seed(seed)
    model = MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny", "convnext-tiny"]))
    recipe = Recipe("c", [Stage("connector", "align", ["projector.*"], batch_size=8, epochs=2)])
    opts = TrainOptions(progress_bar=False, log_with=[], use_feature_cache=cache is not None)
    splits = {n: bench.split(n) for n in ("align", "instruct")}
    trainer = Trainer(
        model,
        recipe,
        DatasetCache(RunConfig(), splits, bench.images),
        out,
        make_accelerator(opts, out / "logs"),
        opts,
        cache=cache,
        hooks=hooks,
    )
    return trainer.fit(), model


def test_cached_and_uncached_training_give_the_same_loss(bench, tmp_path) -> None:
    plain: list[StepEvent] = []
    _train(bench, tmp_path / "plain", None, hooks=(plain.append,))
    cache = FeatureCache(tmp_path / "features", policy="always")
    cached: list[StepEvent] = []
    reports, _ = _train(bench, tmp_path / "cached", cache, hooks=(cached.append,))
    assert reports[0].cached_experts == [0, 1]
    # the maps are stored before training (24 images x 2 experts); both epochs read them back
    assert (cache.misses, cache.hits) == (48, 96)
    assert len(plain) == len(cached) == 6
    for a, b in zip(plain, cached):
        assert a.loss == pytest.approx(b.loss, rel=1e-6, abs=1e-7)


def test_warm_cache_runs_no_expert(bench, tmp_path, monkeypatch) -> None:
    cache = FeatureCache(tmp_path / "features", policy="always")
    first: list[StepEvent] = []
    _train(bench, tmp_path / "a", cache, hooks=(first.append,))

    def no_expert(self, *args, **kwargs):
        raise AssertionError(f"expert {self.spec.name} ran although its maps are cached")

    from experts.base import Expert

    monkeypatch.setattr(Expert, "forward", no_expert)
    warm = FeatureCache(tmp_path / "features", policy="always")
    second: list[StepEvent] = []
    _train(bench, tmp_path / "b", warm, hooks=(second.append,))
    assert warm.misses == 0 and warm.hits == 96
    assert [e.loss for e in first] == [e.loss for e in second]


def test_experts_the_fusion_drives_are_never_cached(bench, tmp_path) -> None:
    set_seed(0)
    model = MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny", "convnext-tiny"]))
    opts = TrainOptions(progress_bar=False, log_with=[])
    trainer = Trainer(
        model,
        Recipe("c", [Stage("s", "align", ["projector.*"])]),
        DatasetCache(RunConfig(), {}, bench.images),
        tmp_path,
        make_accelerator(opts, tmp_path / "logs"),
        opts,
        cache=FeatureCache(tmp_path / "f"),
    )
    for p in model.parameters():
        p.requires_grad_(False)
    model.fusion.staged_experts = lambda: {0}
    assert trainer._cached_experts(model) == [1]
    for p in model.experts[1].parameters():
        p.requires_grad_(True)
    assert trainer._cached_experts(model) == []  # a trained expert is never cached


class _TimedExpert(nn.Module):
    """A stand-in frozen expert whose forward takes ``delay`` seconds (timing-controlled)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.calls: list[int] = []
        self.spec = types.SimpleNamespace(name="timed-expert")

    def forward(self, inputs: dict[str, torch.Tensor]) -> FeatureMap:
        self.calls.append(inputs["pixel_values"].shape[0])
        time.sleep(self.delay)
        return FeatureMap(inputs["pixel_values"][:, :2] * 2, 4, "timed-expert")


def _policy_run(tmp_path, expert_s: float, read_s: float, monkeypatch):
    """Three batches through an ``auto`` cache: two of misses (the expert runs; the first is its
    warm-up), then one of hits (read back, ``read_s`` per image). The tests use 0.5 s: a margin
    that scheduling delays on a loaded machine do not reach."""
    expert = _TimedExpert(expert_s)
    images = {"pixel_values": torch.randn(2, 3, 4, 4)}
    get = FeatureCache.get

    def slow_get(self, *args, **kwargs):
        time.sleep(read_s)
        return get(self, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "get", slow_get)
    cache = FeatureCache(tmp_path)
    key = "f" * 32
    cache.maps(expert, key, images, ["c", "d"])
    ref = cache.maps(expert, key, images, ["a", "b"])
    again = cache.maps(expert, key, images, ["a", "b"])
    torch.testing.assert_close(again.features, ref.features)
    return cache, expert, key, images, expert.calls


def test_auto_policy_keeps_a_cache_that_reads_faster_than_it_computes(tmp_path, monkeypatch):
    cache, expert, key, images, calls = _policy_run(tmp_path, 0.5, 0.0, monkeypatch)
    assert calls == [2, 2] and cache.use_cache(expert, key) is True
    cache.maps(expert, key, images, ["a", "b"])
    assert calls == [2, 2] and cache.hits == 4 and cache.bypassed == 0


def test_auto_policy_drops_a_cache_that_costs_more_than_it_saves(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="moe_vision.features.cache"):
        cache, expert, key, images, calls = _policy_run(tmp_path, 0.0, 0.5, monkeypatch)
    assert cache.use_cache(expert, key) is False
    said = [r.getMessage() for r in caplog.records if "feature cache OFF" in r.getMessage()]
    assert len(said) == 1 and "timed-expert" in said[0]
    cache.maps(expert, key, images, ["a", "b"])  # bypassed: the expert runs, nothing is read
    assert calls == [2, 2, 2] and cache.bypassed == 2
    later = FeatureCache(tmp_path)  # a later run follows the recorded decision unmeasured
    assert later.use_cache(expert, key) is False
    assert FeatureCache(tmp_path, policy="always").use_cache(expert, key) is True
    with pytest.raises(ValueError, match="policy"):
        FeatureCache(tmp_path, policy="sometimes")


def test_images_served_from_the_cache_are_not_decoded(bench, tmp_path, monkeypatch) -> None:
    cache = FeatureCache(tmp_path / "features", policy="always")
    _train(bench, tmp_path / "a", cache)  # stores every map

    from moe_vision.data.validation import RecordValidator

    opened: list[str] = []
    real_open = RecordValidator.open
    monkeypatch.setattr(
        RecordValidator, "open", lambda self, p: opened.append(p) or real_open(self, p)
    )
    _train(bench, tmp_path / "b", FeatureCache(tmp_path / "features", policy="always"))
    assert opened == []  # 2 epochs x 24 records, no image decoded

    cold: list[str] = []
    monkeypatch.setattr(
        RecordValidator, "open", lambda self, p: cold.append(p) or real_open(self, p)
    )
    _train(bench, tmp_path / "c", FeatureCache(tmp_path / "cold", policy="always"))
    assert len(cold) == 24  # decoded once, by the walk that stores the maps


def test_an_image_without_a_stored_map_gets_its_inputs(bench, tmp_path) -> None:
    """A dataset told that only some images are stored gives inputs for the others only, and
    the cache computes exactly those: the batch's maps equal the expert's own forward."""
    torch.manual_seed(0)
    model = MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny"])).eval()
    expert = model.experts[0]
    ds = DatasetCache(RunConfig(), {"align": bench.split("align")}, bench.images)("align", model)
    items = [ds[i] for i in range(6)]
    keys = [k for it in items for k in it["image_keys"]]
    cache = FeatureCache(tmp_path, policy="always")
    key = expert_cache_key(expert)
    full = ds.collate(items)
    with torch.no_grad():
        ref = expert(full["images"][0]).features
    some = {k: v[[0, 2]] for k, v in full["images"][0].items()}
    assert cache.store(expert, key, some, [keys[0], keys[2]]) == 2
    ds.cached_keys = {0: cache.known_keys(key)}
    batch = ds.collate([ds[i] for i in range(6)])
    assert batch["input_rows"] == [[1, 3, 4, 5]]
    assert batch["images"][0]["pixel_values"].shape[0] == 4
    got = cache.maps(expert, key, batch["images"][0], keys, rows=batch["input_rows"][0])
    assert (cache.misses, cache.hits) == (6, 2)  # 2 stored first, 4 computed now
    torch.testing.assert_close(got.features, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(FeatureCacheError, match="no inputs"):
        cache.maps(expert, "another-key", {}, keys, rows=[])


def test_an_expert_not_worth_caching_keeps_its_inputs(bench, tmp_path) -> None:
    cache = FeatureCache(tmp_path / "features")  # policy auto
    set_seed(0)
    model = MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny", "convnext-tiny"]))
    key = expert_cache_key(model.experts[1])
    decision = cache.decision_path(key, "cpu")
    decision.parent.mkdir(parents=True)
    decision.write_text('{"use_cache": false, "compute_ms": 0.1, "read_ms": 1.0}')
    ds = DatasetCache(RunConfig(), {"align": bench.split("align")}, bench.images)("align", model)
    experts = {i: (e.eval(), expert_cache_key(e)) for i, e in enumerate(model.experts)}
    served = precompute_maps(cache, ds, experts, "cpu")
    assert sorted(served) == [0]
    assert len(served[0]) == 24
    batch = ds.collate([ds[i] for i in range(4)])
    assert batch["images"][0] == {} and batch["input_rows"][0] == []
    assert batch["input_rows"][1] is None and batch["images"][1]["pixel_values"].shape[0] == 4


@pytest.mark.parametrize(
    "names", [["clip-tiny", "convnext-tiny"], ["clip-tiny", "pix2struct-tiny"]]
)
def test_flops_per_sample_never_runs_the_cached_experts(bench, names, monkeypatch) -> None:
    """The FLOP metric counts the experts on meta-device twins: the same count as running the
    whole model for real (attention through the math backend, which the counter can count),
    and no expert computes anything."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from experts.base import Expert
    from moe_vision.experiment.run_metrics import flops_per_sample

    set_seed(0)
    model = MoEVisionModel.from_config(ModelConfig(experts=names)).eval()
    ds = DatasetCache(RunConfig(), {"align": bench.split("align")}, bench.images)("align", model)
    batch = ds.collate([ds[i] for i in range(2)])
    math = sdpa_kernel(SDPBackend.MATH)
    with torch.no_grad(), math, FlopCounterMode(display=False) as counter:
        model(batch["input_ids"], batch["attention_mask"], images=batch["images"])
    real = counter.get_total_flops() / 2
    assert counter.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0) > 0  # attention

    forward = Expert.__call__

    def meta_only(self, inputs, *args, **kwargs):
        assert all(v.is_meta for v in inputs.values()), f"{self.spec.name} ran for real"
        return forward(self, inputs, *args, **kwargs)

    monkeypatch.setattr(Expert, "__call__", meta_only)
    assert flops_per_sample(model, ds, n=2) == pytest.approx(real, rel=1e-9)


def _shared_images_data(bench, tmp_path, n: int = 120, bad: str | None = None):
    """``n`` records over 4 image files with 3 distinct contents (b.png is a copy of a.png);
    ``bad``: one more record naming that image file."""
    import json
    import shutil

    root = tmp_path / "images"
    root.mkdir()
    sources = sorted(bench.images.glob("*.png"))[:3]
    for name, src in zip(("a.png", "c.png", "d.png"), sources):
        shutil.copy(src, root / name)
    shutil.copy(root / "a.png", root / "b.png")
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    names = ["a.png", "b.png", "c.png", "d.png"]
    records = [{"id": f"r{i}", "image": names[i % 4], "conversations": conv} for i in range(n)]
    if bad is not None:
        records.insert(n // 2, {"id": "bad", "image": bad, "conversations": conv})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "d.jsonl", root


def test_precompute_decodes_each_distinct_image_once_and_skips_a_cached_stage(
    bench, tmp_path, monkeypatch
) -> None:
    """Issue 27 item 5: 120 records over 4 files of 3 contents decode 3 images (not 120), and
    a later stage whose maps are all stored neither reads a record nor decodes an image."""
    from moe_vision.data.index import RecordIndex
    from moe_vision.data.llava import LlavaDataset
    from moe_vision.data.validation import RecordValidator

    path, root = _shared_images_data(bench, tmp_path)
    set_seed(0)
    model = MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny", "convnext-tiny"])).eval()
    ds = LlavaDataset.for_model(path, root, model)
    experts = {i: (e, expert_cache_key(e)) for i, e in enumerate(model.experts)}
    opened: list = []
    reads: list[int] = []
    real_open, real_read = RecordValidator.open, RecordIndex.read
    monkeypatch.setattr(RecordValidator, "open", lambda s, p: opened.append(p) or real_open(s, p))
    monkeypatch.setattr(RecordIndex, "read", lambda s, i: reads.append(i) or real_read(s, i))
    cache = FeatureCache(tmp_path / "features", policy="always")
    served = precompute_maps(cache, ds, experts, "cpu")
    assert len(opened) == 3 and cache.misses == 6  # 3 contents x 2 experts
    assert sorted(served) == [0, 1] and all(len(keys) == 3 for keys in served.values())
    assert len(reads) == 120  # one scan of the records for their image paths
    opened.clear(), reads.clear()
    again = precompute_maps(
        FeatureCache(tmp_path / "features", policy="always"), ds, experts, "cpu"
    )
    assert again == served and ds.cached_keys == served
    assert opened == [] and reads == []  # the next stage on the same data: no walk at all
    item = ds[5]  # training items of served images carry no inputs
    assert item["expert_inputs"] == [None, None] and opened == []
    fresh = LlavaDataset.for_model(path, root, model)  # a later run: a scan, no decoding
    precompute_maps(FeatureCache(tmp_path / "features", policy="always"), fresh, experts, "cpu")
    assert opened == [] and len(reads) == 121  # ds[5] read one record


@pytest.mark.timeout(120)  # a FIFO read hung the old walk
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_precompute_names_the_record_of_an_image_it_cannot_use(bench, tmp_path, policy) -> None:
    import os

    from moe_vision.data.llava import LlavaDataset
    from moe_vision.data.records import DataError

    path, root = _shared_images_data(bench, tmp_path, n=8, bad="pipe.png")
    os.mkfifo(root / "pipe.png")
    model = MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny"])).eval()
    ds = LlavaDataset.for_model(path, root, model, on_bad_record=policy)
    experts = {0: (model.experts[0], expert_cache_key(model.experts[0]))}
    cache = FeatureCache(tmp_path / "features", policy="always")
    if policy == "error":
        with pytest.raises(DataError, match="id 'bad'.*pipe.png is not a regular file"):
            precompute_maps(cache, ds, experts, "cpu")
    else:
        assert len(precompute_maps(cache, ds, experts, "cpu")[0]) == 3
        assert [s.id for s in ds.skipped] == ["bad"]
