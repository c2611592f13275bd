"""ch07 paged KV cache: batched paged decoding == the model's own contiguous forward; allocation, prefix sharing, COW."""

import pytest
import torch

from ch01.model import GPT, DynamicKVCache, GPTConfig
from ch07.paged_kv_cache import OutOfBlocks, PagedKVCache, paged_forward

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
    out = paged_forward(model, cache, seqs, all_logits=True)  # batched prefill of different lengths
    for i, toks in enumerate(seqs.values()):
        torch.testing.assert_close(out[i, : len(toks)], ref_logits(model, toks), atol=1e-5, rtol=1e-5)
    cache.add_sequence("c")
    seqs["c"] = torch.randint(0, 40, (20,), generator=g).tolist()
    paged_forward(model, cache, {"c": seqs["c"]})
    for step in range(12):  # decode: each sequence at its own position, one forward for all; "c" joins with a chunk
        nxt = {s: [int(torch.randint(0, 40, (1,), generator=g))] for s in seqs}
        if step == 3:
            nxt["b"] = torch.randint(0, 40, (4,), generator=g).tolist()  # a chunk in the same batch as 1-token rows
        logits = paged_forward(model, cache, nxt)  # (3, V)
        for i, s in enumerate(nxt):
            seqs[s] += nxt[s]
            torch.testing.assert_close(logits[i], ref_logits(model, seqs[s])[-1], atol=1e-5, rtol=1e-5)
    assert [cache.length(s) for s in seqs] == [len(t) for t in seqs.values()]


def test_gathered_blocks_equal_contiguous_cache(model):
    toks = torch.randint(0, 40, (1, 30))
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
    cache.add_sequence(0)
    paged_forward(model, cache, {0: toks[0, :17]})
    paged_forward(model, cache, {0: toks[0, 17:]})
    dyn = DynamicKVCache(model.config.n_layer)
    with torch.no_grad():
        model(toks, kv_cache=dyn)
    for layer in range(model.config.n_layer):
        k, v = cache.gather(0, layer)
        torch.testing.assert_close(k, dyn.k[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, dyn.v[layer], atol=1e-5, rtol=1e-5)
    assert len(cache.block_table(0)) == 8  # ceil(30 / 4)


def test_allocate_free_and_out_of_blocks(model):
    cache = PagedKVCache(model.config, num_blocks=4, block_size=4)
    cache.add_sequence("x")
    paged_forward(model, cache, {"x": list(range(9))})  # 3 blocks
    assert cache.num_free_blocks == 1
    cache.add_sequence("y")
    assert not cache.can_append(["y"], [5])
    with pytest.raises(OutOfBlocks):
        paged_forward(model, cache, {"y": list(range(5))})
    assert cache.length("y") == 0 and cache.num_free_blocks == 1  # nothing half-done
    cache.free("x")
    assert cache.num_free_blocks == 4
    paged_forward(model, cache, {"y": list(range(5))})
    with pytest.raises(KeyError):
        cache.free("x")


def test_prefix_sharing_reuses_blocks_and_keeps_logits(model):
    cache = PagedKVCache(model.config, num_blocks=32, block_size=8)
    system = torch.randint(0, 40, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    p1, p2 = system + [1, 2, 3], system + [4, 5]
    assert cache.add_sequence("p1", p1) == 0
    paged_forward(model, cache, {"p1": p1})
    used = 32 - cache.num_free_blocks
    n_cached = cache.add_sequence("p2", p2)
    assert n_cached == 16  # two full blocks of the shared 20-token prefix
    logits = paged_forward(model, cache, {"p2": p2[n_cached:]})
    torch.testing.assert_close(logits[0], ref_logits(model, p2)[-1], atol=1e-5, rtol=1e-5)
    assert cache.block_table("p1")[:2] == cache.block_table("p2")[:2]
    assert 32 - cache.num_free_blocks == used + 1  # p2 added only its own third block
    cache.free("p1")
    logits = paged_forward(model, cache, {"p2": [7]})  # shared blocks survive the first owner
    torch.testing.assert_close(logits[0], ref_logits(model, p2 + [7])[-1], atol=1e-5, rtol=1e-5)
    cache.free("p2")
    assert cache.num_free_blocks == 32 and not cache.prefix_table


def test_fork_copy_on_write(model):
    cache = PagedKVCache(model.config, num_blocks=16, block_size=8)
    prompt = list(range(11))  # last block half full: the fork shares it
    cache.add_sequence("parent")
    paged_forward(model, cache, {"parent": prompt})
    cache.fork("parent", "child")
    shared_last = cache.block_table("parent")[-1]
    before = cache.k[0][shared_last * 8 : shared_last * 8 + 8].clone()
    logits = paged_forward(model, cache, {"parent": [20], "child": [30]})
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
        paged_forward(model, cache, {"a": []})
    with pytest.raises(KeyError):
        paged_forward(model, cache, {"zz": [1]})
    with pytest.raises(ValueError):
        PagedKVCache(model.config, num_blocks=0)


@pytest.mark.timeout(120)
def test_continuous_batching_demo_equals_solo_decoding():
    from ch07.paged_kv_cache import main

    result = main(["--requests", "5", "--max-batch", "3", "--num-blocks", "24"])
    assert result["== solo greedy"] is True
    assert result["peak KV MiB (paged)"] <= result["KV MiB (static, max_batch x longest)"]
