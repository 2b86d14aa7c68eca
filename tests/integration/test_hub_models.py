"""Real models from where home-labbers keep them: a Hugging Face hub on 127.0.0.1 serving the
project's own files (tests/hubserver.py), an Ollama store and an LM Studio folder laid out on disk.

Planning reads headers by range (bytes counted at the server), the worker fetches into the
Hugging Face cache layout through huggingface_hub, resumes, verifies sha256 and quarantines a
mismatch; end to end on Redis and PostgreSQL a sweep of hf:// models runs from an empty cache.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.hubserver import HubFile, HubRepo, LoopbackHub, sha256_of
from tests.integration.conftest import at_head, service_env, tokenfarm, worker_process

pytestmark = pytest.mark.integration

C1, C0 = "1" * 40, "0" * 39 + "a"  # commits: main, and an older one tagged v0


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory, smollm2) -> dict[str, Path]:
    """Files the hub serves: SmolLM2 whole, split in three, corrupted, cut short, not GGUF."""
    from worker.derive import split

    d = tmp_path_factory.mktemp("hub-files")
    parts = split(smollm2, d / "SmolLM2-135M-Q4_1-00001-of-00003.gguf", 3)
    corrupt = d / "corrupt.gguf"
    shutil.copyfile(smollm2, corrupt)
    with corrupt.open("r+b") as f:  # one byte of tensor data flipped: same size, other sha256
        f.seek(smollm2.stat().st_size - 1000)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    liar = d / "liar.gguf"  # a whole header, half the tensor data
    with smollm2.open("rb") as src, liar.open("wb") as out:
        out.write(src.read(smollm2.stat().st_size // 2))
    notgguf = d / "notgguf.gguf"
    notgguf.write_bytes(b"PK\x03\x04" + os.urandom(4096))
    return {"whole": smollm2, "parts": parts, "corrupt": corrupt, "liar": liar, "notgguf": notgguf}


def make_repos(files: dict, cut_after: int | None = None) -> dict[str, HubRepo]:
    whole = files["whole"]
    return {
        "tf/SmolLM2-135M-GGUF": HubRepo(
            {C1: {"SmolLM2-135M-Q4_1.gguf": HubFile(whole, cut_after_bytes=cut_after),
                  "README.md": HubFile(Path(__file__))},
             C0: {"SmolLM2-135M-Q4_1.gguf": HubFile(whole)}},
            refs={"main": C1, "v0": C0}),
        "tf/SmolLM2-split-GGUF": HubRepo({C1: {p.name: HubFile(p) for p in files["parts"]}}, refs={"main": C1}),
        "tf/broken": HubRepo({C1: {
            # advertised with the good file's sha256, served with one byte flipped
            "corrupt-Q4_1.gguf": HubFile(files["corrupt"], sha256=sha256_of(whole)),
            "liar-Q4_1.gguf": HubFile(files["liar"]),
            "notgguf-Q4_1.gguf": HubFile(files["notgguf"]),
        }}, refs={"main": C1}),
        "tf/gated": HubRepo({C1: {"SmolLM2-135M-Q4_1.gguf": HubFile(whole)}}, refs={"main": C1}, token="hf_letmein"),
    }


@pytest.fixture
def hub(hub_files, monkeypatch, tmp_path):
    with LoopbackHub(make_repos(hub_files)) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def plan_models(models: list[str], tmp_path: Path):
    """Plan as `sweep submit` does: the YAML file read and checked, then models resolved."""
    from orchestrator.planning import plan
    from orchestrator.sweep import load_spec

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "hub", "models": models, "n_prompt": [16], "n_gen": [8],
                                    "repetitions": 1}))
    return plan(load_spec(path), base_dir=tmp_path, models_dir=None)


def test_planning_reads_a_few_mb_of_each_file_and_pins_the_commit(hub, hub_files, tmp_path):
    size = hub_files["whole"].stat().st_size
    jobs = plan_models(["hf://tf/SmolLM2-135M-GGUF:Q4_1"], tmp_path)
    assert {j.model for j in jobs} == {f"hf://tf/SmolLM2-135M-GGUF/SmolLM2-135M-Q4_1.gguf@{C1}"}
    job = jobs[0]
    assert job.model_source.revision == C1 and job.model_source.files[0].sha256 == sha256_of(hub_files["whole"])
    assert job.model_sha256 == job.model_source.files[0].sha256 and job.quant == "Q4_1"
    assert all(j.need_bytes > size for j in jobs)  # the estimate came from the header
    n_read = hub.bytes_sent["tf/SmolLM2-135M-GGUF/SmolLM2-135M-Q4_1.gguf"]
    assert 0 < n_read < size / 20, f"planning read {n_read} of {size} bytes"
    print(f"planning read {n_read} bytes of a {size}-byte file ({n_read / size:.1%})")


def test_a_revision_and_a_split_model(hub, hub_files, tmp_path):
    (old,) = {j.model for j in plan_models(["hf://tf/SmolLM2-135M-GGUF/SmolLM2-135M-Q4_1.gguf@v0"], tmp_path)}
    assert old.endswith(f"@{C0}")
    jobs = plan_models(["hf://tf/SmolLM2-split-GGUF:Q4_1"], tmp_path)
    source = jobs[0].model_source
    assert [f.name for f in source.files] == [p.name for p in hub_files["parts"]]
    from farm.modelfiles import combined_sha256

    assert jobs[0].model_sha256 == combined_sha256([sha256_of(p) for p in hub_files["parts"]])
    whole = plan_models(["hf://tf/SmolLM2-135M-GGUF:Q4_1"], tmp_path)[0]
    assert jobs[0].need_bytes == pytest.approx(whole.need_bytes, rel=0.01)  # one model, however cut
    total = sum(p.stat().st_size for p in hub_files["parts"])
    n_read = sum(n for k, n in hub.bytes_sent.items() if k.startswith("tf/SmolLM2-split-GGUF/"))
    assert n_read < total / 20


@pytest.mark.parametrize("ref, words", [
    ("hf://tf/nobody:Q4_1", "no such repository"),
    ("hf://tf/SmolLM2-135M-GGUF/other.gguf", "has no file 'other.gguf'"),
    ("hf://tf/SmolLM2-135M-GGUF:Q8_0", "no GGUF file for quant Q8_0; it offers Q4_1"),
    ("hf://tf/SmolLM2-135M-GGUF:Q4_1@v9", "no such revision"),
    ("hf://tf/broken/notgguf-Q4_1.gguf", "not a GGUF file"),
    ("hf://tf/broken/liar-Q4_1.gguf", "truncated"),
    ("hf://tf/gated:Q4_1", "HF_TOKEN"),
    ("hf://tf", "names no repository"),
])
def test_bad_hub_references_are_one_line_refusals(hub, tmp_path, ref, words):
    from orchestrator.sweep import SweepError

    with pytest.raises(SweepError) as exc:
        plan_models([ref], tmp_path)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_a_gated_repository_plans_with_the_token(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_letmein")
    assert plan_models(["hf://tf/gated:Q4_1"], tmp_path)[0].model_source.repo == "tf/gated"


def test_the_worker_fetches_resumes_verifies_and_reuses(hub_files, tmp_path, monkeypatch):
    from farm.modelfiles import model_sha256
    from worker.fetch import fetch_source

    size = hub_files["whole"].stat().st_size
    cut = size // 2
    with LoopbackHub(make_repos(hub_files, cut_after=cut)) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        cache = tmp_path / "hf-cache"
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        (job,) = {j.model: j for j in plan_models(["hf://tf/SmolLM2-135M-GGUF:Q4_1"], tmp_path)}.values()
        seen: list[tuple[int, int]] = []
        path = fetch_source(job.model_source, tmp_path / "models", progress=lambda d, t: seen.append((d, t)))
        key = "tf/SmolLM2-135M-GGUF/SmolLM2-135M-Q4_1.gguf"
        ranges = [r for k, r in server.ranges if k == key]
        n_planned = sum(int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-") for r in ranges
                                                         if r.startswith("bytes=") and not r.endswith("-")))
        # The first full GET was cut at half; the next asked from what had reached the disk, not from 0.
        resumed = [int(r.removeprefix("bytes=").rstrip("-")) for r in ranges if r.startswith("bytes=") and r.endswith("-")]
        assert len(resumed) == 1 and 0 < resumed[0] <= cut, ranges
        sent = server.bytes_sent[key]
        print(f"download cut at {cut} bytes, resumed from {resumed[0]}: {sent - n_planned} bytes sent for a "
              f"{size}-byte file (+{n_planned} read by planning)")
        assert sent - n_planned == cut + (size - resumed[0])  # only the unsaved tail of the cut was sent twice
        assert model_sha256(path) == job.model_sha256
        assert str(path).startswith(str(cache / "models--tf--SmolLM2-135M-GGUF" / "snapshots" / C1))
        assert seen and seen[-1] == (size, size)
        # A second fetch is served from the cache: no byte more.
        assert fetch_source(job.model_source, tmp_path / "models") == path
        assert server.bytes_sent[key] == sent


def test_a_file_that_does_not_match_its_sha256_is_quarantined_and_never_kept(hub, hub_files, tmp_path):
    from farm.contract import ModelSource, SourceFile
    from farm.modelfiles import ModelError
    from worker.fetch import fetch_source

    good_sha = sha256_of(hub_files["whole"])
    f = hub.repos["tf/broken"].commits[C1]["corrupt-Q4_1.gguf"]
    source = ModelSource(kind="hf", repo="tf/broken", revision=C1,
                         files=[SourceFile(name="corrupt-Q4_1.gguf", size_bytes=f.size_bytes, sha256=good_sha)])
    with pytest.raises(ModelError) as exc:
        fetch_source(source, tmp_path / "models")
    assert not exc.value.transient and "sha256" in str(exc.value) and "never measured" in str(exc.value)
    assert list((tmp_path / "models" / "quarantine").iterdir())
    snapshot = Path(os.environ["HF_HUB_CACHE"]) / "models--tf--broken" / "snapshots" / C1
    assert not (snapshot / "corrupt-Q4_1.gguf").exists()  # the cache does not keep it as good
    blobs = Path(os.environ["HF_HUB_CACHE"]) / "models--tf--broken" / "blobs"
    assert not (blobs / good_sha).exists()


def test_a_gated_download_names_hf_token(hub, hub_files, tmp_path):
    from farm.contract import ModelSource, SourceFile
    from farm.modelfiles import ModelError
    from worker.fetch import fetch_source

    whole = hub_files["whole"]
    source = ModelSource(kind="hf", repo="tf/gated", revision=C1, files=[
        SourceFile(name="SmolLM2-135M-Q4_1.gguf", size_bytes=whole.stat().st_size, sha256=sha256_of(whole))])
    with pytest.raises(ModelError) as exc:
        fetch_source(source, tmp_path / "models")
    assert "HF_TOKEN" in str(exc.value) and not exc.value.transient


def test_the_download_bound_evicts_only_what_the_farm_downloaded(hub, hub_files, tmp_path):
    from farm.contract import ModelSource, SourceFile
    from farm.modelfiles import ModelError
    from worker.fetch import fetch_source

    whole = hub_files["whole"]
    size = whole.stat().st_size
    cache = Path(os.environ["HF_HUB_CACHE"])
    # Somebody else's file in the cache (llama.cpp's, LM Studio's): never ours to delete.
    theirs = cache / "models--someone--else" / "blobs" / ("e" * 64)
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"x" * 1000)

    def source(revision: str) -> ModelSource:
        return ModelSource(kind="hf", repo="tf/SmolLM2-135M-GGUF", revision=revision, files=[
            SourceFile(name="SmolLM2-135M-Q4_1.gguf", size_bytes=size, sha256=sha256_of(whole))])

    models = tmp_path / "models"
    first = fetch_source(source(C1), models, max_bytes=int(size * 1.5))
    # v0 holds the same bytes under another commit: the cache shares the blob, the ledger counts both.
    second = fetch_source(source(C0), models, max_bytes=int(size * 1.5))
    assert second.exists() and theirs.exists()
    ledger = json.loads((models / "downloads.json").read_text())
    assert [e["revision"] for e in ledger] == [C0]  # the older download went to make room
    assert not first.exists()
    with pytest.raises(ModelError, match="TOKENFARM_MODELS_MAX_GB"):
        fetch_source(source(C1), models, max_bytes=size // 2)


def test_a_full_disk_is_a_clear_failure_before_any_byte(hub, hub_files, tmp_path, monkeypatch):
    """The check reads the file system's free space; here it is told the disk has 10 MB left."""
    import shutil as sh
    from collections import namedtuple

    from farm.contract import ModelSource, SourceFile
    from farm.modelfiles import ModelError
    from worker import fetch

    whole = hub_files["whole"]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**7, 10**7))
    source = ModelSource(kind="hf", repo="tf/SmolLM2-135M-GGUF", revision=C1, files=[
        SourceFile(name="SmolLM2-135M-Q4_1.gguf", size_bytes=whole.stat().st_size, sha256=sha256_of(whole))])
    with pytest.raises(ModelError, match="not enough disk") as exc:
        fetch.fetch_source(source, tmp_path / "models")
    assert "HF_HUB_CACHE" in str(exc.value)
    assert hub.bytes_sent["tf/SmolLM2-135M-GGUF/SmolLM2-135M-Q4_1.gguf"] == 0
    assert sh.disk_usage is not None


def ollama_store_with(store: Path, model_file: Path, name: str = "smollm2", tag: str = "135m") -> str:
    """Lay out a model as `ollama pull` leaves it: a blob named by digest, a manifest naming it."""
    sha = sha256_of(model_file)
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    os.link(model_file, blobs / f"sha256-{sha}") if not (blobs / f"sha256-{sha}").exists() else None
    template = b'{{ .Prompt }}'
    tsha = __import__("hashlib").sha256(template).hexdigest()
    (blobs / f"sha256-{tsha}").write_bytes(template)
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": f"sha256:{tsha}",
                   "size": len(template)},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{sha}",
             "size": model_file.stat().st_size},
            {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{tsha}", "size": len(template)},
        ],
    }
    path = store / "manifests" / "registry.ollama.ai" / "library" / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return sha


def test_an_ollama_model_is_planned_from_its_store_and_found_by_the_worker(smollm2, tmp_path, monkeypatch):
    from farm.sources import OllamaRef, ollama_model
    from orchestrator.sweep import SweepError
    from worker.fetch import fetch_source

    store = tmp_path / "ollama"
    shutil.copyfile(smollm2, tmp_path / "smol.gguf")
    sha = ollama_store_with(store, tmp_path / "smol.gguf")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert ollama_model(OllamaRef("smollm2", "135m")).sha256 == sha
    jobs = plan_models(["ollama://smollm2:135m"], tmp_path)
    assert {j.model for j in jobs} == {"ollama://smollm2:135m"} and jobs[0].model_sha256 == sha
    assert fetch_source(jobs[0].model_source, tmp_path / "models") == store / "blobs" / f"sha256-{sha}"
    with pytest.raises(SweepError, match=r"not pulled .* run `ollama pull qwen3:8b`"):
        plan_models(["ollama://qwen3:8b"], tmp_path)


def test_models_scan_lists_ollama_lm_studio_the_hf_cache_and_folders(hub, hub_files, smollm2, tmp_path):
    from worker.fetch import fetch_source

    env = service_env(tmp_path / "data")
    env["HOME"] = str(tmp_path / "home")
    store = tmp_path / "ollama"
    shutil.copyfile(smollm2, tmp_path / "smol.gguf")
    ollama_store_with(store, tmp_path / "smol.gguf")
    lms = tmp_path / "home" / ".lmstudio" / "models" / "lmstudio-community" / "SmolLM2-GGUF"
    lms.mkdir(parents=True)
    shutil.copyfile(smollm2, lms / "SmolLM2-135M-Q4_1.gguf")
    folder = tmp_path / "mine"
    folder.mkdir()
    for p in hub_files["parts"]:
        shutil.copyfile(p, folder / p.name)
    (job,) = {j.model: j for j in plan_models(["hf://tf/SmolLM2-135M-GGUF:Q4_1"], tmp_path)}.values()
    fetch_source(job.model_source, tmp_path / "models")
    env.update(OLLAMA_MODELS=str(store), HF_HUB_CACHE=os.environ["HF_HUB_CACHE"])
    proc = tokenfarm(env, "models", "scan", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["where"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == {"ollama", "lmstudio", "hf-cache", "folder"}, proc.stdout
    sha = sha256_of(smollm2)
    assert rows["ollama"]["model"] == "ollama://smollm2:135m" and rows["ollama"]["sha256"] == sha
    assert rows["hf-cache"]["model"] == f"hf://tf/SmolLM2-135M-GGUF/SmolLM2-135M-Q4_1.gguf@{C1}"
    assert rows["hf-cache"]["sha256"] == sha and rows["lmstudio"]["sha256"] == sha
    assert rows["folder"]["model"].endswith("-00001-of-00003.gguf")  # one model, not three
    assert rows["folder"]["n_params"] == rows["lmstudio"]["n_params"] > 100_000_000
    assert {r["arch"] for r in rows.values()} == {"llama"} and {r["quant"] for r in rows.values()} == {"Q4_1"}
    # Nothing was written into Ollama's store.
    assert sorted(p.name for p in (store / "blobs").iterdir()) == sorted(
        f"sha256-{s}" for s in (sha, __import__("hashlib").sha256(b"{{ .Prompt }}").hexdigest()))
    table = tokenfarm(env, "models", "scan", str(folder))
    print(table.stdout)
    assert "ollama://smollm2:135m" in table.stdout


def test_a_sweep_of_hub_models_runs_end_to_end_from_an_empty_cache(hub, hub_files, tmp_path, pg_url, redis_url):
    """Redis, PostgreSQL, a real worker whose Hugging Face cache starts empty."""
    from sqlalchemy import create_engine, text

    env = at_head(service_env(tmp_path / "data", pg_url, redis_url))
    cache = tmp_path / "worker-hf-cache"
    env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache), TOKENFARM_MODELS_DIR=str(tmp_path / "models"),
               TOKENFARM_HEARTBEAT_S="1")
    env.pop("HF_TOKEN", None)
    sweep = tmp_path / "hub.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "hub-e2e", "models": ["hf://tf/SmolLM2-135M-GGUF:Q4_1",
                                      "hf://tf/SmolLM2-split-GGUF/SmolLM2-135M-Q4_1-00001-of-00003.gguf"],
        "n_prompt": [16], "n_gen": [8], "repetitions": 2, "n_threads": [1]}))
    with worker_process(env, "hub-worker", tmp_path / "worker.log"):
        proc = tokenfarm(env, "sweep", "submit", str(sweep), "--wait", "--timeout", "400")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "worker.log").read_text()[-3000:]
    engine = create_engine(pg_url)
    with engine.connect() as c:
        rows = [r[0] for r in c.execute(text("SELECT result FROM results"))]
    engine.dispose()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    by_repo = {r["model_source"]["repo"]: r for r in rows}
    assert set(by_repo) == {"tf/SmolLM2-135M-GGUF", "tf/SmolLM2-split-GGUF"}
    whole, cut = by_repo["tf/SmolLM2-135M-GGUF"], by_repo["tf/SmolLM2-split-GGUF"]
    assert whole["model_source"]["revision"] == C1
    assert whole["model_source"]["files"][0]["name"] == "SmolLM2-135M-Q4_1.gguf"
    assert whole["model_sha256"] == sha256_of(hub_files["whole"])
    assert len(cut["model_source"]["files"]) == 3
    # The split model decodes the same tokens as the whole file: one model.
    outputs = {}
    for r in rows:
        outputs.setdefault(r["test"], set()).add(r["output_sha256"])
    assert all(len(v) == 1 for v in outputs.values()), outputs
    assert (cache / "models--tf--SmolLM2-135M-GGUF" / "snapshots" / C1 / "SmolLM2-135M-Q4_1.gguf").exists()
    # The worker announces both models it downloaded (the split one by its set's identity), so the
    # scheduler sends their next jobs to it first.
    from tests.integration.conftest import wait_until

    def announced() -> set[str]:
        e = create_engine(pg_url)
        with e.connect() as c:
            caps = c.execute(text("SELECT capabilities FROM workers WHERE name = 'hub-worker'")).scalar_one()
        e.dispose()
        return set(caps["models"])

    assert wait_until(lambda: {whole["model_sha256"], cut["source_sha256"]} <= announced(), 15), announced()
    for r in rows:
        print(f"{r['model']} {r['test']}: {r['avg_ts']:.1f} tok/s")


def test_a_hub_draft_travels_with_its_source(hub, hub_files, tmp_path):
    from orchestrator.planning import plan
    from orchestrator.sweep import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "hub-spec", "models": ["hf://tf/SmolLM2-135M-GGUF:Q4_1"],
        "draft_models": ["hf://tf/SmolLM2-split-GGUF:Q4_1"], "techniques": ["spec"], "n_draft": [2],
        "prompt_categories": ["code"], "n_prompt": [], "n_gen": [8], "repetitions": 1}))
    jobs = plan(load_spec(path), base_dir=tmp_path, models_dir=None)
    assert jobs and all(j.technique == "spec" for j in jobs)
    assert {j.draft_source.repo for j in jobs} == {"tf/SmolLM2-split-GGUF"}
    assert all(j.draft_model.startswith("hf://tf/SmolLM2-split-GGUF/") and j.draft_quant == "Q4_1" for j in jobs)
