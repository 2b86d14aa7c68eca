"""MTP on the llama.cpp engine: a GGUF's NextN layers drafting for its own trunk.

Owns what llama-cpp-python 0.3.36's bindings lack for the MTP path (the staging functions of
llama.cpp's src/llama-ext.h, exported from libllama with C++ linkage, so bound here by their
mangled names), the target backend that keeps its hidden states (`last_hidden`), and the MTP
context (`LlamaMTPContext`) that worker/speculative.py's MTPDrafter drives exactly as it drives
the torch engine's heads: start(position), add_hidden(position, rows), propose(seq, n, p_min).

One model is loaded with its NextN tensors; two contexts share it: the target's (default type,
emitting every row's final normalised hidden state, `h_nextn`) and the MTP context
(LLAMA_CONTEXT_TYPE_MTP, running only the NextN graph, with a KV cache of its own).

Alignment (the invariant). The NextN row at MTP position p + 1 reads the target's hidden state
of position p and the token at p + 1, and predicts the token at p + 2. Rows whose token and
hidden state are both committed are final and are never recomputed; a pass first writes the
rows committed since the last one (1 + the accepted drafts), the last of which gives the first
proposal, then recurses: proposal k is fed back with the NextN block's own `h_nextn` of the row
before (as llama.cpp's draft-mtp does past the number of NextN layers). Draft rows are removed
from the MTP cache before the next pass writes over their positions.

It knows nothing of jobs, timers or the loop.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np

from farm.contract import EngineConfig
import worker.engines.llamacpp_levers as levers
from worker.engines.base import EngineError
from worker.engines.llamacpp import LlamaCppBackend

_LIB = llama_cpp.llama_cpp._lib
# llama-ext.h declares these without extern "C"; the names are the Itanium ABI's for
# (llama_context *, bool, bool), (llama_context *), (llama_context *, int).
_SYMBOLS = {
    "set_embeddings_nextn": "_Z26llama_set_embeddings_nextnP13llama_contextbb",
    "get_embeddings_nextn": "_Z26llama_get_embeddings_nextnP13llama_context",
    "get_embeddings_nextn_ith": "_Z30llama_get_embeddings_nextn_ithP13llama_contexti",
    "set_nextn_layer_offset": "_Z28llama_set_nextn_layer_offsetP13llama_contexti",
}


def _bind(name: str, argtypes: list, restype):
    try:
        fn = getattr(_LIB, _SYMBOLS[name])
    except AttributeError as exc:
        raise EngineError(f"this libllama ({llama_cpp.__version__}) does not export {name}: "
                          "the llama.cpp engine's MTP needs llama-cpp-python 0.3.36's") from exc
    fn.argtypes, fn.restype = argtypes, restype
    return fn


_ctx_p = ctypes.c_void_p
set_embeddings_nextn = _bind("set_embeddings_nextn", [_ctx_p, ctypes.c_bool, ctypes.c_bool], None)
get_embeddings_nextn = _bind("get_embeddings_nextn", [_ctx_p], ctypes.POINTER(ctypes.c_float))
get_embeddings_nextn_ith = _bind("get_embeddings_nextn_ith", [_ctx_p, ctypes.c_int32], ctypes.POINTER(ctypes.c_float))
set_nextn_layer_offset = _bind("set_nextn_layer_offset", [_ctx_p, ctypes.c_int32], None)


# What every NextN block needs to draft at all (the rest of its tensors llama.cpp checks itself).
_NEXTN_TENSORS = ("nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "attn_norm.weight")


def n_nextn_layers(path: Path) -> int:
    """NextN layers the file's header declares (0 for a file without MTP layers), after checking
    that their tensors are in the file: llama.cpp loads a glm4moe file whose NextN tensors are
    absent as a trunk-only part without a word, and its MTP context would then fail mid-job."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    arch = reader.fields["general.architecture"].contents()
    f = reader.fields.get(f"{arch}.nextn_predict_layers")
    n = int(f.contents()) if f is not None else 0
    if n > 0:
        n_all = int(reader.fields[f"{arch}.block_count"].contents())
        names = {t.name for t in reader.tensors}
        missing = [f"blk.{i}.{t}" for i in range(n_all - n, n_all) for t in _NEXTN_TENSORS if f"blk.{i}.{t}" not in names]
        if missing:
            raise EngineError(f"{path} declares {n} NextN layer(s) but lacks {', '.join(missing[:3])}: a trunk-only "
                              "part or a broken export; fetch or export the MTP build again")
    return n


class LlamaCppMTPBackend(LlamaCppBackend):
    """The llama.cpp target of an MTP GGUF: its hidden states after each pass, and its MTP context."""

    name = "llamacpp"

    # The worker loads a model and makes contexts apart (model reuse across context-level changes):
    # the NextN checks go with the model, the hidden-state outputs with each context.
    def load_model(self, path: Path, config: EngineConfig) -> None:
        n_layers = n_nextn_layers(path)
        if n_layers <= 0:
            raise EngineError("this file carries no MTP layers; use engine torch with trained heads, or an MTP build of the model")
        self._n_layers_file = n_layers
        self._load_mtp = True
        super().load_model(path, config)
        self._path, self._config = Path(path), config
        if int(llama_cpp.llama_model_n_layer_nextn(self._model)) <= 0:
            raise EngineError(f"llama.cpp loaded {path} without its NextN layers: the file's MTP tensors are missing")

    def new_context(self, config: EngineConfig, n_ctx: int) -> None:
        if getattr(self, "_mtp", None) is not None:
            self._mtp.close()  # a context of the old target context's model state
        super().new_context(config, n_ctx)
        self._config, self._n_ctx = config, n_ctx
        n_layers = self._n_layers_file
        # Every row's hidden state, not only the rows that ask for logits: the MTP context reads them all.
        set_embeddings_nextn(self._ctx, True, False)
        self._n_embd = int(llama_cpp.llama_model_n_embd_out(self._model))
        self._hidden_chunks: list[np.ndarray] = []
        self._n_last = 0
        self._mtp: LlamaMTPContext | None = None
        self._conditions["flags"]["n_nextn_layers"] = n_layers

    def _model_params(self):
        mparams = super()._model_params()
        mparams.load_mtp = True
        return mparams

    def _after_chunk(self, n_tokens: int, last_chunk: bool) -> None:
        # Rows of earlier chunks of one call are overwritten by the next llama_decode: kept.
        if not last_chunk:
            ptr = get_embeddings_nextn(self._ctx)
            self._hidden_chunks.append(np.ctypeslib.as_array(ptr, shape=(n_tokens, self._n_embd)).copy())
        else:
            self._n_last = n_tokens

    def _before_call(self) -> None:
        self._hidden_chunks = []

    def last_hidden(self) -> np.ndarray:
        """(T, E) the final normalised hidden state of every position of the last call."""
        ptr = get_embeddings_nextn(self._ctx)
        if not ptr:
            raise EngineError("llama.cpp returned no hidden states: the context was not set to emit them")
        last = np.ctypeslib.as_array(ptr, shape=(self._n_last, self._n_embd))
        return np.concatenate([*self._hidden_chunks, last]) if self._hidden_chunks else last

    def mtp_context(self, n_mtp: int, base_sha256: str | None = None) -> LlamaMTPContext:
        if n_mtp <= 0:
            raise EngineError(f"n_mtp is {n_mtp}: draft at least one token")
        if self._mtp is None:
            self._mtp = LlamaMTPContext(self, self._n_ctx)
        return self._mtp

    def close(self) -> None:
        if getattr(self, "_mtp", None) is not None:
            self._mtp.close()
            self._mtp = None
        super().close()


class LlamaMTPContext:
    """The NextN layer's running state for one sequence (see the module docstring's invariant)."""

    def __init__(self, target: LlamaCppMTPBackend, n_ctx: int) -> None:
        self.target, self.n_ctx = target, n_ctx
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = target._n_batch
        cparams.n_ubatch = min(target._config.n_ubatch, target._n_batch)
        n_threads = target._conditions["n_threads"]
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
        cparams.n_rs_seq = 0
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(target._model, cparams)
        if not ctx:
            raise EngineError(f"out of memory: llama.cpp could not allocate an MTP context of {n_ctx} tokens; lower the context")
        self._ctx = ctx
        # The target's pool: the two contexts compute in turn, so one set of threads serves both.
        config = target._config
        self._pool = levers.shared_threadpool(n_threads, config.cpu_mask, config.cpu_strict, config.poll, config.prio)
        self._pool.attach(ctx)
        # The NextN block's own hidden state of each output row: the input of the next draft step.
        set_embeddings_nextn(ctx, True, True)
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_ext_init(ctx)
        self._n_batch = int(cparams.n_batch)
        self._n_vocab = target.n_vocab
        self._E = target._n_embd
        self.hidden = np.zeros((n_ctx, self._E), dtype=np.float32)  # (S, E) by slot
        self.first = self.n_hidden = self.n_final = 0
        self._pos = (llama_cpp.llama_pos * 1)()

    def start(self, position: int, hidden=None) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)
        self.first, self.n_hidden, self.n_final = position, 0, 0
        if hidden is not None and len(hidden):
            self.add_hidden(position, hidden)

    def add_hidden(self, position: int, hidden) -> None:
        """hidden (T, E): the target's hidden states of committed positions [position, position + T)."""
        slot = position - self.first
        if slot > self.n_hidden or slot < 0:
            raise ValueError(f"hidden states from position {position}, but the MTP context holds {self.first + self.n_hidden}")
        end = slot + len(hidden)
        if end + 1 > self.n_ctx:
            raise EngineError(f"position {position + len(hidden)} does not fit an MTP context of {self.n_ctx}: raise n_ctx")
        self.hidden[slot:end] = hidden
        self.n_hidden = end
        self.n_final = min(self.n_final, slot)

    def _run(self, rows: list[tuple[int, int, np.ndarray]]) -> int:
        """Write rows (token, MTP position, hidden (E,)) in batches; logits for the last. Returns its batch index."""
        b = self._batch
        for start in range(0, len(rows), self._n_batch):
            chunk = rows[start:start + self._n_batch]
            llama_cpp.llama_batch_ext_clear(b)
            keep = []  # the batch holds views of these rows until llama_process returns
            for i, (tok, pos, h) in enumerate(chunk):
                idx = llama_cpp.llama_batch_ext_add_token(b, 0, tok)
                if idx < 0:
                    raise EngineError(f"the MTP batch refused token {tok} (code {idx})")
                self._pos[0] = pos
                llama_cpp.llama_batch_ext_set_pos(b, idx, self._pos)
                row = np.ascontiguousarray(h, dtype=np.float32)
                keep.append(row)
                embd = llama_cpp.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self._E)
                if not llama_cpp.llama_batch_ext_set_embd_token(b, idx, embd):
                    raise EngineError("the MTP batch refused a hidden-state row")
                if start + i == len(rows) - 1:
                    llama_cpp.llama_batch_ext_set_output_logits(b, idx, True)
            rc = llama_cpp.llama_process(self._ctx, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, b)
            if rc != 0:
                raise EngineError(f"the MTP context failed with code {rc} at position {chunk[0][1]}: context full or out of memory")
        llama_cpp.llama_synchronize(self._ctx)
        return len(rows) - 1 - start

    def _argmax(self, idx: int, p_min: float) -> tuple[int, bool]:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, idx), shape=(self._n_vocab,))
        best = int(logits.argmax())
        if p_min > 0.0:
            top = float(logits[best])
            if 1.0 / float(np.exp(logits.astype(np.float64) - top).sum()) < p_min:
                return best, False
        return best, True

    def propose(self, seq: Sequence[int], n: int, p_min: float = 0.0) -> list[int]:
        end = self.n_hidden
        L = self.first + end + 1
        if len(seq) != L:
            raise ValueError(f"{len(seq)} tokens, but hidden states for {L - 1} positions: the MTP context is out of step")
        if n <= 0 or end == 0:
            return []
        if L + n > self.n_ctx:
            raise EngineError(f"prompt and drafts need {L + n} positions, more than the MTP context's {self.n_ctx}: raise n_ctx")
        lo = min(self.n_final, end - 1)
        # Drop the draft rows of the last pass (and anything past lo): their positions are rewritten now.
        llama_cpp.llama_memory_seq_rm(self._mem, 0, self.first + lo + 1, -1)
        rows = [(int(seq[self.first + s + 1]), self.first + s + 1, self.hidden[s]) for s in range(lo, end)]
        idx = self._run(rows)
        self.n_final = end
        drafts: list[int] = []
        pos = L - 1
        while True:
            tok, ok = self._argmax(idx, p_min)
            if not ok:
                break
            drafts.append(tok)
            if len(drafts) >= n:
                break
            h = np.ctypeslib.as_array(get_embeddings_nextn_ith(self._ctx, idx), shape=(self._E,)).copy()
            pos += 1
            idx = self._run([(tok, pos, h)])
        return drafts

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_ext_free(self._batch)
            self._batch = None
        if self._ctx:
            levers.release_threadpool(self._pool, self._ctx)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

