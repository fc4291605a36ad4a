"""Mixture YAMLs: the sampling strategies against direct slicing, weights, seeds, per-source image
roots, errors, and a mixture as a run's stage data with its per-source counts in the run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from moe_vision.data.llava import load_records
from moe_vision.data.mixture import Mixture, Source
from moe_vision.data.records import DataError


def _write(path: Path, n: int, tag: str) -> Path:
    records = [{"id": f"{tag}{i}", "conversations": []} for i in range(n)]
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def _ids(index) -> list[str]:
    return [index.read(i)["id"] for i in range(len(index))]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": _write(tmp_path / "a.jsonl", 20, "a"),
        "b": _write(tmp_path / "b.json", 30, "b"),
        "c": _write(tmp_path / "c.jsonl", 8, "c"),
    }


def test_strategies_pick_what_they_say(files, tmp_path) -> None:
    spec = {
        "image_root": "imgs",
        "datasets": [
            {"json_path": "a.jsonl", "sampling_strategy": "first:25%"},
            {"json_path": "b.json", "sampling_strategy": "end:7", "image_root": "/data/b"},
            {"json_path": "c.jsonl", "sampling_strategy": "random:50%"},
            {"json_path": "a.jsonl", "sampling_strategy": "random:3"},
            {"json_path": "c.jsonl"},
        ],
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    index, roots, counts = Mixture.from_yaml(tmp_path / "mix.yaml").resolve(seed=1)
    ids = _ids(index)
    a = [f"a{i}" for i in range(20)]
    b = [f"b{i}" for i in range(30)]
    c = [f"c{i}" for i in range(8)]
    assert ids[:5] == a[:5]  # ceil(25% of 20)
    assert ids[5:12] == b[-7:]
    rand_c, rand_a, all_c = ids[12:16], ids[16:19], ids[19:]
    assert len(set(rand_c)) == 4 and set(rand_c) <= set(c) and rand_c == sorted(rand_c)
    assert len(set(rand_a)) == 3 and set(rand_a) <= set(a)
    assert all_c == c
    assert [x["selected"] for x in counts] == [5, 7, 4, 3, 8]
    assert [x["available"] for x in counts] == [20, 30, 8, 20, 8]
    assert roots[0] == tmp_path / "imgs" and roots[1] == Path("/data/b")
    # Reproducible from the seed; another seed draws other records.
    again, _, _ = Mixture.from_yaml(tmp_path / "mix.yaml").resolve(seed=1)
    assert _ids(again) == ids
    other = {
        tuple(_ids(Mixture.from_yaml(tmp_path / "mix.yaml").resolve(seed=s)[0])[12:19])
        for s in range(2, 6)
    }
    assert len(other | {tuple(ids[12:19])}) > 1


def test_weights_repeat_and_subsample(files, tmp_path) -> None:
    mix = Mixture.from_dict({"datasets": [{"json_path": "c.jsonl", "weight": 2.5}]}, base=tmp_path)
    index, _, counts = mix.resolve(seed=0, image_root=tmp_path)
    ids = _ids(index)
    c = [f"c{i}" for i in range(8)]
    assert ids[:16] == c + c and len(ids) == 16 + 4 and set(ids[16:]) <= set(c)
    assert counts[0]["selected"] == 20
    assert Source("x.json", sampling_strategy="random:10%").count(95) == math.ceil(9.5)


@pytest.mark.parametrize(
    "source, message",
    [
        ({"json_path": "a.jsonl", "sampling_strategy": "some:3"}, "sampling_strategy 'some:3'"),
        ({"json_path": "a.jsonl", "sampling_strategy": "first:21"}, "asks for 21 records"),
        ({"json_path": "a.jsonl", "sampling_strategy": "end:120%"}, "over 100%"),
        ({"json_path": "a.jsonl", "weight": 0}, "weight must be > 0"),
        ({"json": "a.jsonl"}, "must be a mapping with 'json_path'"),
        ({"json_path": "missing.jsonl"}, "data file not found"),
    ],
)
def test_bad_mixtures_are_named(source, message, files, tmp_path) -> None:
    with pytest.raises(DataError, match=message):
        Mixture.from_dict({"datasets": [source]}, base=tmp_path).resolve(0, tmp_path)


def test_a_mixture_is_stage_data_with_counts_in_the_run_folder(tmp_path) -> None:
    """The run's dataset factory reads a mixture like a data file and writes its counts."""
    from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
    from moe_vision.experiment.run_config import DataConfig, DatasetCache, RunConfig
    from moe_vision.model.config import ModelConfig
    from moe_vision.model.mllm import MoEVisionModel

    bench = generate_benchmark(
        tmp_path / "b", seed=0, sizes=BenchmarkSizes(align=4, instruct=6, val=2, test=2)
    )
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        yaml.safe_dump(
            {
                "image_root": str(bench.images),
                "datasets": [
                    {"json_path": str(bench.split("align")), "sampling_strategy": "first:2"},
                    {"json_path": str(bench.split("instruct")), "sampling_strategy": "random:3"},
                ],
            }
        )
    )
    cfg = RunConfig(seed=5, data=DataConfig(splits={"mixed": str(mix)}))
    model = MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny"]))
    out = tmp_path / "run"
    datasets = DatasetCache(cfg, {"mixed": mix}, None, out)
    ds = datasets("mixed", model)
    align, instruct = load_records(bench.split("align")), load_records(bench.split("instruct"))
    ids = [ds[i]["id"] for i in range(len(ds))]
    assert ids[:2] == [r["id"] for r in align[:2]]
    assert set(ids[2:]) <= {r["id"] for r in instruct} and len(set(ids[2:])) == 3
    written = json.loads((out / "data" / "mixed.sources.json").read_text())
    assert written["records"] == 5
    assert [s["selected"] for s in written["sources"]] == [2, 3]
    rows = np.random.default_rng([5, 1]).choice(6, size=3, replace=False)
    assert sorted(ids[2:]) == sorted(instruct[k]["id"] for k in rows)  # drawn from the run seed


@pytest.mark.parametrize(
    ("weight", "message"),
    [(".inf", "finite number"), (".nan", "finite number"), ("2000000", "above the maximum 1000")],
)
def test_an_infinite_or_huge_weight_is_refused(weight, message, tmp_path: Path) -> None:
    """Issue 27.11: ``weight: .inf`` gave an OverflowError traceback, ``weight: 2000000`` made
    ``data check`` walk 16M records."""
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n')
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"image_root: .\ndatasets:\n  - json_path: a.jsonl\n    weight: {weight}\n")
    with pytest.raises(DataError, match=message) as err:
        Mixture.from_yaml(mix).resolve(0)
    assert "a.jsonl" in str(err.value)
