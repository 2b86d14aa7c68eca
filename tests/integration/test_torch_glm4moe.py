"""The torch engine on the project's MTP build (SmolLM2-135M and a trained head as a glm4moe GGUF
with one NextN layer, worker/mtp_export.py): it reads the trunk back as SmolLM2 exactly, drafts
with the file's own head as llama.cpp does at every draft position, and refuses a glm4moe file
of any other form."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.contract import EngineConfig
from farm.prompts import load_prompts
from worker.engines.base import EngineError
from worker.speculative import MTPDrafter, greedy, speculative

pytestmark = pytest.mark.integration

N_GEN = 32
CFG = EngineConfig(n_threads=1)
# Per draft position, pooled over the prompts: |torch - llama.cpp| acceptance at most this. The
# two run the same head on the same inputs in F32 and differ only in the order of float sums,
# which flips an argmax where the head is unsure (a few proposals in a hundred).
ACCEPTANCE_TOLERANCE = 0.05
# Of the passes where both engines proposed at a position, the share with the same token there.
# Past position 1 the head is unsure (flat distributions), so ties fall either way more often;
# feeding back the raw output instead of the normalised one agrees on about half.
AGREEMENT_MIN = (0.95, 0.75)


def _prompts(backend) -> list[list[int]]:
    return [backend.tokenize(backend.chat_prompt(text), add_bos=True, special=True)
            for category in ("code", "chat") for text in load_prompts(category, 1)]


def test_the_export_reads_back_as_its_parent_exactly(mtp_models):
    import torch

    from worker.engines.torch import TorchBackend
    from worker.engines.torch.gguf_loader import load_model, load_nextn_heads
    from worker.engines.torch.mtp import load_heads

    parent, export = load_model(mtp_models["f32"]), load_model(mtp_models["mtp"])
    want, got = parent.state_dict(), export.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []  # bit for bit: Q/K re-permuted
    assert export.output.weight is export.tok_embd.weight  # SmolLM2's tied output, tied again
    head = load_nextn_heads(mtp_models["mtp"], export)
    trained = load_heads(parent, mtp_models["f32"], 1)
    assert head.recursive and not trained.recursive
    saved, read = trained.heads.state_dict(), head.heads.state_dict()
    assert [k for k in saved if not torch.equal(saved[k], read[k])] == []  # columns swapped back, experts summed

    a, b = TorchBackend(), TorchBackend()
    a.load(mtp_models["f32"], CFG, 1024)
    b.load(mtp_models["mtp"], CFG, 1024)
    try:
        for prompt in _prompts(a):
            assert greedy(b, prompt, N_GEN).tokens == greedy(a, prompt, N_GEN).tokens
    finally:
        a.close()
        b.close()


class Recording:
    """An MTP context that keeps every proposal it makes, by the length of the sequence it followed."""

    def __init__(self, inner) -> None:
        self.inner, self.proposals = inner, {}

    def start(self, position, hidden=None):
        self.inner.start(position)

    def add_hidden(self, position, hidden):
        self.inner.add_hidden(position, hidden)

    def propose(self, seq, n, p_min=0.0):
        out = self.inner.propose(seq, n, p_min)
        self.proposals[len(seq)] = out
        return out


@pytest.mark.parametrize("n_mtp", [1, 2])
def test_torch_mtp_on_the_export_drafts_as_llamacpp_at_each_position(mtp_models, n_mtp):
    from worker.engines.llamacpp_mtp import LlamaCppMTPBackend
    from worker.engines.torch import TorchBackend

    lc, tb = LlamaCppMTPBackend(), TorchBackend()
    lc.load(mtp_models["mtp"], CFG, 1024)
    # Nothing lies beside the export: the torch engine can only be drafting with the file's head.
    tb.load(mtp_models["mtp"], CFG, 1024)
    try:
        counts = {name: [[0, 0] for _ in range(n_mtp)] for name in ("lc", "torch")}  # [accepted, drafted]
        same, both = [0] * n_mtp, [0] * n_mtp
        for prompt in _prompts(lc):
            want = greedy(lc, prompt, N_GEN).tokens
            runs = {}
            for name, backend in (("lc", lc), ("torch", tb)):
                rec = Recording(backend.mtp_context(n_mtp))
                run = speculative(backend, MTPDrafter(backend, rec, n_mtp), prompt, N_GEN)
                assert run.tokens == want, name  # lossless on both engines
                for i in range(n_mtp):
                    counts[name][i][0] += run.accepted_at[i]
                    counts[name][i][1] += run.drafted_at[i]
                runs[name] = rec.proposals
            for n_seq, p in runs["lc"].items():
                q = runs["torch"].get(n_seq)
                for i in range(min(len(p), len(q or []))):
                    both[i] += 1
                    same[i] += p[i] == q[i]
        acceptance = {name: [a / d if d else 0.0 for a, d in c] for name, c in counts.items()}
        assert all(d > 0 for _, d in counts["torch"]) and acceptance["lc"][0] > 0, acceptance  # not zeros against zeros
        for i in range(n_mtp):
            assert abs(acceptance["torch"][i] - acceptance["lc"][i]) <= ACCEPTANCE_TOLERANCE, (i + 1, acceptance)
            assert both[i] >= N_GEN // 2 and same[i] / both[i] >= AGREEMENT_MIN[i], (i + 1, same, both)
    finally:
        lc.close()
        tb.close()


def _rewrite(src: Path, dst: Path, fields: dict | None = None, add: dict | None = None) -> Path:
    """A copy of src's header with some of its fields changed, and its final norm and first
    block's attention as the only tensors (each refusal is made from the header and the tensor
    names, before any weight is read), plus the `add` tensors (name -> numpy array)."""
    import gguf

    fields = dict(fields or {})
    reader = gguf.GGUFReader(str(src), "r")
    writer = gguf.GGUFWriter(str(dst), arch="glm4moe")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, fields.pop(key, field.contents()), vtype, sub)
    assert not fields, f"the export has no {', '.join(fields)} to change"
    for t in reader.tensors:
        if t.name == "output_norm.weight" or t.name.startswith("blk.0.attn"):
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    for name, value in (add or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_glm4moe_files_of_another_form_are_refused(mtp_models, tmp_path):
    import numpy as np

    from worker.engines.torch import TorchBackend
    from worker.engines.torch.gguf_loader import GGUFError, load_model, load_nextn_heads

    src = mtp_models["mtp"]
    cases = {
        # GLM-4.5's trunk: dense layers first, MoE layers after.
        "moe-trunk": ({"glm4moe.leading_dense_block_count": 1}, {}, r"has 29 MoE trunk layer\(s\) \(leading_dense_block_count 1 of 30"),
        "biases": ({}, {"blk.0.attn_q.bias": np.zeros(576, np.float32)}, r"Q/K/V biases or fused QKV \(attn_q\.bias\)"),
        "qk-norms": ({}, {"blk.0.attn_k_norm.weight": np.ones(64, np.float32)}, r"Q/K norms \(attn_k_norm\.weight\)"),
        "partial-rotary": ({"glm4moe.rope.dimension_count": 32}, {}, "rotates 32 of 64 dimensions per head"),
    }
    for name, (fields, add, message) in cases.items():
        path = _rewrite(src, tmp_path / f"{name}.gguf", fields, add)
        with pytest.raises(GGUFError, match=message):
            load_model(path)
    # Through the engine, the reason reaches the job's error.
    backend = TorchBackend()
    with pytest.raises(EngineError, match="torch could not load .* MoE trunk layer"):
        backend.load(tmp_path / "moe-trunk.gguf", CFG, 256)

    # The trunk reads, the NextN layer does not: a router that weighs its one expert by sigmoid
    # (glm4moe's default gating) is not the dense FFN the experts' halves sum to.
    trunk = load_model(src)
    sigmoid = _rewrite(src, tmp_path / "sigmoid.gguf", {"glm4moe.expert_gating_func": 2})
    with pytest.raises(GGUFError, match=r"routes to 1 of 1 experts \(gating function 2"):
        load_nextn_heads(sigmoid, trunk)
    two = _rewrite(src, tmp_path / "two-nextn.gguf", {"glm4moe.nextn_predict_layers": 2,
                                                       "glm4moe.leading_dense_block_count": 29})
    with pytest.raises(GGUFError, match="2 NextN layers; .* with exactly one"):
        load_nextn_heads(two, trunk)
