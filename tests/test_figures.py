"""Tests of tools/figures.py on tiny inputs: a tiny BERT (approx, subspace, init-hist) and run directories
written here (alpha-std, curves). Each figure is a PNG with a CSV beside it that holds the plotted
numbers, checked against their source; principal angles against scipy; bad input gets a sentence.
"""
import csv
import json
import math

import pytest
import torch

import inilora
from tools import figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(png):
    with open(png.with_suffix(".csv"), newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "approx-cache"))
    return tmp_path / "approx-cache"


def write_run(root, name, init="alpha", alpha_std=0.5, seed=0, scores=(0.6, 0.7), losses=(0.69, 0.5, 0.4)):
    """A run directory as train.py writes it: config.json, and metrics.jsonl with loss and dev lines."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "train": {"task": "rotten-tomatoes", "seed": seed},
        "lora": {"init": init, "alpha_std": alpha_std, "rank": 8}}))
    lines = [{"step": i + 1, "epoch": 1, "loss": loss, "lr": 1e-4} for i, loss in enumerate(losses)]
    lines += [{"step": len(losses) * (e + 1), "epoch": e + 1, "dev": {"accuracy": s, "f1": s}} for e, s in enumerate(scores)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_approx_plots_the_cached_curve_against_the_optimum(tmp_path, cache, tiny_bert_dir):
    out = tmp_path / "approx.png"
    figures.main(["approx", "--model", str(tiny_bert_dir), "--rank", "2", "--steps", "30", "--out", str(out)])
    assert_png(out)
    rows = read_csv(out)
    report = json.loads(next(cache.glob("*.json")).read_text())["report"]
    name = sorted(report["curve"]["loss"])[0]
    first = next(r for r in rows if r["matrix"] == name)
    assert float(first["mse"]) == report["curve"]["loss"][name][0]
    assert float(first["optimal_mse"]) == report["matrices"][name]["optimal_mse"]
    assert {int(r["step"]) for r in rows} == set(report["curve"]["steps"])


# invariant: the principal angles are those of scipy.linalg.subspace_angles, in degrees
def test_principal_angles_match_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    X, Y = (torch.randn(40, 3, generator=g, dtype=torch.float64) for _ in range(2))
    U, _ = torch.linalg.qr(Y)
    expected = sorted(math.degrees(a) for a in scipy_linalg.subspace_angles(X.numpy(), Y.numpy()))
    torch.testing.assert_close(figures.principal_angles(X, U), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # the same subspace in another basis: every angle 0
    assert figures.principal_angles(U @ torch.randn(3, 3, generator=g, dtype=torch.float64), U).max() < 1e-5


def test_subspace_angles_per_step_count(tmp_path, cache, tiny_bert_dir, capsys):
    out = tmp_path / "subspace.png"
    figures.main(["subspace", "--model", str(tiny_bert_dir), "--rank", "2", "--steps-list", "0,200",
                  "--lr", "1e-2", "--out", str(out)])
    assert_png(out)
    rows = read_csv(out)
    assert {int(r["steps"]) for r in rows} == {0, 200} and len(rows) == 2 * 4  # 2 step counts x 4 q/v matrices
    angles = [float(r[k]) for r in rows for k in ("left_mean_deg", "left_max_deg", "right_mean_deg", "right_max_deg")]
    assert all(0 <= a <= 90 for a in angles)
    mean = {s: sum(float(r["left_mean_deg"]) for r in rows if int(r["steps"]) == s) / 4 for s in (0, 200)}
    assert mean[200] < mean[0]  # the approximation turns col(B) towards U_r
    assert "steps    200: col(B) vs U_r mean" in capsys.readouterr().out


def test_init_hist_counts_and_singular_values(tmp_path, cache, tiny_bert_dir):
    out = tmp_path / "init-hist.png"
    figures.main(["init-hist", "--model", str(tiny_bert_dir), "--rank", "2", "--inits", "lora,alpha,pissa",
                  "--approx-steps", "10", "--out", str(out)])
    assert_png(out)
    rows = read_csv(out)
    W0 = figures.target_weights(str(tiny_bert_dir), None)[1]["encoder.layers.0.attn.query"]
    S = torch.linalg.svdvals(W0.double())
    assert float(next(r for r in rows if r["init"] == "W0")["y"]) == pytest.approx(S[0].item(), rel=1e-12)
    counts = sum(float(r["y"]) for r in rows if r["init"] == "alpha" and r["quantity"] == "A0_hist")
    assert counts == 2 * 32  # every entry of A0 (r, d_in) in some bin
    # PiSSA's s B0 A0 is W0's top-r part: its singular values are W0's first r
    pissa = [float(r["y"]) for r in rows if r["init"] == "pissa" and r["quantity"] == "sBA_singular_value"]
    torch.testing.assert_close(torch.tensor(pissa, dtype=torch.float64), S[:2], rtol=1e-5, atol=0)


# invariant: init-hist draws A0 exactly as inilora.inject does for a run with the same seed
def test_init_hist_draws_what_inject_draws(tmp_path, tiny_bert_dir):
    from models import encoder

    net, _, model_id = encoder.load_model(str(tiny_bert_dir))
    cfg = inilora.LoRAConfig(init="alpha", rank=2, seed=3)
    inilora.inject(net, cfg, model_id)
    args = figures.parse_args(["init-hist", "--model", str(tiny_bert_dir), "--rank", "2", "--seed", "3",
                               "--target", "encoder.layers.1.attn.value"])
    factors, *_ = figures.init_factors(args, ["alpha"])
    layer = net.get_submodule("encoder.layers.1.attn.value")
    torch.testing.assert_close(factors["alpha"][0], layer.A0, atol=0, rtol=0)
    torch.testing.assert_close(factors["alpha"][1], layer.B0, atol=0, rtol=0)


def test_alpha_std_reads_the_best_dev_score(tmp_path):
    runs = [write_run(tmp_path, f"alpha-{s}-seed{k}", alpha_std=s, seed=k, scores=(0.5 + s / 10, 0.55 + k / 100))
            for s in (0.1, 1.0) for k in (0, 1)]
    runs.append(write_run(tmp_path, "lora-seed0", init="lora", scores=(0.7,)))
    out = tmp_path / "alpha.png"
    figures.main(["alpha-std", *map(str, runs), "--out", str(out)])
    assert_png(out)
    rows = read_csv(out)
    assert len(rows) == 4  # the alpha runs; lora is a reference line
    row = next(r for r in rows if r["run"].endswith("alpha-1.0-seed1"))
    assert (float(row["alpha_std"]), int(row["seed"])) == (1.0, 1)
    assert float(row["best_dev_accuracy_x100"]) == pytest.approx(100 * max(0.6, 0.56))


def test_curves_hold_every_logged_loss_and_dev_score(tmp_path):
    a = write_run(tmp_path, "lora-seed0", init="lora", losses=(0.7, 0.6, 0.5))
    b = write_run(tmp_path, "lora-seed1", init="lora", losses=(0.71, 0.61, 0.52), scores=(0.65,))
    out = tmp_path / "curves.png"
    figures.main(["curves", str(a), str(b), "--out", str(out)])
    assert_png(out)
    rows = read_csv(out)
    losses = [(int(r["step"]), float(r["value"])) for r in rows if r["run"] == str(b) and r["quantity"] == "loss"]
    assert losses == [(1, 0.71), (2, 0.61), (3, 0.52)]
    assert [float(r["value"]) for r in rows if r["run"] == str(a) and r["quantity"] == "dev_accuracy"] == [0.6, 0.7]
    assert {r["label"] for r in rows} == {"lora"}  # the seeds of one setting share a label


def test_weight_change_plots_the_mean_and_range_over_layers(tmp_path):
    runs = [write_run(tmp_path, f"{init}-seed0", init=init) for init in ("lora", "alpha")]
    for run, scale in zip(runs, (1.0, 10.0)):
        records = [{"step": s, "epoch": 1, "loss": 0.5, "lr": 1e-3,
                    "update": {"l0.query": 0.001 * s * scale, "l0.value": 0.003 * s * scale}} for s in (1, 2)]
        with open(run / "metrics.jsonl", "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "wc.png"
    figures.main(["weight-change", *map(str, runs), "--out", str(out)])
    assert_png(out)
    rows = read_csv(out)
    assert len(rows) == 8 and {r["label"] for r in rows} == {"lora", "alpha"}
    alpha = {(int(r["step"]), r["layer"]): float(r["relative_change"]) for r in rows if r["label"] == "alpha"}
    assert alpha == {(1, "l0.query"): 0.01, (1, "l0.value"): 0.03, (2, "l0.query"): 0.02, (2, "l0.value"): 0.06}
    with pytest.raises(ValueError, match="has no weight change in metrics.jsonl"):
        figures.main(["weight-change", str(write_run(tmp_path, "full-seed0", init="full")), "--out", str(out)])


def test_bad_input_gets_a_sentence(tmp_path, tiny_bert_dir):
    with pytest.raises(ValueError, match="no run directories were given"):
        figures.main(["curves", "--out", str(tmp_path / "c.png")])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has no metrics\.jsonl.*train\.py --resume --out"):
        figures.main(["curves", str(bare), "--out", str(tmp_path / "c.png")])
    with pytest.raises(ValueError, match="not a run directory"):
        figures.main(["alpha-std", str(tmp_path / "missing"), "--out", str(tmp_path / "a.png")])
    lora = write_run(tmp_path, "lora-seed0", init="lora")
    with pytest.raises(ValueError, match=r"none of the runs is an IniLoRA-α run.*grids/figure3\.json"):
        figures.main(["alpha-std", str(lora), "--out", str(tmp_path / "a.png")])
    with pytest.raises(ValueError, match=r"init 'kaiming' is not one of .*'pissa'.*--inits"):
        figures.main(["init-hist", "--model", str(tiny_bert_dir), "--inits", "lora,kaiming", "--out", str(tmp_path / "h.png")])
    with pytest.raises(ValueError, match=r"must end in \.png"):
        figures.main(["curves", str(lora), "--out", str(tmp_path / "c.svg")])
    assert not list(tmp_path.glob("*.png"))  # nothing written for bad input
