"""What only a GPU can show (``pytest -m gpu``, run by ``make gpu-check``); every test skips without CUDA.

Per-phase CUDA peaks, the driver-level sampler against an allocation of known size, an NF4 forward on CUDA
against the CPU one, sparse restore bit-exact in half precision on CUDA, and random weights built on the
GPU without passing through host memory."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MIB = 2**20


def test_cuda_peaks_are_per_phase():
    from zobench.cell.timing import Phases

    data = {}
    phases = Phases("cuda", data)
    with phases("big"):
        x = torch.empty(512 * MIB, dtype=torch.uint8, device="cuda")
        del x
    with phases("small"):
        y = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
        del y
    assert data["big"].cuda_max_allocated_mib >= 512
    assert 64 <= data["small"].cuda_max_allocated_mib < 128  # the first phase's peak was reset
    # ... and the allocator's cache of the first phase went back to the driver before the second began
    assert data["small"].device_peak_mib < data["big"].device_peak_mib - 256


def test_the_driver_level_sampler_sees_an_allocation_of_known_size():
    from zobench.measure.device import DeviceMemory

    torch.empty(1, device="cuda")  # the context exists before sampling starts
    mem = DeviceMemory(interval=0.001).start()
    x = torch.ones(1024 * MIB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    time.sleep(0.05)  # a few samples while it is held
    out = mem.stop()
    del x
    assert mem.error is None and out["device_source"] in ("process", "device")
    assert out["device_peak_mib"] >= 1024  # at least the tensor
    # The context and allocator slack count too: the driver's figure is never below the allocator's.
    assert out["device_peak_mib"] >= torch.cuda.max_memory_allocated() / MIB


def test_nf4_forward_on_cuda_matches_the_cpu_one():
    pytest.importorskip("bitsandbytes")
    from zobench.models import load_model
    from zobench.quant import QuantContext, get_backend, quantize_model
    from zobench.zo.masks import linear_layers

    ids = torch.randint(0, 1000, (2, 32))
    logits = {}
    for device in ("cpu", "cuda"):
        loaded = load_model("random:tiny-llama", dtype="float32", seed=0, device="cpu")
        loaded.model.to(device)
        quantize_model(loaded.model, get_backend("nf4"), QuantContext(device=device, tokenizer=loaded.tokenizer),
                       linear_layers(loaded.model))
        with torch.no_grad():
            logits[device] = loaded.model(input_ids=ids.to(device)).logits.float().cpu()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=2e-2, rtol=2e-2)


def test_dense_and_sparse_nf4_merges_on_cuda_and_matches_the_cpu_product():
    """On CUDA the sparse values are merged into the dequantized weight (quant.sparse), as on the CPU; the
    logits match the CPU's, and ZO's perturb / restore of the values is exact."""
    pytest.importorskip("bitsandbytes")
    from zobench.models import load_model
    from zobench.quant import QuantContext, get_backend, quantize_model
    from zobench.quant.sparse import SparseDelta
    from zobench.zo import masks as M
    from zobench.zo.trainable import SparseTrainable

    ids = torch.randint(0, 1000, (2, 32))
    logits, ways = {}, {}
    for device in ("cpu", "cuda"):
        loaded = load_model("random:tiny-llama", dtype="float32", seed=0, device="cpu")
        loaded.model.to(device)
        mask = M.random_mask(M.scoped_params(loaded.model, "linear"), 0.01, seed=0)
        vectors = quantize_model(loaded.model, get_backend("nf4"), QuantContext(device=device),
                                 M.linear_layers(loaded.model), mask)
        ways[device] = {m.way for m in loaded.model.modules() if isinstance(m, SparseDelta)}
        with torch.no_grad():
            logits[device] = loaded.model(input_ids=ids.to(device)).logits.float().cpu()
    assert ways == {"cpu": {"merge"}, "cuda": {"merge"}}
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=2e-2, rtol=2e-2)
    t = SparseTrainable.of_vectors(vectors)
    before = [v.clone() for _, v in vectors]
    t.apply(5, 1e-2)
    with torch.no_grad():
        moved = loaded.model(input_ids=ids.cuda()).logits.float().cpu()
    assert not torch.equal(moved, logits["cuda"])
    t.apply(5, -1e-2)
    t.restore()
    assert all(torch.equal(v, b) for (_, v), b in zip(vectors, before))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_restore_is_bit_exact_on_cuda(dtype):
    from zobench.models import load_model
    from zobench.zo import masks as M
    from zobench.zo.trainable import SparseTrainable

    model = load_model("random:tiny-llama", dtype="float32", seed=0, device="cuda").model.to(dtype)
    params = M.scoped_params(model, "linear")
    t = SparseTrainable(params, M.random_mask(params, 0.05, seed=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t.apply(3, 1e-3)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    t.apply(3, -1e-3)
    t.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_random_weights_are_built_on_the_gpu_not_copied_from_host_memory():
    import psutil

    from zobench.models import load_model

    rss = psutil.Process().memory_info().rss
    loaded = load_model("random:llama-2-7b", dtype="float16", seed=0, device="cuda")
    assert next(loaded.model.parameters()).device.type == "cuda"
    assert (psutil.Process().memory_info().rss - rss) / MIB < 2048  # 12.6 GiB of weights never on the host
    del loaded
    torch.cuda.empty_cache()

