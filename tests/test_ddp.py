"""DistributedDataParallel on CPU: two gloo processes == one process on the same global batch.

How the comparison is designed. Each DDP process normalizes with the batch
statistics of its own half-batch (plain BatchNorm2d, not SyncBatchNorm), and
DDP averages the gradients of the per-process losses. So the single-process
reference runs the two half-batches separately (each half's BN statistics
computed on that half alone) and backpropagates the mean of the two losses:
the same gradients, hence the same parameters after every SGD step.
Running statistics: DDP broadcasts rank 0's buffers at each forward
(broadcast_buffers=True), so rank 0's buffers only ever see rank 0's halves;
the reference restores its buffers after the second half's forward to match.
"""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastres
import fastres.models as fm

from test_nn import assert_close, randomize_bn  # noqa: E402

WORLD = 2
STEPS = 3


def tiny_model(mode: str):
    """One block per stage; weights channels_last like the activations, so that
    the gradients' strides match DDP's buckets (docs/models.md)."""
    torch.manual_seed(0)
    model = randomize_bn(fm.ResNet(fm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5))
    return fastres.set_training_memory(model.to(memory_format=torch.channels_last), mode)


def batches():
    g = torch.Generator().manual_seed(1)
    # 64x64: layer4 normalizes over 2x2x2 values per channel and process (with
    # fewer, batch-statistics gradients are too ill-conditioned to compare in fp32)
    return [(torch.randn(2 * WORLD, 3, 64, 64, generator=g), torch.randint(0, 5, (2 * WORLD,), generator=g))
            for _ in range(STEPS)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, mode: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(tiny_model(mode))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in batches():
            half = slice(2 * rank, 2 * rank + 2)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[half]), y[half]).backward()
            opt.step()
        torch.save(model.module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference(mode: str):
    model = tiny_model(mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches():
        opt.zero_grad()
        losses = []
        for rank in range(WORLD):
            half = slice(2 * rank, 2 * rank + 2)
            if rank == 1:
                saved = {k: b.clone() for k, b in model.named_buffers()}
            losses.append(nn.functional.cross_entropy(model(x[half]), y[half]))
        with torch.no_grad():  # rank 0's buffers win (DDP's broadcast_buffers)
            for k, b in model.named_buffers():
                b.copy_(saved[k])
        (sum(losses) / WORLD).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("mode", ["low", "min"])
def test_ddp_two_processes_match_one(mode):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir, mode), nprocs=WORLD, join=True)
        states = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    expected = _reference(mode)
    params = {n for n, _ in tiny_model(mode).named_parameters()}
    for k, v in expected.items():
        if k in params:
            for r in range(WORLD):
                assert_close(states[r][k], v, 1e-4, f"rank {r} {k}")
        else:  # buffers: rank 0's
            assert_close(states[0][k].double(), v.double(), 1e-5, k)
