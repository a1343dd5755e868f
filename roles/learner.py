"""Learner rank role: one DeepSpeed rank (gloo on CPU, NCCL on GPU) in a group of N."""
from __future__ import annotations

import os
import socket

from refine_ray.config import ExperimentConfig
from refine_ray.system.batches import DocBatch, LearnBatch
from roles.common import setup_process


class LearnerRankRole:
    """Rank ``rank`` of the DeepSpeed learner. It reads most config sections (model, data,
    refine, optim, learner, train), so it takes the whole config. Every method except
    ``address``/``ping`` must be called on every rank in lockstep (the controller's actor
    group does), each rank with its own documents."""

    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int):
        """Nothing heavy here: the engine is built by :meth:`init` once every rank's process is up."""
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.learner = None

    def address(self) -> tuple[str, int]:
        """This node's reachable IP and a free port (rank 0's serve the rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init(self, master_addr: str, master_port: int, vocab_size: int) -> bool:
        """Join the DeepSpeed group at ``master_addr:master_port`` and build the engine; waits at
        most ``learner.collective_timeout_s`` for the other ranks."""
        os.environ.update({"RANK": str(self.rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(self.world),
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        setup_process(self.cfg.train.seed)
        from refine_ray.system.learner import RefineLearner

        self.learner = RefineLearner(self.cfg, vocab_size)
        return True

    def train_step(self, batch: LearnBatch) -> dict:
        """One training step (an optimizer step per ``refine.ppo_mini_batch_size`` documents) on this
        rank's own documents (the controller shards by document). Raises FloatingPointError, the
        step not applied, for a non-finite gradient norm."""
        return self.learner.train_step(batch)

    def validation_nll(self, docs: DocBatch) -> tuple[float, int]:
        """(summed NTP loss in nats, predicted tokens) over this rank's held-out documents."""
        return self.learner.validation_nll(docs)

    def gather_weights(self):
        """Weight sync, object store: ``{name: ndarray}`` on rank 0, None elsewhere (collective under ZeRO-3)."""
        return self.learner.gather_weights()

    def join_weight_group(self, host: str, port: int, world: int, rank: int, group_id: int,
                          timeout_s: float) -> bool:
        """Weight sync, collective: rank 0 joins the broadcast group as its sender; others need not."""
        if self.rank == 0:
            self.learner.join_weight_group(host, port, world, rank, group_id, timeout_s)
        return True

    def send_weights(self, model_dtype: str, bucket_mb: float) -> int:
        """Weight sync, collective: broadcast the tensor set (every rank takes part in ZeRO-3 gathers)."""
        return self.learner.send_weights(model_dtype, bucket_mb)

    def save(self, path: str, client_state: dict) -> None:
        """DeepSpeed checkpoint of this rank's shards under ``path`` (tag ``ds``)."""
        self.learner.save(path, client_state)

    def load(self, path: str) -> dict:
        """Load this rank's shards from ``path`` (weights-only unpickling); returns the client state."""
        return self.learner.load(path)

    def ping(self) -> bool:
        """Liveness probe used by the actor group."""
        return True
