"""GMD under torch DDP: two gloo processes on the CPU end with identical parameters after one all-reduce."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nnunet_gmd.gmd import backward_all_reduced, ds_gmd_backward, ds_subset_losses
from nnunet_gmd.networks import DSUNet
from nnunet_gmd.subsets import all_subsets


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on every rank, as DDP requires
    net = DSUNet(4, 3, [4, 8, 8], nn.Conv2d, 3, [1, 2, 2], 1, 3, 1, conv_bias=True, norm_op=nn.InstanceNorm2d,
                 nonlin=nn.LeakyReLU)
    ddp = nn.parallel.DistributedDataParallel(net)
    torch.manual_seed(100 + rank)  # different data per rank
    x = torch.randn(2, 4, 16, 16)
    target = torch.randint(0, 3, (2, 16, 16))

    def loss(out, subset):
        return nn.functional.cross_entropy(out, target) + (0.5 if len(subset) % 2 else -0.5) * out[:, 0].mean()

    local = copy.deepcopy(net)
    ds_gmd_backward(local, x, all_subsets(4), loss, generator=torch.Generator().manual_seed(3),
                    sync_distributed=False)
    local_grads = [p.grad.clone() for p in local.parameters()]

    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        ds_gmd_backward(ddp.module, x, all_subsets(4), loss, generator=torch.Generator().manual_seed(3))
    finally:
        dist.all_reduce = real_all_reduce
    synced = [p.grad.clone() for p in net.parameters()]
    torch.optim.SGD(net.parameters(), lr=0.1).step()

    # the DS ablation's step (mean of the subset losses) through the same single collective
    def ds_loss(module):
        return torch.stack(ds_subset_losses(module, x, all_subsets(4), loss)).mean()

    local.zero_grad(set_to_none=True)
    ds_loss(local).backward()
    ds_local = [None if p.grad is None else p.grad.clone() for p in local.parameters()]
    dist.all_reduce = counting_all_reduce
    try:
        backward_all_reduced(ds_loss(local), list(local.parameters()))
    finally:
        dist.all_reduce = real_all_reduce
    ds_synced = [None if p.grad is None else p.grad.clone() for p in local.parameters()]
    torch.save({"calls": calls, "local": local_grads, "synced": synced, "ds_local": ds_local, "ds_synced": ds_synced,
                "params": [p.detach().clone() for p in net.parameters()]}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_ranks_end_with_identical_parameters_after_one_all_reduce(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    n_params = sum(p.numel() for p in r0["params"])
    # one collective for the merged GMD gradient, one for the DS step's
    assert r0["calls"] == [n_params, n_params] and r1["calls"] == [n_params, n_params]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(r0["local"], r1["local"]))  # the ranks did differ
    for s0, s1, l0, l1 in zip(r0["synced"], r1["synced"], r0["local"], r1["local"]):
        torch.testing.assert_close(s0, (l0 + l1) / 2)
    assert any(g is None for g in r0["ds_local"])  # some parameters no loss reaches ...
    for s0, s1, l0, l1 in zip(r0["ds_synced"], r1["ds_synced"], r0["ds_local"], r1["ds_local"]):
        if l0 is None:                                  # ... stay without a gradient, as after backward()
            assert s0 is None and s1 is None and l1 is None
            continue
        torch.testing.assert_close(s0, s1, rtol=0, atol=0)
        torch.testing.assert_close(s0, (l0 + l1) / 2)
