"""Multi-teacher distillation (issue 30): PHI-S against the paper's formula, the losses against
brute-force loops, the adaptor's resampling against ``align_to_grid``, a student that moves
towards every teacher (and not towards one whose loss is dropped), resume to the same weights,
the written preset loaded by ``create_expert`` with teacher-shaped adaptor maps, and the
real-size recipe's shapes on the meta device."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import experts
from experts import FeatureMap, align_to_grid
from experts.families.distilled import AdaptorHead
from moe_vision.distill.balancing import fit_balancer, hadamard
from moe_vision.distill.losses import spatial_losses, summary_loss
from moe_vision.distill.run import distill, distill_config, register_from_card, save_student
from moe_vision.zoo import PretrainConfig, core, pretrain
from moe_vision.zoo.resume import checkpoint_path

ROOT = Path(__file__).resolve().parent.parent
TEACHERS = ("clip-mini", "pix2struct-mini", "convnext-mini")


def _anisotropic(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """``(n, c)`` samples with a mean, variances over 4 orders of magnitude and correlations."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, c, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0]
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * scales
    return (x @ mix + 3.0).float()


@pytest.mark.parametrize("n", [4, 8, 12, 20, 96, 192, 768, 1024, 1152, 1280])
def test_hadamard_matrices_are_orthogonal_with_equal_magnitude_entries(n: int) -> None:
    h = hadamard(n)
    assert np.allclose(h @ h.T, np.eye(n), atol=1e-10)
    assert np.allclose(np.abs(h), 1 / math.sqrt(n))


def test_phi_s_follows_the_papers_formula() -> None:
    """PHI-S (arXiv 2410.01680, eq. 11-13): y = (1/alpha) H U^T (x - mu), Sigma = U L U^T,
    alpha^2 = mean eigenvalue = trace(Sigma)/C. Then every dimension has variance 1 (isotropic:
    one scale for all), the map is alpha^-1 times an orthogonal matrix, and cov(y) =
    H L H^T / alpha^2 (the spectrum is kept, scaled: it is not whitening)."""
    c = 12
    x = _anisotropic(4000, c)
    bal = fit_balancer(x, "phi-s")
    xd = x.double().numpy()
    mu = xd.mean(0)
    cov = np.cov(xd, rowvar=False)
    lam = np.linalg.eigvalsh(cov)  # ascending, as torch.linalg.eigh
    alpha = math.sqrt(np.trace(cov) / c)  # by hand
    y = bal(x).double().numpy()
    cov_y = np.cov(y, rowvar=False)
    assert np.allclose(np.diag(cov_y), 1.0, atol=1e-3)  # equal variance in every dimension
    assert np.allclose(y.mean(0), 0.0, atol=1e-3)
    w = bal.weight.double().numpy() * alpha  # orthogonal once the scale is taken out
    assert np.allclose(w @ w.T, np.eye(c), atol=1e-4)
    assert np.allclose(np.linalg.eigvalsh(cov_y), lam / alpha**2, rtol=1e-3, atol=1e-6)
    h = hadamard(c)
    assert np.allclose(cov_y, h @ np.diag(lam) @ h.T / alpha**2, atol=2e-3)
    assert np.allclose(bal.mean.numpy(), mu, atol=1e-4)
    inverse, offset = bal.inverse()
    assert torch.allclose(bal(x) @ inverse + offset, x, atol=1e-3)


def test_standardize_and_none() -> None:
    x = _anisotropic(3000, 8)
    y = fit_balancer(x, "standardize")(x).double()
    assert torch.allclose(y.var(0), torch.ones(8, dtype=torch.float64), atol=1e-3)
    assert torch.equal(fit_balancer(x, "none")(x), x)
    with pytest.raises(ValueError, match="unknown balancing 'whiten'"):
        fit_balancer(x, "whiten")


def test_losses_match_brute_force_loops() -> None:
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    mask = torch.rand(2, 3, 4, generator=g) > 0.4
    beta = 0.5
    cos_sum = l1_sum = count = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                if not mask[b, i, j]:
                    continue
                p, t = pred[b, :, i, j].tolist(), target[b, :, i, j].tolist()
                dot = sum(a * c for a, c in zip(p, t))
                norm = math.sqrt(sum(a * a for a in p)) * math.sqrt(sum(c * c for c in t))
                cos_sum += 1 - dot / norm
                d = [abs(a - c) for a, c in zip(p, t)]
                l1_sum += sum(0.5 * v * v / beta if v < beta else v - 0.5 * beta for v in d) / 5
                count += 1
    cos, l1 = spatial_losses(pred, target, mask, beta=beta)
    assert cos.item() == pytest.approx(cos_sum / count, rel=1e-5)
    assert l1.item() == pytest.approx(l1_sum / count, rel=1e-5)
    s_pred, s_target = pred[:, :, 0, 0], target[:, :, 0, 0]
    want = 0.0
    for b in range(2):
        p, t = s_pred[b].tolist(), s_target[b].tolist()
        dot = sum(a * c for a, c in zip(p, t))
        want += 1 - dot / (math.sqrt(sum(a * a for a in p)) * math.sqrt(sum(c * c for c in t)))
    assert summary_loss(s_pred, s_target).item() == pytest.approx(want / 2, rel=1e-5)


@pytest.mark.parametrize("grid", [(11, 11), (4, 4), (8, 8)])
def test_adaptor_map_is_the_mlp_resampled_by_align_to_grid(grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    head = AdaptorHead(6, 5, grid)
    x = torch.randn(2, 6, 8, 8)
    fmap = FeatureMap(x, 8, "student")
    mlp = (
        torch.stack(  # the MLP cell by cell
            [
                torch.stack([head.spatial(x[b, :, i, j]) for j in range(8)], -1)
                for b in range(2)
                for i in range(8)
            ]
        )
        .reshape(2, 8, 5, 8)
        .permute(0, 2, 1, 3)
    )
    want = align_to_grid(FeatureMap(mlp, 8, "student"), grid).features
    summary, got = head.normalised(x.mean((2, 3)), fmap)
    assert got.grid == grid
    assert torch.allclose(got.features, want, atol=1e-5)
    head.spatial_inverse.copy_(2 * torch.eye(5))
    head.spatial_offset.fill_(1.0)
    assert torch.allclose(head(x.mean((2, 3)), fmap)[1].features, 2 * want + 1, atol=1e-5)


def _config(tmp: Path, steps: int, **options) -> PretrainConfig:
    base = PretrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup=2)
    opts = {"calibration_images": 48, "teacher_cache": str(tmp / "cache"), **options}
    return distill_config(TEACHERS, "phi-s", base, **opts)


def test_student_moves_towards_every_teacher_and_not_towards_a_dropped_one(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    every = distill("mini-student", _config(tmp_path, 14), progress=False, heldout=24)
    gain = {
        t: every.fidelity[t]["spatial_centred"] - every.fidelity_at_init[t]["spatial_centred"]
        for t in TEACHERS
    }
    assert all(g > 0.1 for g in gain.values()), gain
    weights = {"convnext-mini": 0.0}
    dropped = distill(
        "mini-student", _config(tmp_path, 14, teacher_weights=weights), progress=False, heldout=24
    )
    d = {
        t: dropped.fidelity[t]["spatial_centred"] - dropped.fidelity_at_init[t]["spatial_centred"]
        for t in TEACHERS
    }
    assert d["convnext-mini"] < 0.03 and d["convnext-mini"] < gain["convnext-mini"] / 4, (d, gain)
    assert d["clip-mini"] > 0.1 and d["pix2struct-mini"] > 0.1, d

    # the written preset loads with create_expert; its adaptor maps are the teachers' shapes
    weights_path, card_path = save_student(every, tmp_path)
    card = __import__("json").loads(card_path.read_text())
    assert card["distill"]["teachers"] == list(TEACHERS)
    assert card["distill"]["balancing"] == "phi-s" and card["steps"] == 14
    assert set(card["distill"]["fidelity"]) == set(TEACHERS)
    assert register_from_card(card_path) == "mini-student"  # the same architecture: found
    other = tmp_path / "other-student.json"  # a preset written under another name
    other.write_text(
        card_path.read_text().replace('"name": "mini-student"', '"name": "other-student"')
    )
    assert register_from_card(other) == "other-student"
    loaded = experts.create_expert("other-student", checkpoint=str(weights_path))
    assert torch.equal(
        loaded.state_dict()["adaptors.clip-mini.spatial_inverse"],
        every.result.expert.state_dict()["adaptors.clip-mini.spatial_inverse"],
    )
    images = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    for t in TEACHERS:
        got = experts.create_expert(
            "mini-student", checkpoint=str(weights_path), arch={"adaptor": t}
        ).eval()
        teacher = experts.get_spec(t)
        assert (got.spec.channels, got.spec.grid) == (teacher.channels, teacher.grid)
        with torch.no_grad():
            fmap = got(got.preprocess(images))
        assert fmap.features.shape == (2, teacher.channels, *teacher.grid)
        student = every.result.expert
        with torch.no_grad():
            from experts.families.distilled import summary_and_map

            s, m = summary_and_map(student.student, student.student.preprocess(images))
            want = student.adaptors[t](s, m)[1].features
        assert torch.allclose(fmap.features, want, atol=1e-5)


class Killed(Exception):
    """Stands for the kill that ends the first run."""


def test_a_killed_distillation_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    config = _config(tmp_path / "a", 4)
    whole = pretrain("mini-student", config, "distill", progress=False)
    config = dataclasses.replace(
        config, options={**config.options, "teacher_cache": str(tmp_path / "b")}
    )
    real = core.make_scenes

    def dies_at_2(seed: int, step: int, *args, **kwargs):
        if step == 2:
            raise Killed(step)
        return real(seed, step, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(core, "make_scenes", dies_at_2)
    with pytest.raises(Killed):
        pretrain("mini-student", config, "distill", False, resume_dir=out, checkpoint_every_s=0)
    assert checkpoint_path(out, "mini-student").is_file()
    monkeypatch.setattr(core, "make_scenes", real)
    resumed = pretrain(
        "mini-student", config, "distill", False, resume_dir=out, checkpoint_every_s=0
    )
    assert resumed.losses == whole.losses
    theirs = resumed.expert.state_dict()
    for key, value in whole.expert.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_real_size_recipe_shapes_on_the_meta_device() -> None:
    """recipes/distill_real.yaml: every teacher and the ViT-B/16 student build on the meta
    device, and the student's heads are shaped for the teachers' grids and channels."""
    from experts.families.distilled import distilled_spec, teacher_shapes

    recipe = yaml.safe_load((ROOT / "recipes" / "distill_real.yaml").read_text())
    teachers = recipe["teachers"]
    shapes = teacher_shapes(teachers)
    assert {t: (s["channels"], tuple(s["grid"])) for t, s in shapes.items()} == {
        "clip-vit-l-336": (1024, (24, 24)),
        "siglip-so400m-384": (1152, (27, 27)),
        "dinov2-large": (1024, (37, 37)),
        "sam-vit-l": (256, (64, 64)),
    }
    student = experts.create_expert(recipe["student"], device="meta", **recipe["student_options"])
    assert (student.spec.channels, student.spec.grid) == (768, (14, 14))
    for name in teachers:
        hadamard(shapes[name]["channels"])  # PHI-S has a Hadamard matrix for every width
    spec = distilled_spec(
        "real-student", recipe["student"], shapes, None, student_options=recipe["student_options"]
    )
    assert spec.channels == 768
    heads = {t: AdaptorHead(768, s["channels"], tuple(s["grid"])) for t, s in shapes.items()}
    with torch.device("meta"):
        x = FeatureMap(torch.empty(2, 768, 14, 14), 16, "student")
        for t, head in heads.items():
            head.to("meta")
            s, m = head(torch.empty(2, 768), x)
            assert tuple(m.features.shape) == (2, shapes[t]["channels"], *shapes[t]["grid"])
            assert tuple(s.shape) == (2, shapes[t]["channels"])


@pytest.mark.gpu
def test_real_size_recipe_one_step_on_a_gpu() -> None:
    """One distillation step of recipes/distill_real.yaml at real size (random-init teachers:
    no hub here), bf16 autocast: every teacher's map, the student's summary and map, every
    head's loss, finite gradients on the student and every head."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from experts.families.distilled import masked_mean, summary_and_map, teacher_shapes
    from moe_vision.distill.balancing import fit_balancer
    from moe_vision.distill.teachers import whole_grid

    recipe = yaml.safe_load((ROOT / "recipes" / "distill_real.yaml").read_text())
    opts = dict(
        recipe["student_options"], input_size=tuple(recipe["student_options"]["input_size"])
    )
    student = experts.create_expert(recipe["student"], device="cuda", **opts).train()
    shapes = teacher_shapes(recipe["teachers"])
    heads = {t: AdaptorHead(768, s["channels"], tuple(s["grid"])).cuda() for t, s in shapes.items()}
    images = [torch.randint(0, 255, (3, 400, 300), dtype=torch.uint8) for _ in range(2)]
    inputs = {k: v.cuda() for k, v in student.preprocess(images).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        summary, fmap = summary_and_map(student, inputs)
        total = torch.zeros((), device="cuda")
        for name in recipe["teachers"]:
            teacher = experts.create_expert(name, device="cuda").eval()
            with torch.no_grad():
                t_in = {k: v.cuda() for k, v in teacher.preprocess(images).items()}
                target = whole_grid(teacher(t_in), teacher.spec.grid)
            del teacher
            cells = target.features.float().permute(0, 2, 3, 1)[target.valid()]
            bal = fit_balancer(cells.cpu(), "standardize")  # 2 images: too few for PHI-S
            bal.mean, bal.weight = bal.mean.cuda(), bal.weight.cuda()
            s, m = heads[name].normalised(summary, fmap)
            tm = bal(target.features.float().permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            cos, l1 = spatial_losses(m.features.float(), tm, target.mask)
            ts = masked_mean(target).float()
            total = total + summary_loss(s.float(), ts) + cos + l1
    total.backward()
    assert torch.isfinite(total)
    grads = [p.grad for p in student.parameters() if p.grad is not None]  # blocks past the
    assert len(grads) > 0.5 * len(list(student.parameters()))  # feature layer get none
    assert all(torch.isfinite(g).all() for g in grads)
    for head in heads.values():
        assert all(p.grad is not None for p in head.parameters())
