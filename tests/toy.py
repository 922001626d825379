"""A toy model and dataset that speak the Algorithm contract, for fast unit tests of client halves."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ToyModel(torch.nn.Module):
    """A 2-layer MLP over 8 features, 3 classes; deterministic initial weights (the "pretrained" ones)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        self.body = torch.nn.Linear(8, hidden)
        self.head = torch.nn.Linear(hidden, 3)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


class ToyData:
    """A learnable 3-class problem: the label is the argmax of a fixed projection of x."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=generator)
        self.y = (self.x @ torch.randn(8, 3, generator=torch.Generator().manual_seed(99))).argmax(dim=1)

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self.y), generator=generator)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                yield {"x": self.x[rows]}, self.y[rows]


def toy_state(model: ToyModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_replay_rounds(server, name: str, config: dict, schedule: list[list[int]], client_states: dict | None = None):
    """Drive a ReplayAlgorithm through rounds: ``schedule[r-1]`` lists the clients of round ``r``.

    Every client half is a fresh algorithm instance with default config and a fresh ToyModel (as
    the ClientApp does); client state persists in ``client_states``. Returns the final server
    state, the client states and the instructions of every round.
    """
    from aggregators import make_algorithm
    from aggregators.base import Reply

    state = server.init_state(toy_state(ToyModel()))
    client_states = {} if client_states is None else client_states
    instructions = []
    for server_round, clients in enumerate(schedule, start=1):
        plan = server.plan(server_round, clients, state)
        instructions.append(plan)
        replies = []
        for client in clients:
            local = make_algorithm(name)
            payload = local.local(ToyModel(), ToyData(seed=client), plan[client], client_states.setdefault(client, {}))
            replies.append(Reply(client, payload))
        result = server.aggregate(server_round, state, iter(replies))
        assert not result.rejected, result.rejected
        state = result.state
    return state, client_states, instructions
