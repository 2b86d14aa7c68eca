"""MTP on the llama.cpp engine, on a real MTP build (SmolLM2-135M + a head, as glm4moe with a
NextN layer): the exported trunk decodes as SmolLM2 does, MTP decoding is lossless, llama.cpp's
NextN layer proposes what the torch engine's head proposes, and bad files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.contract import EngineConfig, Job
from farm.modelfiles import ModelError
from farm.prompts import load_prompts
from tests.integration.conftest import MODELS_DIR
from worker.engines.base import EngineError
from worker.speculative import MTPDrafter, greedy, speculative

pytestmark = pytest.mark.integration

N_GEN = 24
CFG = EngineConfig(n_threads=1)


def _prompt(backend, category: str = "code") -> list[int]:
    return backend.tokenize(backend.chat_prompt(load_prompts(category, 1)[0]), add_bos=True, special=True)


def test_exported_trunk_decodes_as_smollm2(mtp_models):
    from worker.engines.llamacpp import LlamaCppBackend
    from worker.engines.llamacpp_mtp import LlamaCppMTPBackend

    plain, mtp = LlamaCppBackend(), LlamaCppMTPBackend()
    plain.load(mtp_models["f32"], CFG, 1024)
    mtp.load(mtp_models["mtp"], CFG, 1024)
    try:
        for category in ("code", "chat"):
            prompt = _prompt(plain, category)
            assert _prompt(mtp, category) == prompt  # the tokenizer travelled with the export
            assert greedy(mtp, prompt, N_GEN).tokens == greedy(plain, prompt, N_GEN).tokens
    finally:
        plain.close()
        mtp.close()


class Recording:
    """An MTP context that keeps every proposal it makes."""

    def __init__(self, inner) -> None:
        self.inner, self.proposals = inner, []

    def start(self, position, hidden=None):
        self.inner.start(position)

    def add_hidden(self, position, hidden):
        self.inner.add_hidden(position, hidden)

    def propose(self, seq, n, p_min=0.0):
        out = self.inner.propose(seq, n, p_min)
        self.proposals.append((len(seq), out))
        return out


def test_mtp_is_lossless_and_proposes_what_the_torch_head_proposes(mtp_models):
    from worker.engines.llamacpp_mtp import LlamaCppMTPBackend
    from worker.engines.torch import TorchBackend

    lc = LlamaCppMTPBackend()
    lc.load(mtp_models["mtp"], CFG, 1024)
    tb = TorchBackend()
    tb.load(mtp_models["f32"], CFG, 1024)
    try:
        prompt = _prompt(lc)
        want = greedy(lc, prompt, N_GEN).tokens
        for n_mtp in (1, 3):  # 3: the one NextN layer recursing past itself
            run = speculative(lc, MTPDrafter(lc, lc.mtp_context(n_mtp), n_mtp), prompt, N_GEN)
            assert run.tokens == want
            assert run.n_drafted > 0
        lc_rec = Recording(lc.mtp_context(1))
        tb_rec = Recording(tb.mtp_context(1))
        lc_run = speculative(lc, MTPDrafter(lc, lc_rec, 1), prompt, N_GEN)
        tb_run = speculative(tb, MTPDrafter(tb, tb_rec, 1), prompt, N_GEN)
        assert lc_run.tokens == tb_run.tokens == want
        by_len = dict(tb_rec.proposals)
        shared = [(k, p) for k, p in lc_rec.proposals if k in by_len]
        assert len(shared) >= N_GEN // 2
        agree = sum(p == by_len[k] for k, p in shared) / len(shared)
        # Same head, same inputs; F32 on both engines, only the order of float sums differs.
        assert agree >= 0.9, (agree, shared[:5])
    finally:
        lc.close()
        tb.close()


def test_a_job_on_the_mtp_build_fills_the_speculation_block(mtp_models):
    from farm.settings import Settings
    from worker.tasks import execute

    job = Job(job_id="mtp-lc-1", sweep_id="s", index=0, model="smollm2-135m-mtp", quant="F16", engine="llamacpp",
              technique="mtp", kind="tg", n_gen=16, n_mtp=2, prompt_category="code", n_prompts=1, repetitions=1,
              n_warmup=0, config=CFG)
    result = execute(job, Settings(models_dir=mtp_models["root"]))
    assert result.status == "ok", result.error
    spec = result.speculation
    assert spec is not None and len(spec.acceptance_by_position) == 2
    assert spec.n_drafted > 0 and spec.draft_ns > 0 and spec.verify_ns > 0
    # F16 stayed lossless on every category measured; Q8_0 did not (its activations are quantized
    # per batch, so a verify batch rounds differently from single-token steps).
    assert spec.first_mismatch == [None]


def test_plain_file_asked_for_llamacpp_mtp_is_refused(mtp_models):
    from worker.engines.llamacpp_mtp import LlamaCppMTPBackend

    with pytest.raises(EngineError, match="this file carries no MTP layers"):
        LlamaCppMTPBackend().load(mtp_models["f32"], CFG, 1024)


def test_missing_or_truncated_nextn_tensors_are_refused(mtp_models, tmp_path):
    import gguf

    from farm.modelfiles import read_facts
    from worker.engines.llamacpp_mtp import LlamaCppMTPBackend

    # Truncated: the header promises tensor data the file no longer holds.
    cut = tmp_path / "cut.gguf"
    size = mtp_models["mtp"].stat().st_size
    with mtp_models["mtp"].open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(size - 4_000_000))
    with pytest.raises(ModelError, match="truncated"):
        read_facts(cut)
    # Missing: the header declares a NextN layer, its tensors are gone.
    reader = gguf.GGUFReader(str(mtp_models["mtp"]), "r")
    writer = gguf.GGUFWriter(str(tmp_path / "no-nextn.gguf"), arch="glm4moe")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    for t in reader.tensors:
        if not t.name.startswith("blk.30."):
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EngineError, match="lacks blk.30.nextn.eh_proj.weight"):
        LlamaCppMTPBackend().load(tmp_path / "no-nextn.gguf", CFG, 1024)


def test_context_too_small_for_prompt_and_drafts(mtp_models):
    from worker.engines.llamacpp_mtp import LlamaCppMTPBackend

    lc = LlamaCppMTPBackend()
    lc.load(mtp_models["mtp"], CFG, 256)
    try:
        prompt = (_prompt(lc) * 10)[:240]  # 240 + 24 tokens and their drafts: past 256
        with pytest.raises(EngineError, match=r"(do not fit the context of 256|more than the MTP context.s 256): raise n_ctx"):
            speculative(lc, MTPDrafter(lc, lc.mtp_context(8), 8), prompt, 24)
    finally:
        lc.close()


def test_provenance_names_the_head(mtp_models):
    prov = json.loads(Path(str(mtp_models["mtp"]) + ".provenance.json").read_text())
    assert prov["parent"] == "smollm2-135m" and prov["heads_sha256"]
    assert MODELS_DIR  # the shared folder is never written by these tests
