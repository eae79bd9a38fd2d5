"""One drafter's token trees through a real gRPC server on loopback: exact greedy text,
sampled replay equal to the local run, the server's limits, the wire's checks."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import perturbed, tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.torch_backend import TorchBackend
from specsplit.draw_tree import DrawTree
from specsplit.engine.speculative import DecodeLoop, GenerationRequest, SpeculativeEngine
from specsplit.engine.tree_policy import FixedTree
from specsplit.engine.verifier import LocalVerifier
from specsplit.errors import ConfigError
from specsplit.proposers.base import Draft
from specsplit.proposers.draft_model import DraftModelProposer
from specsplit.sampling import SamplingParams
from specsplit.transport import wire
from specsplit.transport.client import RemoteVerifier
from specsplit.transport.server import ServerConfig, SpecsplitServer

PROMPT = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 72, 101]


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(vocab=300, seed=0)
    return target, perturbed(target, 0.3, seed=2)


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer(300)


@pytest.fixture(scope="module")
def server(models, tok):
    srv = SpecsplitServer(
        TorchBackend(models[0], tok),
        "tiny",
        ServerConfig(port=0, rate=None, batch_window=0, calibrate=False),
    )
    srv.start()
    yield srv
    srv.stop(grace=0)


def _edge(server, tok, drafter, policy):
    verifier = RemoteVerifier([f"127.0.0.1:{server.port}"], tok)
    return DecodeLoop(verifier, [drafter], policy), verifier


def test_greedy_tree_through_service_equals_target_greedy(server, models, tok):
    ref = SpeculativeEngine(TorchBackend(models[0], tok)).generate(GenerationRequest(PROMPT, 48))
    drafter = DraftModelProposer(TorchBackend(models[1], tok))
    # 4 x 8 = 32 draws: more than the server's max_draft (16); the client keeps within it
    loop, verifier = _edge(server, tok, drafter, FixedTree(4, 8))
    res = loop.generate(GenerationRequest(PROMPT, 48))
    verifier.shutdown()
    assert verifier.tree_paths > 0 and verifier.max_draft == 16
    assert res.token_ids == ref.token_ids
    st = res.stats
    assert st.target_passes < ref.stats.target_passes and st.rejected_rounds > 0
    assert st.bytes_sent > 0 and st.as_dict()["bytes_per_token"] > 0


def test_sampled_tree_replays_the_local_run_across_the_network(server, models, tok):
    """A fixed tree shape and a seed: the same text in one process and through the server
    (the tree, its parents and its quantized q rows cross the wire exactly)."""
    params = SamplingParams(temperature=0.8)
    req = GenerationRequest(PROMPT, 40, params, seed=5)

    def drafter() -> DraftModelProposer:
        return DraftModelProposer(TorchBackend(models[1], tok), quantize=True)

    local = DecodeLoop(LocalVerifier(TorchBackend(models[0], tok)), [drafter()], FixedTree(3, 3))
    want = local.generate(req)
    loop, verifier = _edge(server, tok, drafter(), FixedTree(3, 3))
    got = loop.generate(req)
    verifier.shutdown()
    assert got.token_ids == want.token_ids
    assert got.stats.accepted > 0 and got.stats.rejected_rounds > 0


def test_wire_carries_a_tree_and_checks_it():
    q = np.zeros((3, 8))
    q[:, [1, 2]] = 0.5
    d = Draft([1, 2, 2], q, [-1, -1, 0])
    chains = wire.drafts_to_pb([d])
    assert list(chains[0].parents) == [0, 0, 1]
    assert len(chains[0].q) == 2  # one row per parent: the root's, draw 0's
    back = wire.drafts_from_pb(chains, 8, 16, greedy=False, tree_paths=32)[0]
    assert back.parents == [-1, -1, 0] and np.array_equal(back.q.dense(), q)
    assert np.array_equal(back.q[1:].dense(), q[1:])  # sliced by rows, still sparse
    assert DrawTree.build(back.tokens, back.parents).n_paths() == 2
    with pytest.raises(wire.ProtocolError):  # two paths; the server takes one
        wire.drafts_from_pb(chains, 8, 16, greedy=False, tree_paths=1)
    with pytest.raises(wire.ProtocolError):  # a server without trees
        wire.drafts_from_pb(chains, 8, 16, greedy=False)
    chains[0].parents[2] = 3  # a parent after its child
    with pytest.raises(wire.ProtocolError):
        wire.drafts_from_pb(chains, 8, 16, greedy=False, tree_paths=32)
    q[1, [1, 2]] = [0.25, 0.75]  # siblings drawn from different q: not a tree of i.i.d. draws
    with pytest.raises(ConfigError):
        wire.drafts_to_pb([Draft([1, 2, 2], q, [-1, -1, 0])])
