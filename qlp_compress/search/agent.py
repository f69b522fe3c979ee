"""The DQN agent: an MLP Q-network, experience replay, a target network, Double-DQN targets, Huber loss,
ε-greedy exploration. The update follows cleanrl's dqn.py.

Demonstrations are learnt the way Deep Q-learning from Demonstrations does (Hester et al., AAAI 2018):
their transitions live in a buffer of their own that is never overwritten, a fixed share of every batch
comes from it (in place of DQfD's priority bonus), and on those transitions a large-margin loss
max_a[Q(s,a) + l(a_E,a)] − Q(s,a_E) joins the n-step TD loss, so the demonstrated action must beat every
other by a margin. After the demonstrations of a stage are played, the network pre-trains on them alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AgentSettings:
    """DQN hyper-parameters."""

    hidden: tuple[int, ...] = (256, 256)  # widths of the Q-network's hidden layers
    lr: float = 5e-4  # Adam learning rate of the Q-network
    gamma: float = 1.0  # discount; rewards are terminal (final accuracy), so no discount is needed
    n_step: int = 8  # n-step returns: the terminal reward reaches a state n steps back in one update
    batch_size: int = 128  # transitions per gradient step
    buffer_size: int = 100_000  # replay capacity in transitions
    learning_starts: int = 500  # transitions collected before the first gradient step
    updates_per_step: float = 0.5  # gradient steps per environment step (run at the end of each episode)
    target_tau: float = 0.01  # Polyak rate of the target network per gradient step
    eps_start: float = 1.0  # ε at the start of the first curriculum stage
    eps_restart: float = 0.5  # ε at the start of each later stage (the network already knows something)
    eps_end: float = 0.05  # ε after the decay
    exploration_fraction: float = 0.6  # share of each stage's episodes over which ε decays linearly
    max_grad_norm: float = 10.0  # gradient clipping of the Q-network
    demo_learning: bool = True  # DQfD (see above); False: demonstrations are ordinary replay transitions
    demo_margin: float = 0.05  # l(a_E, a) for a ≠ a_E (DQfD: 0.8, for Atari returns; our returns are accuracies)
    demo_loss_weight: float = 1.0  # weight of the large-margin loss (DQfD's λ2)
    demo_share: float = 0.1  # share of every batch drawn from the demonstrations' buffer
    pretrain_steps: int = 100  # gradient steps on the demonstrations alone after each stage's demonstrations


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """The Q-network is a small MLP: extra intra-op threads only add synchronisation cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class QNetwork(nn.Module):
    def __init__(self, state_size: int, n_actions: int, hidden: tuple[int, ...]):
        super().__init__()
        layers, width = [], state_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state)


class ReplayBuffer:
    """A ring buffer of (state, action, reward, next state, done) in preallocated numpy arrays."""

    def __init__(self, capacity: int, state_size: int):
        self.capacity = capacity
        self.states = np.zeros((capacity, state_size), np.float32)
        self.next_states = np.zeros((capacity, state_size), np.float32)
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float32)
        self.dones = np.zeros(capacity, np.float32)
        self.position = 0
        self.size = 0

    def add(self, state, action, reward, next_state, done) -> None:
        i = self.position
        self.states[i], self.actions[i], self.rewards[i] = state, action, reward
        self.next_states[i], self.dones[i] = next_state, done
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        idx = rng.integers(0, self.size, batch_size)
        return (torch.from_numpy(self.states[idx]), torch.from_numpy(self.actions[idx]),
                torch.from_numpy(self.rewards[idx]), torch.from_numpy(self.next_states[idx]),
                torch.from_numpy(self.dones[idx]))

    def state_dict(self) -> dict:
        n = self.size
        return {"states": torch.from_numpy(self.states[:n].copy()), "next_states": torch.from_numpy(
            self.next_states[:n].copy()), "actions": torch.from_numpy(self.actions[:n].copy()),
            "rewards": torch.from_numpy(self.rewards[:n].copy()), "dones": torch.from_numpy(self.dones[:n].copy()),
            "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        n = len(state["actions"])
        self.states[:n], self.next_states[:n] = state["states"].numpy(), state["next_states"].numpy()
        self.actions[:n], self.rewards[:n] = state["actions"].numpy(), state["rewards"].numpy()
        self.dones[:n] = state["dones"].numpy()
        self.size, self.position = n, int(state["position"])


class DQNAgent:
    def __init__(self, state_size: int, n_actions: int, settings: AgentSettings, seed: int):
        self.settings = settings
        self.n_actions = n_actions
        with torch.random.fork_rng():  # seeded initialisation without touching the caller's RNG
            torch.manual_seed(seed)
            self.q = QNetwork(state_size, n_actions, settings.hidden)
            self.target = QNetwork(state_size, n_actions, settings.hidden)
        self.target.load_state_dict(self.q.state_dict())
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=settings.lr)
        self.replay = ReplayBuffer(settings.buffer_size, state_size)
        self.demo_replay = ReplayBuffer(settings.buffer_size, state_size)  # demonstrations only (DQfD)
        self.rng = np.random.default_rng(seed)
        self.updates = 0

    @torch.no_grad()
    def act(self, state: np.ndarray, epsilon: float) -> int:
        if self.rng.random() < epsilon:
            return int(self.rng.integers(self.n_actions))
        with single_thread():
            return int(self.q(torch.from_numpy(state)[None]).argmax(1))

    def update(self, demo_only: bool = False) -> float:
        """One gradient step on a replay batch with the Double-DQN target, plus the large-margin loss on the
        batch's demonstration transitions (all of it when `demo_only`)."""
        s = self.settings
        n_demo = 0
        if self.demo_replay.size:
            n_demo = s.batch_size if demo_only or not self.replay.size else round(s.demo_share * s.batch_size)
        parts = [self.demo_replay.sample(n_demo, self.rng)] if n_demo else []
        if n_demo < s.batch_size:
            parts.append(self.replay.sample(s.batch_size - n_demo, self.rng))
        batch = parts[0] if len(parts) == 1 else tuple(torch.cat(x) for x in zip(*parts, strict=True))
        states, actions, rewards, next_states, dones = batch
        with torch.no_grad():
            next_actions = self.q(next_states).argmax(1, keepdim=True)  # chosen by the online network
            next_values = self.target(next_states).gather(1, next_actions).squeeze(1)  # valued by the target
            td_target = rewards + s.gamma**s.n_step * next_values * (1.0 - dones)
        q_all = self.q(states)
        values = q_all.gather(1, actions[:, None]).squeeze(1)
        loss = F.smooth_l1_loss(values, td_target)
        if n_demo:  # DQfD's large margin: the demonstrated action must beat every other by demo_margin
            margins = torch.full_like(q_all[:n_demo], s.demo_margin).scatter_(1, actions[:n_demo, None], 0.0)
            loss = loss + s.demo_loss_weight * ((q_all[:n_demo] + margins).max(1).values - values[:n_demo]).mean()
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.q.parameters(), s.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            for p, tp in zip(self.q.parameters(), self.target.parameters(), strict=True):
                tp.lerp_(p, s.target_tau)
        self.updates += 1
        return float(loss.detach())

    def learn_from_episode(self, transitions: list[tuple], demonstration: bool = False) -> None:
        """Store an episode's transitions as n-step transitions, then run its share of gradient steps.
        With `demo_learning`, a demonstration's go to the demonstrations' buffer and train nothing yet:
        `pretrain` runs once a stage's demonstrations are all in."""
        n, gamma = self.settings.n_step, self.settings.gamma
        buffer = self.demo_replay if demonstration and self.settings.demo_learning else self.replay
        for t, (state, action, _, _, _) in enumerate(transitions):
            window = transitions[t : t + n]
            ret = sum(gamma**k * r for k, (_, _, r, _, _) in enumerate(window))
            _, _, _, next_state, done = window[-1]
            # an n-step transition that stops short of n steps ends the episode, so its done flag is set
            buffer.add(state, action, ret, next_state, done)
        if buffer is self.demo_replay or self.replay.size + self.demo_replay.size < self.settings.learning_starts:
            return
        with single_thread():
            for _ in range(max(1, round(self.settings.updates_per_step * len(transitions)))):
                self.update()

    def pretrain(self) -> None:
        """DQfD's pre-training: gradient steps on the demonstrations alone (TD + large margin)."""
        if not (self.settings.demo_learning and self.demo_replay.size):
            return
        with single_thread():
            for _ in range(self.settings.pretrain_steps):
                self.update(demo_only=True)

    def state_dict(self) -> dict:
        return {"q": self.q.state_dict(), "target": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "replay": self.replay.state_dict(),
                "demo_replay": self.demo_replay.state_dict(),
                "rng": self.rng.bit_generator.state, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.q.load_state_dict(state["q"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.replay.load_state_dict(state["replay"])
        self.demo_replay.load_state_dict(state["demo_replay"])
        self.rng.bit_generator.state = state["rng"]
        self.updates = int(state["updates"])
