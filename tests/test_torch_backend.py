"""The torch backend against plain transformers forwards, on tiny random float64 models:
Llama, and the sliding-window architectures it runs where the window spans the context
(Mistral, Gemma 2 with its alternating layers and soft-capped attention, Qwen2 with mixed
layers)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import perturbed
from specsplit import registry
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.hf_tokenizer import HFTokenizer, gguf_fingerprint, vocab_fingerprint
from specsplit.backends.torch_attention import EAGER
from specsplit.backends.torch_backend import TorchBackend, attention_mask, tree_layout
from specsplit.engine.speculative import GenerationRequest, SpeculativeEngine
from specsplit.errors import ConfigError, ModelError
from specsplit.proposers.draft_model import DraftModelProposer

V = 300
TOL = 1e-10


def tiny_model(seed: int = 0, attn: str = "sdpa", dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


WINDOWED = ("mistral", "gemma2", "gemma3", "qwen2")


def tiny_windowed(arch: str, window: int, seed: int = 0, dtype=torch.float64):
    """A tiny model of 64 positions with sliding-window layers: Mistral (every layer), Gemma 2
    (sliding and full layers alternate; soft-capped attention logits, no sdpa in
    transformers), Gemma 3 (alternating, with its own rope base on sliding layers) or Qwen2
    (two full layers, then two sliding ones)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=window,
        initializer_range=0.15,  # sharper than the default: drafts are sometimes rejected
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(**common))
    elif arch == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        model = Gemma2ForCausalLM(Gemma2Config(head_dim=16, **common))
    elif arch == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        layers = ["sliding_attention", "full_attention"] * 2
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, layer_types=layers, **common))
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(use_sliding_window=True, max_window_layers=2, **common)
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", params=["llama", *WINDOWED])
def backend(request) -> TorchBackend:
    """Llama, or a sliding-window model whose window (64) spans n_ctx (64): full attention."""
    if request.param == "llama":
        return TorchBackend(tiny_model(), ByteTokenizer(V))
    return TorchBackend(tiny_windowed(request.param, window=64), ByteTokenizer(V))


def tokens(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, V, n).tolist()


def chain(b: TorchBackend, toks: list[int]) -> np.ndarray:
    """Logits [n, V] of a fresh sequence fed toks in one call."""
    seq = b.new_sequence()
    out = b.forward(seq, toks)
    b.free_sequence(seq)
    return out


def no_cache(model: LlamaForCausalLM, toks: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([toks]), use_cache=False).logits[0].numpy()  # [n, V]


def path_to(parents: list[int], i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def test_chain_in_pieces_equals_full_forward(backend: TorchBackend) -> None:
    toks = tokens(30)
    seq = backend.new_sequence()
    pieces = [backend.forward(seq, toks[a:b]) for a, b in [(0, 7), (7, 8), (8, 20), (20, 30)]]
    assert backend.length(seq) == 30
    got = np.concatenate(pieces)  # [30, V]
    assert got.dtype == np.float64 and got.shape == (30, V)
    np.testing.assert_allclose(got, no_cache(backend.model, toks), rtol=0, atol=TOL)


def test_truncate_then_reforward(backend: TorchBackend) -> None:
    toks, other = tokens(20), tokens(6, seed=2)
    seq = backend.new_sequence()
    backend.forward(seq, toks[:12])
    backend.forward(seq, other)  # rejected continuation
    backend.truncate(seq, 12)
    assert backend.length(seq) == 12
    got = backend.forward(seq, toks[12:])
    np.testing.assert_allclose(got, chain(backend, toks)[12:], rtol=0, atol=TOL)
    backend.truncate(seq, 0)
    np.testing.assert_allclose(backend.forward(seq, toks[:5]), chain(backend, toks[:5]), atol=TOL)


def test_prefill_returns_last_row(backend: TorchBackend) -> None:
    toks = tokens(25)
    seq = backend.new_sequence()
    last = backend.prefill(seq, toks, chunk=8)
    np.testing.assert_allclose(last, no_cache(backend.model, toks)[-1], rtol=0, atol=TOL)


TREE_PARENTS = [-1, 0, 0, 1, 1, 2, -1, 6, 3]  # three roots' worth of branching


def test_tree_forward_equals_chain_of_each_path(backend: TorchBackend) -> None:
    prefix, tree = tokens(9), tokens(len(TREE_PARENTS), seed=3)
    seq = backend.new_sequence()
    backend.forward(seq, prefix)
    got = backend.forward(seq, tree, TREE_PARENTS)  # [n, V]
    assert backend.length(seq) == len(prefix) + len(tree)
    for i in range(len(tree)):
        path = [tree[j] for j in path_to(TREE_PARENTS, i)]
        want = chain(backend, prefix + path)[-1]
        np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-9, err_msg=f"node {i}")


def test_tree_on_empty_cache(backend: TorchBackend) -> None:
    tree = tokens(len(TREE_PARENTS), seed=4)
    seq = backend.new_sequence()
    got = backend.forward(seq, tree, TREE_PARENTS)
    for i in range(len(tree)):
        want = chain(backend, [tree[j] for j in path_to(TREE_PARENTS, i)])[-1]
        np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("leaf", [8, 5, 7, 4])  # paths [0,1,3,8], [0,2,5], [6,7], [0,1,4]
def test_keep_path_then_chain(backend: TorchBackend, leaf: int) -> None:
    prefix, tree, more = tokens(9), tokens(len(TREE_PARENTS), seed=3), tokens(5, seed=5)
    path = path_to(TREE_PARENTS, leaf)
    seq = backend.new_sequence()
    backend.forward(seq, prefix)
    backend.forward(seq, tree, TREE_PARENTS)
    backend.keep(seq, len(prefix), path)
    assert backend.length(seq) == len(prefix) + len(path)
    got = backend.forward(seq, more)
    want = chain(backend, prefix + [tree[j] for j in path] + more)[-len(more) :]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_chain_given_as_parents_equals_plain_chain(backend: TorchBackend) -> None:
    prefix, toks = tokens(4), tokens(6, seed=6)
    a, b = backend.new_sequence(), backend.new_sequence()
    backend.forward(a, prefix)
    backend.forward(b, prefix)
    np.testing.assert_allclose(
        backend.forward(a, toks, list(range(-1, 5))), backend.forward(b, toks), atol=TOL
    )


def test_forward_batch_equals_separate_forwards(backend: TorchBackend) -> None:
    prefixes = [tokens(3, 7), tokens(11, 8), [], tokens(6, 9)]
    items = [
        (tokens(4, 10), None),
        ([5], None),
        (tokens(2, 11), None),
        (tokens(len(TREE_PARENTS), 12), TREE_PARENTS),
    ]
    batch_seqs, ref_seqs = [], []
    for prefix in prefixes:
        s, r = backend.new_sequence(), backend.new_sequence()
        if prefix:
            backend.forward(s, prefix)
            backend.forward(r, prefix)
        batch_seqs.append(s)
        ref_seqs.append(r)
    got = backend.forward_batch([(s, t, p) for s, (t, p) in zip(batch_seqs, items)])
    want = [backend.forward(r, t, p) for r, (t, p) in zip(ref_seqs, items)]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-9)
    # the caches were split back correctly: a second batch (chains; one item empty) agrees
    more = [[7, 8], [7, 8], [], [7, 8]]
    got2 = backend.forward_batch([(s, m, None) for s, m in zip(batch_seqs, more)])
    for s, r, m, g in zip(batch_seqs, ref_seqs, more, got2):
        assert g.shape == (len(m), V)
        assert backend.length(s) == backend.length(r) + len(m)
        np.testing.assert_allclose(g, backend.forward(r, m), rtol=0, atol=1e-9)


def test_prefill_batch_equals_prefills_alone(backend: TorchBackend) -> None:
    """New prompts and a chunk of a half-prefilled one in one padded pass: each item's last
    logits [V] and its cache are those of a prefill alone."""
    prefixes = [[], tokens(9, 20), []]
    parts = [tokens(5, 21), tokens(12, 22), [7]]
    batch_seqs, ref_seqs = [], []
    for prefix in prefixes:
        s, r = backend.new_sequence(), backend.new_sequence()
        if prefix:
            backend.prefill(s, prefix)
            backend.prefill(r, prefix)
        batch_seqs.append(s)
        ref_seqs.append(r)
    got = backend.prefill_batch(list(zip(batch_seqs, parts)))
    want = [backend.prefill(r, p) for r, p in zip(ref_seqs, parts)]
    for s, r, g, w in zip(batch_seqs, ref_seqs, got, want):
        assert g.shape == (V,) and backend.length(s) == backend.length(r)
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-9)
        np.testing.assert_allclose(
            backend.forward(s, [3, 4]), backend.forward(r, [3, 4]), atol=1e-9
        )
    with pytest.raises(ConfigError, match="at least one token"):
        backend.prefill_batch([(batch_seqs[0], [1]), (batch_seqs[1], [])])
    assert backend.length(batch_seqs[0]) == backend.length(ref_seqs[0])  # unchanged


PROMPT = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 72, 101]


class TreeCounting(TorchBackend):
    """A torch backend that counts the token trees it is asked to forward."""

    trees = 0

    def forward(self, seq, tokens, parents=None):
        self.trees += parents is not None
        return super().forward(seq, tokens, parents)


@pytest.mark.parametrize("drafters", [1, 2], ids=["chains", "trees"])
@pytest.mark.parametrize("arch", WINDOWED)
def test_windowed_greedy_speculative_equals_greedy(arch: str, drafters: int) -> None:
    tok = ByteTokenizer(V)
    model = tiny_windowed(arch, window=64)
    target = TreeCounting(model, tok)
    req = GenerationRequest(PROMPT, max_new_tokens=40)
    reference = SpeculativeEngine(target).generate(req)  # plain greedy decoding
    drafts = [perturbed(model, 0.08, seed=1), perturbed(model, 0.3, seed=2)][:drafters]
    engine = SpeculativeEngine(
        target, [DraftModelProposer(TorchBackend(d, tok)) for d in drafts], k=3
    )
    res = engine.generate(req)
    assert res.token_ids == reference.token_ids
    st = res.stats
    assert st.target_passes < reference.stats.target_passes and st.rejected_rounds >= 1
    assert (target.trees > 0) == (drafters == 2)  # two drafters: rounds verified as trees


@pytest.mark.parametrize("arch", WINDOWED)
def test_window_narrower_than_context_is_refused(arch: str) -> None:
    model = tiny_windowed(arch, window=32)
    with pytest.raises(ConfigError) as err:
        TorchBackend(model, ByteTokenizer(V))  # n_ctx = 64 positions
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)  # transformers' name for it
    assert str(err.value) == (
        f"{model_type}: its attention window (32 tokens) is narrower than n_ctx=64, and the torch "
        "backend runs a window only where it spans the whole context; pass n_ctx <= 32"
    )
    b = TorchBackend(model, ByteTokenizer(V), n_ctx=32)
    seq, toks = b.new_sequence(), tokens(32)
    got = np.concatenate([b.forward(seq, toks[:20]), b.forward(seq, toks[20:])])
    np.testing.assert_allclose(got, no_cache(b.model, toks), rtol=0, atol=TOL)


def test_gemma2_runs_transformers_eager_attention_in_its_own_precision() -> None:
    toks = tokens(40)
    for dtype, atol in [(torch.float32, 0.0), (torch.float64, 1e-5)]:
        model = tiny_windowed("gemma2", window=64, dtype=dtype)
        assert model.config._attn_implementation == "eager"  # transformers has no sdpa for it
        want = no_cache(model, toks)  # transformers' eager: softmax in float32
        b = TorchBackend(model, ByteTokenizer(V))
        assert b.model.config._attn_implementation == EAGER
        seq = b.new_sequence()
        got = b.forward(seq, toks)
        # float32: op for op what eager computes; float64: eager's float32 softmax is the gap
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_model_without_sdpa_is_refused() -> None:
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=64,
        sliding_window=64,
    )
    with pytest.raises(ModelError) as err:
        TorchBackend(GptOssForCausalLM(cfg), ByteTokenizer(V))  # attention sinks: eager only
    assert str(err.value) == (
        "gpt_oss: transformers has no sdpa attention for this model, and the torch backend "
        "needs it to apply tree and batch masks exactly; use the llama.cpp backend"
    )


def test_load_folder_of_a_windowed_model(tmp_path: Path) -> None:
    model = tiny_windowed("gemma2", window=32)
    model.save_pretrained(tmp_path)
    small_hf_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"^gemma2: .* pass n_ctx <= 32$"):
        TorchBackend.load(str(tmp_path), dtype="float64")
    b = TorchBackend.load(str(tmp_path), dtype="float64", n_ctx=32)
    assert b.origin == "folder" and b.model.config._attn_implementation == EAGER
    seq = b.new_sequence()
    np.testing.assert_allclose(
        b.forward(seq, tokens(32)),
        chain(TorchBackend(model, ByteTokenizer(V), n_ctx=32), tokens(32)),
        rtol=0,
        atol=TOL,
    )


def test_attention_mask_layout() -> None:
    _, anc = tree_layout([-1, 0, -1])
    mask = attention_mask([2], [anc], torch.float64, torch.device("cpu"))  # [1, 1, 3, 5]
    allowed = (mask[0, 0] == 0).numpy()
    assert allowed.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, False, False, True],
    ]


def test_float32_model_gives_float32_logits_and_eager_is_switched_to_sdpa() -> None:
    b = TorchBackend(tiny_model(attn="eager", dtype=torch.float32), ByteTokenizer(V))
    assert b.model.config._attn_implementation == "sdpa"
    seq = b.new_sequence()
    out = b.forward(seq, tokens(5))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, no_cache(b.model, tokens(5)), atol=1e-5)


def test_bfloat16_pass_over_a_draft_stays_within_the_tie_tolerance_of_one_token_passes() -> None:
    """A bfloat16 target's logits depend on the pass's size; bench.ties calls a greedy
    difference a near tie below this tolerance, so it must bound the real difference."""
    from specsplit.bench.ties import tie_tolerance

    b = TorchBackend(tiny_model(dtype=torch.bfloat16), ByteTokenizer(V))
    seq = b.new_sequence()
    b.forward(seq, tokens(20))
    draft = tokens(8)
    batched = b.forward(seq, draft)  # [8, V], one pass
    b.truncate(seq, 20)
    single = np.stack([b.forward(seq, [t])[-1] for t in draft])  # [8, V], 8 passes
    assert batched.dtype == np.float32
    assert np.abs(batched - single).max() < tie_tolerance({"backend": "torch", "dtype": "bfloat16"})


def test_auto_dtype_is_bfloat16_on_cuda_and_on_amx_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from specsplit.backends import torch_backend
    from specsplit.backends.load import load_backend

    assert torch_backend.auto_dtype("cuda:0") == "bfloat16"
    for amx, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert torch_backend.auto_dtype("cpu") == want
    with pytest.raises(ConfigError, match="torch backend"):
        load_backend("llama.cpp", "smollm2-135m", dtype="bfloat16")  # before any load


def test_bad_input_raises(backend: TorchBackend) -> None:
    seq = backend.new_sequence()
    with pytest.raises(ConfigError):
        backend.forward(seq, [V])  # id out of range
    with pytest.raises(ConfigError):
        backend.forward(seq, [1, 2], [-1, 1])  # a parent must come before its child
    with pytest.raises(ConfigError):
        backend.forward(seq, [1, 2], [-1])
    with pytest.raises(ConfigError):
        backend.forward(seq, tokens(backend.n_ctx + 1))
    assert backend.length(seq) == 0
    backend.forward(seq, [1, 2, 3])
    with pytest.raises(ConfigError):
        backend.truncate(seq, 4)
    with pytest.raises(ConfigError):
        backend.keep(seq, 1, [2])
    with pytest.raises(ConfigError, match="only once"):
        backend.forward_batch([(seq, [1], None), (seq, [2], None)])
    other = backend.new_sequence()
    with pytest.raises(ConfigError, match=r"\(seq, tokens, parents\) triples"):
        backend.forward_batch([(seq, [1]), (other, [2])])
    with pytest.raises(ConfigError, match="out of range"):
        backend.forward_batch([(seq, [1], None), (other, [2, V], None)])
    assert (backend.length(seq), backend.length(other)) == (3, 0)
    backend.free_sequence(seq)
    with pytest.raises(ConfigError):
        backend.length(seq)


def test_n_ctx_limit() -> None:
    b = TorchBackend(tiny_model(), ByteTokenizer(V), n_ctx=10)
    seq = b.new_sequence()
    b.forward(seq, tokens(8))
    with pytest.raises(ConfigError, match="n_ctx"):
        b.forward(seq, tokens(3))
    assert b.length(seq) == 8
    b.forward(seq, tokens(2))


def test_load_rejects_bad_settings() -> None:
    with pytest.raises(ModelError, match="unknown model"):
        TorchBackend.load("no-such-model")
    with pytest.raises(ConfigError):
        TorchBackend.load("smollm2-135m", dtype="int3")
    with pytest.raises(ModelError, match="not found"):
        TorchBackend.load("/nonexistent/model.gguf")


SMALL_VOCAB = {"<|endoftext|>": 0, "<|im_end|>": 1, "<unk>": 2, "hello": 3, "world": 4}


def small_hf_tokenizer():
    """A transformers tokenizer over SMALL_VOCAB (whole words)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel(SMALL_VOCAB, unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", unk_token="<unk>"
    )


def test_hf_tokenizer_on_a_small_vocabulary() -> None:
    vocab = SMALL_VOCAB
    hf = small_hf_tokenizer()
    tok = HFTokenizer(hf)
    assert tok.vocab_size == 5 and tok.bos_token_id is None
    assert tok.eos_token_ids == {0, 1}  # eos plus the end-of-turn token in the vocabulary
    assert tok.encode("hello world") == [3, 4]
    assert tok.decode([3, 4]) == "hello world"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) is None
    assert tok.fingerprint() == vocab_fingerprint(list(vocab))
    assert HFTokenizer(hf, fingerprint="abc").fingerprint() == "abc"
    assert vocab_fingerprint(["a", "b"]) != vocab_fingerprint(["b", "a"])


# ---- integration: SmolLM2-135M from its GGUF ---------------------------------------------


@pytest.fixture
def fresh_cache(smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache dir holding only (links to) the fetched SmolLM2 GGUF: no converted weights."""
    src = smollm2_gguf
    monkeypatch.setenv("SPECSPLIT_CACHE", str(tmp_path))
    dest = registry.gguf_path("smollm2-135m")
    dest.parent.mkdir(parents=True)
    os.symlink(src, dest)
    os.symlink(src.with_suffix(".gguf.ok"), dest.with_suffix(".gguf.ok"))
    return src


def greedy(b: TorchBackend, prompt_ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    seq = b.new_sequence()
    first = b.forward(seq, prompt_ids)  # [len, V]
    logits, out = first[-1], []
    for _ in range(n):
        nxt = int(np.argmax(logits))
        if nxt in b.tokenizer.eos_token_ids:
            break
        out.append(nxt)
        logits = b.forward(seq, [nxt])[0]
    return out, first


@pytest.mark.integration
def test_smollm2_from_gguf(fresh_cache: Path) -> None:
    t0 = time.perf_counter()
    first = TorchBackend.load("smollm2-135m", threads=2)
    t1 = time.perf_counter()
    second = TorchBackend.load("smollm2-135m", threads=2)
    t2 = time.perf_counter()
    assert (first.origin, second.origin) == ("gguf", "cache")
    assert t2 - t1 < (t1 - t0) / 2, f"cached load {t2 - t1:.1f}s vs first {t1 - t0:.1f}s"
    converted = list((registry.cache_dir() / "converted").glob("*/model.safetensors"))
    assert len(converted) == 1

    tok = second.tokenizer
    assert tok.fingerprint() == first.tokenizer.fingerprint() == gguf_fingerprint(fresh_cache)
    assert tok.encode("<|im_end|>", add_special=False)[0] in tok.eos_token_ids
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    assert prompt is not None and "France" in prompt
    ids = tok.encode(prompt, add_special=False)

    out1, logits1 = greedy(first, ids, 10)
    out2, logits2 = greedy(second, ids, 10)
    np.testing.assert_allclose(logits1, logits2, rtol=0, atol=1e-5)
    assert out1 == out2 and len(out2) > 0
    text = tok.decode(out2)
    assert re.search(r"[A-Za-z]{3}", text), text
    assert "Paris" in text, text

    for s in ["Hello, world!", "def f(x):\n    return x * 2", "naïve café – ünïcödé 日本語"]:
        assert tok.decode(tok.encode(s, add_special=False)) == s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_linears_give_the_same_bits_and_leave_a_tied_head(dtype: torch.dtype) -> None:
    """Linear weights packed once for oneDNN (what ``load`` does for a CPU bfloat16 or float16
    model): chains, trees, batches and prefills give logits equal bit for bit to the unpacked
    model's; an lm_head tied to the embeddings stays a plain Linear (not held twice)."""
    import copy

    from specsplit.backends.torch_packed import PackedLinear, can_pack, pack_linears

    if not can_pack(tiny_model(dtype=dtype), torch.device("cpu")):
        pytest.skip("this PyTorch has no oneDNN packed linear")
    model = tiny_model(dtype=dtype)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    packed = copy.deepcopy(model)
    assert pack_linears(packed) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert type(packed.lm_head) is torch.nn.Linear
    assert isinstance(packed.model.layers[0].mlp.down_proj, PackedLinear)
    plain, fast = TorchBackend(model, ByteTokenizer(V)), TorchBackend(packed, ByteTokenizer(V))
    prompts = [[1, 5, 9, 2, 7], [3, 3, 8], [4, 11, 6, 2]]
    for b in (plain, fast):
        b.seqs = [b.new_sequence() for _ in prompts]
    firsts = [
        [b.prefill(s, p) for s, p in zip(b.seqs, prompts, strict=True)] for b in (plain, fast)
    ]
    assert all(np.array_equal(x, y) for x, y in zip(*firsts, strict=True))
    chain, tree = [10, 12, 14], ([20, 21, 22, 23], [-1, 0, 0, 1])
    outs = [
        [
            b.forward(b.seqs[0], chain),
            b.forward(b.seqs[1], tree[0], tree[1]),
            *b.forward_batch([(b.seqs[0], [5, 6], None), (b.seqs[2], [7, 8, 9], None)]),
        ]
        for b in (plain, fast)
    ]
    assert all(np.array_equal(x, y) for x, y in zip(*outs, strict=True))


@pytest.mark.integration
def test_a_bfloat16_load_packs_its_linears_and_keeps_its_identity(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SmolLM2 loaded in bfloat16 on CPU runs packed linears, with the identity of its
    weights as loaded (a replica that cannot pack names the same target) and the same
    greedy text: the prompt's pass equal bit for bit, one-token passes within the bfloat16
    tie tolerance (at one row PyTorch's own linear takes another kernel)."""
    from specsplit.backends import torch_backend
    from specsplit.backends.torch_packed import PackedLinear
    from specsplit.bench.ties import tie_tolerance

    packed = TorchBackend.load("smollm2-135m", threads=2, dtype="bfloat16")
    if not any(isinstance(m, PackedLinear) for m in packed.model.modules()):
        pytest.skip("this PyTorch has no oneDNN packed linear")
    monkeypatch.setattr(torch_backend, "can_pack", lambda *a: False)
    plain = TorchBackend.load("smollm2-135m", threads=2, dtype="bfloat16")
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    assert packed.identity() == plain.identity()
    ids = plain.tokenizer.encode("def fibonacci(n):", add_special=False)
    (out1, logits1), (out2, logits2) = greedy(packed, ids, 8), greedy(plain, ids, 8)
    assert out1 == out2 and np.array_equal(logits1[0], logits2[0])
    tol = tie_tolerance({"backend": "torch", "dtype": "bfloat16"})
    assert np.abs(logits1 - logits2).max() <= tol  # (0.5 measured: 4 ulps at 24)
