"""The NumPy reference backend: exact against transformers on tiny float64 models, cache
editing and token trees, GGUF reading; and against transformers on SmolLM2-135M's GGUF."""

from __future__ import annotations

import copy
import time
import types

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.numpy_backend import NumpyBackend, read_gguf
from specsplit.backends.numpy_model import Transformer
from specsplit.errors import ConfigError, ModelError

V = 300
RNG = np.random.default_rng(1234)
TOKENS = [int(t) for t in RNG.integers(0, V, size=40)]


def tiny_qwen2(seed: int = 0):
    """A random Qwen2ForCausalLM (QKV biases, tied embeddings), float64."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.15,
        rope_theta=5000.0,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():  # Qwen2 initialises its biases to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    """(transformers model, NumpyBackend copy of it), float64."""
    model = tiny_llama(vocab=V, seed=3) if request.param == "llama" else tiny_qwen2(seed=4)
    model.set_attn_implementation("sdpa")  # eager softmaxes in float32
    return model, NumpyBackend.from_torch(model, ByteTokenizer(V))


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    """Logits [n, V] of the whole sequence, no cache."""
    with torch.no_grad():
        return model(torch.tensor([tokens]), use_cache=False).logits[0].numpy()


def float64_internals(model):
    """A copy of model whose RMSNorm statistics and rope tables are float64 too
    (transformers computes both in float32 even in a float64 model)."""
    m = copy.deepcopy(model)
    cfg = m.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"]

    def norm(self, x):
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    def rope(self, x, position_ids):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = position_ids[..., None].double() * inv_freq  # [1, n, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [1, n, D]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for mod in m.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = types.MethodType(norm, mod)
        elif type(mod).__name__.endswith("RotaryEmbedding"):
            mod.forward = types.MethodType(rope, mod)
    return m


def chain(backend: NumpyBackend, tokens: list[int]) -> np.ndarray:
    """Logits [n, V] of tokens in a fresh sequence (freed afterwards)."""
    seq = backend.new_sequence()
    try:
        return backend.forward(seq, tokens)
    finally:
        backend.free_sequence(seq)


# ---- against transformers --------------------------------------------------------------


def test_logits_equal_transformers(tiny):
    model, backend = tiny
    ours = chain(backend, TOKENS)  # [40, V]
    assert ours.shape == (len(TOKENS), V) and ours.dtype == np.float64
    exact = hf_logits(float64_internals(model), TOKENS)
    assert np.abs(exact).max() > 1.0  # logits are not all ~0
    assert np.abs(ours - exact).max() < 1e-9
    # stock transformers differs only by its float32 RMSNorm / rope tables
    assert np.abs(ours - hf_logits(model, TOKENS)).max() < 1e-4


def test_float32_copy_close(tiny):
    model, _ = tiny
    backend32 = NumpyBackend.from_torch(model, ByteTokenizer(V), dtype=np.float32)
    ours = chain(backend32, TOKENS)
    assert ours.dtype == np.float32
    assert np.abs(ours - hf_logits(model, TOKENS)).max() < 1e-4


# ---- chains, truncation, trees ---------------------------------------------------------


def test_chain_in_pieces_equals_full(tiny):
    _, backend = tiny
    full = chain(backend, TOKENS)
    seq = backend.new_sequence()
    rows, at = [], 0
    for size in (5, 1, 1, 9, 3, 21):
        rows.append(backend.forward(seq, TOKENS[at : at + size]))
        at += size
        assert backend.length(seq) == at
    assert np.abs(np.concatenate(rows) - full).max() < 1e-10
    backend.free_sequence(seq)


def test_truncate_then_reforward(tiny):
    _, backend = tiny
    seq = backend.new_sequence()
    backend.forward(seq, TOKENS[:30])
    backend.truncate(seq, 12)
    assert backend.length(seq) == 12
    other = [7, 8, 9, 10, 250]
    got = backend.forward(seq, other)
    want = chain(backend, TOKENS[:12] + other)[12:]
    assert np.abs(got - want).max() < 1e-10
    backend.truncate(seq, 0)
    assert np.abs(backend.forward(seq, TOKENS[:3]) - chain(backend, TOKENS[:3])).max() < 1e-10


def test_sequences_are_independent(tiny):
    _, backend = tiny
    a, b = backend.new_sequence(), backend.new_sequence()
    backend.forward(a, TOKENS[:10])
    backend.forward(b, [1, 2, 3])
    got = backend.forward(a, TOKENS[10:20])
    assert np.abs(got - chain(backend, TOKENS[:20])[10:]).max() < 1e-10
    assert backend.length(b) == 3
    backend.free_sequence(a)
    backend.free_sequence(b)
    with pytest.raises(ConfigError):
        backend.length(a)


# A tree of 8 new tokens: 0 -> 1 -> 3, 0 -> 2 -> {4, 5}, and a second root 6 -> 7.
TREE_TOKENS = [11, 22, 33, 44, 55, 66, 77, 88]
TREE_PARENTS = [-1, 0, 0, 1, 2, 2, -1, 6]


def path_to(i: int) -> list[int]:
    """Indices from the root to node i."""
    path = []
    while i >= 0:
        path.append(i)
        i = TREE_PARENTS[i]
    return path[::-1]


def test_tree_forward_equals_chain_of_each_path(tiny):
    _, backend = tiny
    prefix = TOKENS[:15]
    seq = backend.new_sequence()
    backend.forward(seq, prefix)
    tree = backend.forward(seq, TREE_TOKENS, TREE_PARENTS)  # [8, V]
    assert tree.shape == (8, V)
    assert backend.length(seq) == 15 + 8
    for i in range(len(TREE_TOKENS)):
        path = [TREE_TOKENS[j] for j in path_to(i)]
        want = chain(backend, prefix + path)[-1]
        assert np.abs(tree[i] - want).max() < 1e-10, f"node {i}"
    backend.free_sequence(seq)


@pytest.mark.parametrize("leaf", [3, 5, 7, 2])
def test_keep_path_then_continue_equals_chain(tiny, leaf):
    _, backend = tiny
    prefix = TOKENS[:15]
    seq = backend.new_sequence()
    backend.forward(seq, prefix)
    backend.forward(seq, TREE_TOKENS, TREE_PARENTS)
    path = path_to(leaf)
    backend.keep(seq, 15, path)
    assert backend.length(seq) == 15 + len(path)
    more = [5, 6, 7, 8]
    got = backend.forward(seq, more)
    direct = prefix + [TREE_TOKENS[j] for j in path] + more
    assert np.abs(got - chain(backend, direct)[-len(more) :]).max() < 1e-10
    backend.free_sequence(seq)


def test_forward_batch_of_trees_and_chains_equals_separate_forwards(tiny):
    _, backend = tiny
    items = [(TOKENS[20:24], None), (TREE_TOKENS, TREE_PARENTS), ([], None), ([9], [-1])]
    batch_seqs, ref_seqs = [], []
    for n in (3, 15, 7, 0):  # cached prefixes of different lengths
        s, r = backend.new_sequence(), backend.new_sequence()
        for seq in (s, r):
            backend.forward(seq, TOKENS[:n])
        batch_seqs.append(s)
        ref_seqs.append(r)
    got = backend.forward_batch([(s, t, p) for s, (t, p) in zip(batch_seqs, items)])
    want = [backend.forward(r, t, p) for r, (t, p) in zip(ref_seqs, items)]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and np.array_equal(g, w)
    backend.keep(batch_seqs[1], 15, path_to(5))  # the tree's cache entries are the tree's
    backend.keep(ref_seqs[1], 15, path_to(5))
    assert np.array_equal(backend.forward(batch_seqs[1], [5]), backend.forward(ref_seqs[1], [5]))
    for seq in batch_seqs + ref_seqs:
        backend.free_sequence(seq)


def test_forward_batch_contract_errors(tiny):
    _, backend = tiny
    a, b = backend.new_sequence(), backend.new_sequence()
    backend.forward(a, [1, 2])
    with pytest.raises(ConfigError, match=r"\(seq, tokens, parents\) triples"):
        backend.forward_batch([(a, [3])])
    with pytest.raises(ConfigError, match="only once"):
        backend.forward_batch([(a, [3], None), (a, [4], None)])
    with pytest.raises(ConfigError, match="1 parents for 2 tokens"):
        backend.forward_batch([(a, [3], None), (b, [4, 5], [-1])])
    with pytest.raises(ConfigError, match="out of range"):  # the second item fails...
        backend.forward_batch([(a, TREE_TOKENS, TREE_PARENTS), (b, [V], None)])
    assert (backend.length(a), backend.length(b)) == (2, 0)  # ...and the first is undone
    backend.free_sequence(a)
    backend.free_sequence(b)


def test_cache_grows_past_initial_capacity(tiny):
    _, backend = tiny
    long = [int(t) for t in RNG.integers(0, V, size=150)]
    seq = backend.new_sequence()
    rows = [backend.forward(seq, long[i : i + 7]) for i in range(0, 150, 7)]
    assert np.abs(np.concatenate(rows) - chain(backend, long)).max() < 1e-10
    backend.free_sequence(seq)


# ---- bad input -------------------------------------------------------------------------


def test_bad_input_fails_loudly(tiny):
    _, backend = tiny
    seq = backend.new_sequence()
    backend.forward(seq, [1, 2, 3])
    with pytest.raises(ConfigError, match="out of range"):
        backend.forward(seq, [1, V])
    with pytest.raises(ConfigError, match="parent"):
        backend.forward(seq, [1, 2], [-1, 1])
    with pytest.raises(ConfigError, match="parents for"):
        backend.forward(seq, [1, 2], [-1])
    with pytest.raises(ConfigError, match="n_ctx"):
        backend.forward(seq, [1] * backend.n_ctx)
    with pytest.raises(ConfigError):
        backend.truncate(seq, 4)
    with pytest.raises(ConfigError):
        backend.keep(seq, 1, [2])
    with pytest.raises(ConfigError, match="unknown sequence"):
        backend.forward(999, [1])
    assert backend.length(seq) == 3  # failed calls left the cache alone
    assert backend.forward(seq, []).shape == (0, V)
    with pytest.raises(ConfigError, match="dtype"):
        NumpyBackend.from_torch(tiny[0], ByteTokenizer(V), dtype=np.float16)
    backend.free_sequence(seq)


def test_unsupported_architecture():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    with pytest.raises(ModelError, match="not supported"):
        NumpyBackend.from_torch(MistralForCausalLM(cfg), ByteTokenizer(V))
    with pytest.raises(ModelError, match="not found"):
        NumpyBackend.load("/nonexistent/model.gguf")


# ---- GGUF reading (a tiny GGUF written here, laid out like llama.cpp's converter) --------


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row permutation for llama (halves -> pairs)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(model, path, arch: str | None = None) -> None:
    """The model's weights as an F32 GGUF file, named and permuted as llama.cpp does."""
    import gguf

    c = model.config
    arch = arch or c.model_type
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    mlp = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"{p}self_attn.{hf}.{kind}")
                if t is not None:
                    if arch == "llama" and hf in heads:
                        t = llamacpp_permute(t, heads[hf])
                    w.add_tensor(f"blk.{i}.{gg}.{kind}", t)
        for hf, gg in mlp.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[f"{p}mlp.{hf}.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_weights_read_like_transformers(tiny, tmp_path):
    from gguf import GGUFReader

    model, _ = tiny
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path)
    cfg, weights = read_gguf(GGUFReader(str(path)), path.name, np.float32)
    assert (cfg.arch, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (
        model.config.model_type,
        2,
        4,
        2,
    )
    assert (weights.lm_head is weights.embed) == model.config.tie_word_embeddings
    from_gguf = NumpyBackend(Transformer(cfg, weights, np.float32), ByteTokenizer(V))
    from_model = NumpyBackend.from_torch(model, ByteTokenizer(V), dtype=np.float32)
    assert np.abs(chain(from_gguf, TOKENS) - chain(from_model, TOKENS)).max() < 1e-6


def test_gguf_unsupported_architecture(tiny, tmp_path):
    from gguf import GGUFReader

    path = tmp_path / "other.gguf"
    write_gguf(tiny[0], path, arch="gpt2")
    with pytest.raises(ModelError, match="architecture 'gpt2' not supported"):
        read_gguf(GGUFReader(str(path)), path.name, np.float32)


# ---- SmolLM2-135M (integration) --------------------------------------------------------

PROMPT = (
    "The quick brown fox jumps over the lazy dog, and then it ran into the deep forest to find its"
)


@pytest.fixture(scope="module")
def smollm2(smollm2_converted):
    """(NumpyBackend, transformers float32 model, transformers tokenizer, path) of the same
    GGUF. The transformers pair is transformers' own de-quantization of the GGUF, as the torch
    backend cached it (safetensors, bit-identical to a fresh ``from_pretrained(gguf_file=)``):
    the session converts SmolLM2 once instead of once per file."""
    from specsplit.backends.torch_backend import TorchBackend

    backend = NumpyBackend.load("smollm2-135m")
    hf = TorchBackend.load("smollm2-135m", dtype="float32")
    return backend, hf.model, hf.tokenizer.hf, smollm2_converted


@pytest.mark.integration
def test_smollm2_logits_match_transformers(smollm2):
    backend, hf, _, _ = smollm2
    ids = backend.tokenizer.encode(PROMPT)[:20]
    assert len(ids) == 20
    ours = chain(backend, ids)  # [20, 49152]
    ref = hf_logits(hf, ids)
    assert ours.shape == ref.shape == (20, 49152)
    assert np.abs(ref).max() > 10.0
    # same de-quantized weights, float32 both: only summation order differs (~1e-4 seen)
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    # incremental decoding over the cache agrees with the full forward
    seq = backend.new_sequence()
    pieces = [backend.forward(seq, ids[:12])] + [backend.forward(seq, [t]) for t in ids[12:]]
    assert np.abs(np.concatenate(pieces) - ours).max() < 1e-3
    backend.free_sequence(seq)


@pytest.mark.integration
def test_smollm2_one_token_forward_is_fast(smollm2):
    """Under half a second of CPU per cached one-token step (about 0.2 s here). CPU time of
    the process, not wall time: on a shared machine the wall time measures the other
    processes too (1.2 s seen at load 5 on 2 cores); with several BLAS threads the CPU time
    is the stricter of the two."""
    backend = smollm2[0]
    seq = backend.new_sequence()
    backend.forward(seq, backend.tokenizer.encode(PROMPT))
    times = []
    for _ in range(5):
        t0 = time.process_time()
        backend.forward(seq, [42])
        times.append(time.process_time() - t0)
    assert min(times) < 0.5
    backend.free_sequence(seq)


@pytest.mark.integration
def test_smollm2_tokenizer(smollm2):
    from specsplit.backends.gguf_tokenizer import gguf_vocab_tokens, vocab_fingerprint

    backend, _, hf_tok, path = smollm2
    tok = backend.tokenizer
    for text in ["Hello world", "def f(x):\n    return x ** 2  # ünïcödé 日本語", "  a\t\tb\n\n"]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.decode(tok.encode("日本")[:1]) == "\ufffd"  # half a character
    tokens = gguf_vocab_tokens(path)
    assert tok.vocab_size == backend.vocab_size == len(tokens) == 49152
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.fingerprint() == vocab_fingerprint(tokens) == backend.identity()
    assert tok.eos_token_ids == {0, 2}  # <|endoftext|> and <|im_end|> (the GGUF's eos)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_qwen2_gguf_logits_match_transformers():
    """Qwen2.5-Coder-0.5B (qwen2: QKV biases, untied output, mixed K-quants) vs transformers."""
    from transformers import AutoModelForCausalLM

    from specsplit import registry

    path = registry.resolve_gguf("qwen2.5-coder-0.5b")
    backend = NumpyBackend.load(str(path))
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = backend.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    ours, ref = chain(backend, ids), hf_logits(hf, ids)
    assert np.abs(ref).max() > 10.0
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
