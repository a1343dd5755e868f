"""Learner rank role: one DeepSpeed rank (gloo on CPU, NCCL on GPU) in a group of N."""
from __future__ import annotations

import os
import socket

from refine_ray.system.batches import LearnBatch
from refine_ray.config import ExperimentConfig
from roles.common import setup_process


class LearnerRankRole:
    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.learner = None

    def address(self) -> tuple[str, int]:
        """Rank 0's reachable address and a free port for torch.distributed rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init(self, master_addr: str, master_port: int, vocab_size: int) -> bool:
        os.environ.update({"RANK": str(self.rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(self.world),
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        setup_process(self.cfg.train.seed)
        from refine_ray.system.learner import RefineLearner

        self.learner = RefineLearner(self.cfg, vocab_size)
        return True

    def train_step(self, batch: LearnBatch) -> dict:
        return self.learner.train_step(batch.shard(self.rank, self.world))

    def full_state_dict(self):
        return self.learner.full_state_dict()

    def save(self, path: str, client_state: dict) -> None:
        self.learner.save(path, client_state)

    def load(self, path: str) -> dict:
        return self.learner.load(path)

    def join_weight_group(self, host: str, port: int, world: int, group_id: int) -> bool:
        self.learner.join_weight_group(host, port, world, group_id)
        return True

    def broadcast_weights(self, version: int) -> int:
        return self.learner.broadcast_weights()

    def validation_nll(self, docs) -> tuple[float, int]:
        """Every rank takes part (ZeRO-3 forwards are collective); rank r scores documents r::world
        (under ZeRO-3 a rank with one document fewer runs an uncounted dummy, see the learner)."""
        return self.learner.validation_nll(docs.select(list(range(self.rank, len(docs), self.world))))

    def ping(self) -> bool:
        return True
