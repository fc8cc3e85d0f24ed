"""One rank of the DDP test (tests/test_torch_ddp.py): trains a small rnndsl model with
DistributedDataParallel (gloo, CPU; or NCCL on GPU RANK, tests/test_torch_cuda.py) on its
half of the batch and saves its parameters.

Usage: python ddp_worker.py RANK WORLD_SIZE PORT OUT_FILE [gloo|nccl]"""
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from rnndsl.torch import RNN
from torch_cells import spec

STEPS, BATCH = 4, 8


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = RNN(spec("gru"), 3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
        self.head = nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, x, lengths):
        out, _ = self.rnn(x, lengths=lengths)
        return self.head(out)


def build():
    torch.manual_seed(0)
    return Model()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, BATCH, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, BATCH, 1, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6])
    return x, y, lengths


def train(model, x, y, lengths):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x, lengths), y)
        loss.backward()
        opt.step()
    return model


def main(rank: int, world: int, port: int, out: str, backend: str = "gloo"):
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        if backend == "nccl":  # one GPU per process
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
            model = nn.parallel.DistributedDataParallel(build().to(device), device_ids=[rank])
        else:
            device = torch.device("cpu")
            model = nn.parallel.DistributedDataParallel(build())
        x, y, lengths = data()
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        train(model, x[:, part].to(device), y[:, part].to(device), lengths[part])
        torch.save({n: p.detach().cpu() for n, p in model.module.named_parameters()}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:])
