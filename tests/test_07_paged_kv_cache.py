"""ch07 paged KV cache: another implementation of ch01's cache protocol, so GPT.forward (and FusedDecoder) run on it.
Batched paged decoding == the model's own contiguous forward and == ch01's generate token for token; only real tokens
are written to the pool; allocation, prefix sharing, fork + copy-on-write."""

import pytest
import torch

from ch01.cache import KVCache
from ch01.generate import generate
from ch01.model import GPT, GPTConfig
from ch07.fused_decode import FusedDecoder
from ch07.paged_kv_cache import OutOfBlocks, PagedKVCache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=40, block_size=128, n_kv_head=2, init_std=0.2)).eval()


def ref_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq]))[0]  # (T, V)


def test_mixed_prefill_and_decode_batch_equals_contiguous(model):
    g = torch.Generator().manual_seed(0)
    cache = PagedKVCache(model.config, num_blocks=40, block_size=8)
    seqs = {
        "a": torch.randint(0, 40, (13,), generator=g).tolist(),
        "b": torch.randint(0, 40, (5,), generator=g).tolist(),
    }
    for s in seqs:
        cache.add_sequence(s)
    out = cache.run(model, seqs, all_logits=True)  # batched prefill of different lengths
    for i, toks in enumerate(seqs.values()):
        torch.testing.assert_close(out[i, : len(toks)], ref_logits(model, toks), atol=1e-5, rtol=1e-5)
    cache.add_sequence("c")
    seqs["c"] = torch.randint(0, 40, (20,), generator=g).tolist()
    cache.run(model, {"c": seqs["c"]})
    for step in range(12):  # decode: each sequence at its own position, one forward for all; "c" joins with a chunk
        nxt = {s: [int(torch.randint(0, 40, (1,), generator=g))] for s in seqs}
        if step == 3:
            nxt["b"] = torch.randint(0, 40, (4,), generator=g).tolist()  # a chunk in the same batch as 1-token rows
        logits = cache.run(model, nxt)  # (3, V)
        for i, s in enumerate(nxt):
            seqs[s] += nxt[s]
            torch.testing.assert_close(logits[i], ref_logits(model, seqs[s])[-1], atol=1e-5, rtol=1e-5)
    assert [cache.length(s) for s in seqs] == [len(t) for t in seqs.values()]


def test_gathered_blocks_equal_contiguous_cache(model):
    toks = torch.randint(0, 40, (1, 30))
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
    cache.add_sequence(0)
    cache.run(model, {0: toks[0, :17]})
    cache.run(model, {0: toks[0, 17:]})
    dyn = KVCache(model.config.n_layer)
    with torch.no_grad():
        model(toks, cache=dyn)
    for layer in range(model.config.n_layer):
        k, v = cache.gather(0, layer)
        torch.testing.assert_close(k, dyn.k[layer][:, :, :30], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, dyn.v[layer][:, :, :30], atol=1e-5, rtol=1e-5)
    assert len(cache.block_table(0)) == 8  # ceil(30 / 4)


def test_allocate_free_and_out_of_blocks(model):
    cache = PagedKVCache(model.config, num_blocks=4, block_size=4)
    cache.add_sequence("x")
    cache.run(model, {"x": list(range(9))})  # 3 blocks
    assert cache.num_free_blocks == 1
    cache.add_sequence("y")
    assert not cache.can_append(["y"], [5])
    with pytest.raises(OutOfBlocks):
        cache.run(model, {"y": list(range(5))})
    assert cache.length("y") == 0 and cache.num_free_blocks == 1  # nothing half-done
    cache.free("x")
    assert cache.num_free_blocks == 4
    cache.run(model, {"y": list(range(5))})
    with pytest.raises(KeyError):
        cache.free("x")


def test_prefix_sharing_reuses_blocks_and_keeps_logits(model):
    cache = PagedKVCache(model.config, num_blocks=32, block_size=8)
    system = torch.randint(0, 40, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    p1, p2 = system + [1, 2, 3], system + [4, 5]
    assert cache.add_sequence("p1", p1) == 0
    cache.run(model, {"p1": p1})
    used = 32 - cache.num_free_blocks
    n_cached = cache.add_sequence("p2", p2)
    assert n_cached == 16  # two full blocks of the shared 20-token prefix
    logits = cache.run(model, {"p2": p2[n_cached:]})
    torch.testing.assert_close(logits[0], ref_logits(model, p2)[-1], atol=1e-5, rtol=1e-5)
    assert cache.block_table("p1")[:2] == cache.block_table("p2")[:2]
    assert 32 - cache.num_free_blocks == used + 1  # p2 added only its own third block
    cache.free("p1")
    logits = cache.run(model, {"p2": [7]})  # shared blocks survive the first owner
    torch.testing.assert_close(logits[0], ref_logits(model, p2 + [7])[-1], atol=1e-5, rtol=1e-5)
    cache.free("p2")
    assert cache.num_free_blocks == 32  # the shared blocks stay cached (unreferenced, evictable) ...
    assert cache.stats()["blocks_used"] == 0 and cache.stats()["blocks_cached"] == 2
    assert cache.add_sequence("p3", p2 + [9]) == 16  # ... so a later request with the prefix still finds them
    logits = cache.run(model, {"p3": (p2 + [9])[16:]})
    torch.testing.assert_close(logits[0], ref_logits(model, p2 + [9])[-1], atol=1e-5, rtol=1e-5)


def test_prefix_cache_lru_eviction(model):
    """Unreferenced cached blocks are reused by later requests and evicted least recently used first when the pool
    runs out of never-used blocks; a hit needs the whole chain of parent blocks (hash of parent hash + tokens)."""
    cache = PagedKVCache(model.config, num_blocks=6, block_size=4)
    a, b = list(range(9)), list(range(20, 29))  # 2 full blocks + 1 token each
    for name, prompt in (("a", a), ("b", b)):
        cache.add_sequence(name, prompt)
        cache.run(model, {name: prompt})
        cache.free(name)
    assert cache.stats()["blocks_cached"] == 4 and cache.num_free_blocks == 6
    assert cache.add_sequence("a2", a) == 8  # a's blocks, untouched
    cache.free("a2")  # a is now the most recently used prefix
    cache.add_sequence("c", list(range(28, 40)))
    cache.run(model, {"c": list(range(28, 40))})  # 3 blocks: 2 never used + 1 evicted (b's tail block first)
    assert cache.add_sequence("b2", b) == 4  # b's head block survived, its tail was evicted
    assert cache.add_sequence("a3", a) == 8
    assert cache.add_sequence("x", [39, 1, 2, 3] + a[4:]) == 0  # same second block after another first: no hit
    assert cache.stats()["prefix_hit_tokens"] == 8 + 4 + 8


def test_fork_copy_on_write(model):
    cache = PagedKVCache(model.config, num_blocks=16, block_size=8)
    prompt = list(range(11))  # last block half full: the fork shares it
    cache.add_sequence("parent")
    cache.run(model, {"parent": prompt})
    cache.fork("parent", "child")
    shared_last = cache.block_table("parent")[-1]
    before = cache.k[0][shared_last * 8 : shared_last * 8 + 8].clone()
    logits = cache.run(model, {"parent": [20], "child": [30]})
    assert cache.block_table("parent")[0] == cache.block_table("child")[0]  # full block still shared
    assert cache.block_table("parent")[-1] != cache.block_table("child")[-1]  # partial one was copied
    torch.testing.assert_close(logits[0], ref_logits(model, prompt + [20])[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], ref_logits(model, prompt + [30])[-1], atol=1e-5, rtol=1e-5)
    still = [b for b in (cache.block_table("parent")[-1], cache.block_table("child")[-1]) if b == shared_last]
    assert len(still) == 1  # one of them kept the original block
    assert torch.equal(cache.k[0][shared_last * 8 : shared_last * 8 + 11 - 8], before[:3])  # old positions untouched


def test_errors(model):
    cache = PagedKVCache(model.config, num_blocks=4, block_size=4)
    cache.add_sequence("a")
    with pytest.raises(ValueError):
        cache.add_sequence("a")
    with pytest.raises(ValueError):
        cache.run(model, {"a": []})
    with pytest.raises(KeyError):
        cache.run(model, {"zz": [1]})
    with pytest.raises(ValueError):
        PagedKVCache(model.config, num_blocks=0)


def paged_greedy(model, cache: PagedKVCache, prompts: list[list[int]], n_new: list[int]) -> list[list[int]]:
    """All requests in one running batch: prompt prefills and one-token steps mixed; a request leaves when done."""
    out = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        cache.add_sequence(i, p)
    while running := [i for i in out if len(out[i]) < n_new[i]]:
        feed = {i: (prompts[i] if not out[i] else out[i][-1:]) for i in running}
        for i, t in zip(feed, cache.run(model, feed).argmax(-1).tolist()):
            out[i].append(t)
            if len(out[i]) == n_new[i]:
                cache.free(i)
    return [out[i] for i in range(len(prompts))]


@pytest.mark.parametrize("engine", ["gpt", "fused"])
def test_paged_run_equals_ch01_generate_token_for_token(model, engine):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 40, (n,), generator=g).tolist() for n in (5, 17, 1, 9)]
    n_new = [30, 12, 25, 40]
    runner = FusedDecoder(model) if engine == "fused" else model
    cache = PagedKVCache(model.config, num_blocks=64, block_size=4)
    paged = paged_greedy(runner, cache, prompts, n_new)
    assert paged == [generate(model, [p], n, temperature=0)[0] for p, n in zip(prompts, n_new)]
    ragged = generate(model, prompts, max(n_new), temperature=0)
    assert all(row[:n] == p for row, n, p in zip(ragged, n_new, paged))
    assert len(set(paged[3])) > 5 and cache.num_free_blocks == 64  # real paths; every block back in the pool


def test_only_real_tokens_are_written(model):
    cache = PagedKVCache(model.config, num_blocks=16, block_size=4)
    for s in "abc":
        cache.add_sequence(s)
    cache.run(model, {"a": list(range(7)), "b": [1], "c": list(range(3))})  # rows padded to 7 tokens
    for pool in cache.k + cache.v:
        assert int((pool.abs().sum((1, 2)) > 0).sum()) == 7 + 1 + 3  # pads wrote nothing, not even past a row's end
    logits = cache.run(model, {"b": [2], "a": [5]})
    torch.testing.assert_close(logits[0], ref_logits(model, [1, 2])[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], ref_logits(model, list(range(7)) + [5])[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(120)
def test_continuous_batching_demo_equals_solo_decoding():
    from ch07.paged_kv_cache import main

    result = main(["--requests", "5", "--max-batch", "3", "--num-blocks", "24"])
    assert result["== solo greedy"] is True
    assert result["peak KV MiB (paged)"] <= result["KV MiB (static, max_batch x longest)"]
