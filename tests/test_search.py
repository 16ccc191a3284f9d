"""Search: the index stage's work, the CLI, fingerprints, bad input, FAISS recall, a CLIP-backed model."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main as cli
from pipeline.core.config import ConfigError, ModelConfig, params_from_dict
from pipeline.evaluation import evaluate_retrieval, load_retrieval_split
from pipeline.models import build_model
from pipeline.search.build import IndexPaths, build_index
from pipeline.search.embed import SearchError
from pipeline.search.gallery import GalleryError, open_gallery
from pipeline.search import build as build_module
from pipeline.search import embed as embed_module
from pipeline.search import gallery as gallery_module
from pipeline.search.embed import embed_gallery, load_model
from pipeline.search.index import build_hnsw, exact_top_k, hnsw_top_k, load_index, recall_at, write_index
from pipeline.search.query import Searcher
from tiny_project import deep_merge, make_search_project, project_params, save_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def project(prepared, tmp_path_factory) -> Path:
    return make_search_project(tmp_path_factory.mktemp("search") / "project", prepared)


def run_cli(root: Path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.chdir(root)
    code = cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_search_order_and_scores_equal_evaluate_s_similarity_rows(project):
    params = params_from_dict(project_params())
    searcher = Searcher.for_variant(params, "baseline", project)
    data = load_retrieval_split(project / "data" / "prepared", "test")
    _, similarity = evaluate_retrieval(searcher.model, data, params.train.eval_batch_size, CPU)
    assert len(searcher.index) == len(data.image_keys) == 12
    for q in (0, 7, len(data.captions) - 1):
        answer = searcher.search([data.captions[q]], len(data.image_keys))[0]
        expected = torch.sort(similarity[q], descending=True, stable=True)
        assert [h.key for h in answer.hits] == [data.image_keys[g] for g in expected.indices.tolist()]
        np.testing.assert_allclose([h.score for h in answer.hits], expected.values.numpy(), atol=1e-5)
        assert [h.person_id for h in answer.hits] == data.image_pids[expected.indices].tolist()
    # the index's rows are evaluate's gallery embeddings, bit for bit (same batches)
    assert searcher.index.embeddings.shape == (12, 32)
    assert isinstance(searcher.index.embeddings, np.memmap)  # mapped, not copied: the vectors held once


def test_index_metrics_and_table(project):
    metrics = json.loads((project / "metrics" / "index_baseline.json").read_text())
    assert metrics["gallery"] == "data/prepared:test" and metrics["gallery_size"] == 12
    assert metrics["index_kind"] == "exact" and metrics["recall_at_10"] is None and metrics["skipped_images"] == 0
    meta = json.loads((project / "index" / "baseline" / "index.json").read_text())
    assert meta["size"] == 12 and meta["dim"] == 32 and len(meta["model"]["digest"]) == 64
    assert not list((project / "index").glob(".*"))  # no temporary folder left behind


def test_cli_table_json_queries_and_picture(project, monkeypatch, capsys, tmp_path):
    query = "a woman in a red shirt and blue trousers"
    code, table, _ = run_cli(project, monkeypatch, capsys, "search", query, "--variant", "baseline", "-k", "3",
                             "--out", str(tmp_path / "top.png"))
    assert code == 0 and table.splitlines()[0] == f"query: {query}" and len(table.splitlines()) == 3 + 3
    code, printed, _ = run_cli(project, monkeypatch, capsys, "search", query, "--variant", "baseline", "-k", "3", "--json")
    answer = json.loads(printed)
    assert [r["rank"] for r in answer["results"]] == [1, 2, 3] and answer["index"]["kind"] == "exact"
    assert [r["path"].rsplit(":", 1)[1].split(".")[0] for r in answer["results"]] == [r["key"] for r in answer["results"]]
    for row, hit in zip(table.splitlines()[3:], answer["results"]):
        assert row.split()[:2] == [str(hit["rank"]), f"{hit['score']:.4f}"]
    assert (tmp_path / "top.png").stat().st_size > 3000
    queries = tmp_path / "queries.txt"
    queries.write_text(f"{query}\na man with a black backpack\n")
    code, lines, _ = run_cli(project, monkeypatch, capsys, "search", "--queries", str(queries), "--variant", "baseline")
    answers = [json.loads(line) for line in lines.splitlines()]
    assert code == 0 and len(answers) == 2 and len(answers[0]["results"]) == 10  # search.top_k
    # batched: the same ranking, scores equal up to float rounding of a batch of 2
    assert [r["key"] for r in answers[0]["results"][:3]] == [r["key"] for r in answer["results"]]
    np.testing.assert_allclose([r["score"] for r in answers[0]["results"][:3]], [r["score"] for r in answer["results"]],
                               atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["   "], "the query is empty"),
    ([""], "the query is empty"),
    (["a man", "-k", "0"], "k is 0: it must be at least 1"),
    (["a man", "-k", "-3"], "k is -3: it must be at least 1"),
    (["a man", "-k", "13"], "k is 13, but the gallery has 12 images"),
    (["a man", "--variant", "pdg"], "no trained model in models/pdg/best: run `dvc repro train@pdg`"),
    (["a man", "--variant", "nobody"], "no variant 'nobody'"),
])
def test_bad_input_is_one_line_and_status_1(project, monkeypatch, capsys, caplog, args, message):
    argv = ["search", *args] if "--variant" in args else ["search", *args, "--variant", "baseline"]
    code, out, _ = run_cli(project, monkeypatch, capsys, *argv)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 1 and out == "" and len(errors) == 1 and message in errors[0]


def test_a_long_query_is_truncated_and_says_so(project, monkeypatch, capsys, caplog):
    long_query = " ".join(["a woman in a red coat with a black backpack"] * 10)
    code, out, _ = run_cli(project, monkeypatch, capsys, "search", long_query, "--variant", "baseline", "--json")
    warning = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert code == 0 and json.loads(out)["truncated_tokens"] > 32
    assert len(warning) == 1 and "the model reads 32: truncated" in warning[0]


def test_missing_index_another_model_and_another_gallery_are_refused(project, prepared, tmp_path, monkeypatch, capsys, caplog):
    other = tmp_path / "other"
    shutil.copytree(project, other, symlinks=True)
    params = params_from_dict(project_params())
    shutil.rmtree(other / "index")
    with pytest.raises(SearchError, match=r"no index in .*index/baseline: build it with `dvc repro index@baseline`"):
        Searcher.for_variant(params, "baseline", other)
    shutil.copytree(project / "index", other / "index")
    save_tiny_model(other / "models" / "baseline" / "best", prepared, seed=1)  # "retrained"
    with pytest.raises(SearchError, match=r"built by another model .*: rebuild it with `dvc repro index@baseline`"):
        Searcher.for_variant(params, "baseline", other)
    shutil.rmtree(other / "models")
    shutil.copytree(project / "models", other / "models")
    val = params_from_dict(project_params({"search": {"gallery": "val"}}))
    with pytest.raises(SearchError, match=r"indexes the gallery data/prepared:test, but search.gallery is "
                                          r"data/prepared:val: rebuild it with `dvc repro index@baseline`"):
        Searcher.for_variant(val, "baseline", other)
    code, out, _ = run_cli(other, monkeypatch, capsys, "search", "a man", "--variant", "baseline")
    assert code == 0 and out  # the same model and gallery again: answered


def test_search_checks_files_by_stat_and_reads_no_shard_or_weights_for_it(project, prepared, tmp_path, monkeypatch):
    other = tmp_path / "stat"
    shutil.copytree(project, other, symlinks=True)
    (other / "data" / "prepared").unlink()
    shutil.copytree(prepared, other / "data" / "prepared")  # copy2: the same sizes and modification times
    params = params_from_dict(project_params())
    meta = json.loads((other / "index" / "baseline" / "index.json").read_text())
    assert [name for name, _, _ in meta["gallery"]["stat"]] == ["test-000000.tar"] and len(meta["gallery"]["digest"]) == 64
    assert "model.safetensors" in [name for name, _, _ in meta["model"]["stat"]]

    def no_reading(*_):
        raise AssertionError("a search read a file's contents to check it")

    with monkeypatch.context() as patched:
        for module, name in ((embed_module, "file_digest"), (embed_module, "model_fingerprint"),
                             (gallery_module, "gallery_fingerprint"), (gallery_module, "hashlib")):
            patched.setattr(module, name, no_reading)
        assert len(Searcher.for_variant(params, "baseline", other).search(["a man in a red shirt"], 3)[0].hits) == 3
    shard = other / "data" / "prepared" / "shards" / "test-000000.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # touched, the same bytes
    weights = other / "models" / "baseline" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten with the same bytes (a dvc checkout does this)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert len(Searcher.for_variant(params, "baseline", other).search(["a man in a red shirt"], 3)[0].hits) == 3
    payload = bytearray(shard.read_bytes())
    payload[-2048] ^= 1  # the same size, another content
    shard.write_bytes(bytes(payload))
    with pytest.raises(SearchError, match=r"the gallery data/prepared:test changed since the index was built"):
        Searcher.for_variant(params, "baseline", other)
    build_index(params, "baseline", CPU, IndexPaths.under(other, "baseline"))  # rebuilt: the new stats recorded
    payload = bytearray(weights.read_bytes())
    payload[-1] ^= 1
    weights.write_bytes(bytes(payload))
    with pytest.raises(SearchError, match=r"built by another model than .*best now holds: rebuild it with "
                                          r"`dvc repro index@baseline`"):
        Searcher.for_variant(params, "baseline", other)


def _crop_folder(prepared: Path, folder: Path) -> list[Path]:
    gallery = open_gallery("test", prepared)
    written = []
    for i, key in enumerate(gallery.keys[:6]):
        path = folder / ("cam_a" if i % 2 else "cam_b/deeper") / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gallery.image_bytes(i))
        written.append(path)
    return written


def test_a_folder_gallery_skips_and_names_unreadable_files_and_search_gallery_dir_agrees(project, prepared, tmp_path,
                                                                                          monkeypatch, capsys):
    crops = tmp_path / "crops"
    _crop_folder(prepared, crops)
    (crops / "cam_a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (crops / "notes.png").write_text("a text file with an image's name")
    (crops / "readme.txt").write_text("not an image extension: not even looked at")
    root = tmp_path / "folder-project"
    shutil.copytree(project, root, symlinks=True)
    raw = project_params({"search": {"gallery": str(crops), "index": "hnsw"}})
    metrics = build_index(params_from_dict(raw), "baseline", CPU, IndexPaths.under(root, "baseline"))
    assert metrics["gallery_size"] == 6 and metrics["skipped_images"] == 2
    assert sorted(metrics["skipped"]) == ["cam_a/broken.jpg", "notes.png"]
    assert metrics["index_kind"] == "hnsw" and metrics["recall_at_10"] == 1.0  # 6 items: HNSW finds them all
    assert metrics["recall_queries"] == 6  # every image (fewer than RECALL_QUERIES)
    index = load_index(root / "index" / "baseline", "baseline")  # the vectors once: a view of the graph's
    storage = faiss.downcast_index(index.hnsw.storage)
    assert index.embeddings.__array_interface__["data"][0] == int(storage.get_xb())
    np.testing.assert_array_equal(index.embeddings, np.load(root / "index" / "baseline" / "embeddings.npy"))
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    code, indexed, _ = run_cli(root, monkeypatch, capsys, "search", "a red shirt", "--variant", "baseline", "-k", "6", "--json")
    code2, direct, _ = run_cli(root, monkeypatch, capsys, "search", "a red shirt", "--variant", "baseline", "-k", "6",
                               "--json", "--gallery", str(crops))
    keys = [r["key"] for r in json.loads(indexed)["results"]]
    assert code == code2 == 0 and keys == [r["key"] for r in json.loads(direct)["results"]]
    assert all(r["person_id"] is None for r in json.loads(direct)["results"])
    assert sorted(keys) == sorted(p.relative_to(crops).as_posix() for p in crops.rglob("*.png") if p.name != "notes.png")
    shutil.copy(crops / keys[0], crops / "cam_a" / "new.png")  # one more crop
    with pytest.raises(SearchError, match=r"the gallery .*crops changed since the index was built: rebuild it with "
                                          r"`dvc repro index@baseline`"):
        Searcher.for_variant(params_from_dict(raw), "baseline", root)


def test_opening_shards_reads_no_image_and_workers_embed_what_one_process_does(project, prepared, tmp_path,
                                                                             monkeypatch):
    import tarfile

    read = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tar, member: read.append(member.name) or extract(tar, member))
    gallery = open_gallery("test", prepared)
    assert len(gallery) == 12 and read and all(name.endswith(".json") for name in read)  # offsets only
    monkeypatch.undo()
    with tarfile.open(gallery.files[4]) as tar:
        assert gallery.image_bytes(4) == tar.extractfile(gallery.members[4]).read()
    model = load_model(project / "models" / "baseline" / "best", CPU)
    alone, _ = embed_gallery(model, gallery, 5, CPU, workers=0)
    np.testing.assert_array_equal(embed_gallery(model, gallery, 5, CPU, workers=2)[0], alone)
    np.testing.assert_array_equal(alone, load_index(project / "index" / "baseline", "baseline").embeddings)
    crops = tmp_path / "crops"
    written = _crop_folder(prepared, crops)
    (crops / "cam_a" / "0.jpg").write_bytes(b"not an image")  # sorts first: every batch after it shifts
    folder = gallery_module.folder_gallery(str(crops))
    vectors, kept = embed_gallery(model, folder, 4, CPU, workers=2)
    assert kept.skipped == ["cam_a/0.jpg"] and len(kept) == 6 and vectors.shape == (6, 32)
    np.testing.assert_array_equal(vectors, embed_gallery(model, folder, 4, CPU, workers=0)[0])
    (written[0]).write_bytes(b"broken")
    shard_gallery = gallery_module.subset(gallery, list(range(12)))
    shard_gallery.spans[3] = (0, 100)  # a tar header, not an image
    with pytest.raises(GalleryError, match=r"^.*test-000000.tar:.*: not a readable image$"):
        embed_gallery(model, shard_gallery, 5, CPU, workers=1)


def test_hnsw_recall_is_checked_on_a_seeded_sample_of_the_captions(project, tmp_path, monkeypatch):
    root = tmp_path / "recall"
    shutil.copytree(project, root, symlinks=True)
    monkeypatch.setattr(build_module, "RECALL_QUERIES", 7)
    params = params_from_dict(project_params({"search": {"index": "hnsw"}}))
    first = build_index(params, "baseline", CPU, IndexPaths.under(root, "baseline"))
    assert first["index_kind"] == "hnsw" and first["recall_queries"] == 7 and first["recall_at_10"] == 1.0
    assert build_index(params, "baseline", CPU, IndexPaths.under(root, "baseline"))["recall_queries"] == 7


def test_an_empty_or_missing_gallery_folder_stops_before_anything_is_written(project, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(project, root, symlinks=True)
    before = (root / "metrics" / "index_baseline.json").read_bytes()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.txt").write_text("x")
    for folder, message in ((tmp_path / "empty", "no images in it"), (tmp_path / "nowhere", "no such folder")):
        with pytest.raises(GalleryError, match=message):
            build_index(params_from_dict(project_params({"search": {"gallery": str(folder)}})), "baseline", CPU, IndexPaths.under(root, "baseline"))
    assert (root / "metrics" / "index_baseline.json").read_bytes() == before
    assert json.loads((root / "index" / "baseline" / "index.json").read_text())["gallery"]["name"] == "data/prepared:test"


def test_bad_search_params_name_the_key():
    with pytest.raises(ConfigError, match=r"'search.index' must be one of \['auto', 'exact', 'hnsw'\], got 'fast'"):
        params_from_dict({"search": {"index": "fast"}})
    with pytest.raises(ConfigError, match=r"'search.top_k' must be in \[1, 1000\], got 0"):
        params_from_dict({"search": {"top_k": 0}})
    with pytest.raises(ConfigError, match=r"unknown key 'search.galery'"):
        params_from_dict({"search": {"galery": "test"}})


def _structured(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32) @ rng.standard_normal((8, dim)).astype(np.float32)
    x += 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hnsw_recall_against_exact_on_known_data():
    data = _structured(5200)
    gallery, queries = data[:5000], data[5000:]
    scores, rows = exact_top_k(gallery, queries, 10)
    brute = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]
    assert (rows == brute).all()
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ gallery.T, brute, 1), rtol=0, atol=1e-6)
    found = hnsw_top_k(build_hnsw(gallery), queries, 10)[1]
    assert recall_at(found, rows) >= 0.95
    assert recall_at(rows[:, ::-1], rows) == 1.0 and recall_at(rows[:, :5].repeat(2, 1), rows) == 0.5


def test_exact_ties_go_to_the_lower_row_as_in_evaluate():
    gallery = _structured(50, dim=16)
    gallery[30] = gallery[40] = gallery[3]
    scores, rows = exact_top_k(gallery, gallery[[3]], 3)
    assert rows[0].tolist() == [3, 30, 40] and np.ptp(scores) < 1e-6
    assert exact_top_k(gallery, gallery[[3]], 2)[1][0].tolist() == [3, 30]  # the cut inside the tie


@pytest.mark.parametrize("k", [1, 5, 17, 400])
def test_exact_top_k_is_a_stable_full_sort_across_blocks_and_ties_at_the_cut(monkeypatch, k):
    """Small integer vectors: scores are exact small integers, so most rows have a tie at the k-th
    score that runs past the cut; blocks of 7 queries (the score matrix bound shrunk)."""
    from pipeline.search import index as index_module

    rng = np.random.default_rng(3)
    gallery = rng.integers(-1, 2, (400, 6)).astype(np.float32)
    queries = rng.integers(-1, 2, (50, 6)).astype(np.float32)
    monkeypatch.setattr(index_module, "SCORE_BLOCK_BYTES", 7 * 400 * 4)
    scores, rows = exact_top_k(gallery, queries, k)
    full = queries @ gallery.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :k]
    assert rows.shape == (50, k) and rows.dtype == np.int64 and (rows == expected).all()
    np.testing.assert_array_equal(scores, np.take_along_axis(full, expected, 1))
    if k < 400:  # the cut does fall inside a tie in most rows: the (k+1)-th best equals the k-th
        ranked = -np.sort(-full, axis=1)
        assert (ranked[:, k] == ranked[:, k - 1]).sum() > 25


def test_write_index_replaces_an_old_index_whole(tmp_path):
    from pipeline.search.gallery import Gallery

    gallery = Gallery(["a", "b"], ["x.png", "y.png"], ["", ""], [-1, -1], "crops")
    for size in (4, 8):
        write_index(tmp_path / "index" / "v", np.ones((2, size), np.float32), gallery, {"kind": "exact", "size": 2})
    assert load_index(tmp_path / "index" / "v", "v").embeddings.shape == (2, 8)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["v"]


def test_serve_on_a_busy_port_is_one_line(project, monkeypatch, capsys, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, _ = run_cli(project, monkeypatch, capsys, "serve", "--variant", "baseline", "--port", str(port))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 1 and errors == [f"port {port} on 127.0.0.1 is in use: stop what holds it, or pick another with --port"]


def test_a_clip_backed_dual_encoder_indexes_and_searches(prepared, tmp_path, cuhk_mini):
    from tiny_models import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    config = ModelConfig(preset="clip-vit-b16", vision_path=str(clip), text_path=str(clip), embed_dim=24,
                         max_text_length=64)
    root = tmp_path / "clip-project"
    (root / "data").mkdir(parents=True)
    (root / "data" / "prepared").symlink_to(prepared)
    build_model(config, (64, 32)).save_pretrained(root / "models" / "clip" / "best")
    raw = project_params({"variants": {"clip": {"data": "data/prepared"}}})
    params = params_from_dict(raw)
    assert build_index(params, "clip", CPU, IndexPaths.under(root, "clip"))["dim"] == 24
    searcher = Searcher.for_variant(params, "clip", root)
    data = load_retrieval_split(root / "data" / "prepared", "test")
    _, similarity = evaluate_retrieval(searcher.model, data, params.train.eval_batch_size, CPU)
    answer = searcher.search([data.captions[5]], 12)[0]
    np.testing.assert_allclose([h.score for h in answer.hits],
                               torch.sort(similarity[5], descending=True, stable=True).values.numpy(), atol=1e-5)
    # the real crops of CUHK-PEDES as a folder gallery (their own sizes, resized by the model's preprocessor)
    crops = params_from_dict(deep_merge(raw, {"search": {"gallery": str(cuhk_mini / "imgs")}}))
    metrics = build_index(crops, "clip", CPU, IndexPaths.under(root, "clip"))
    assert metrics["gallery_size"] == 32 and metrics["skipped_images"] == 0
    hits = Searcher.for_variant(crops, "clip", root).search(["a man in a black jacket"], 5)[0].hits
    assert len(hits) == 5 and all(h.path.startswith(str(cuhk_mini / "imgs")) for h in hits)
