"""Several processes training one model: process groups, agreement between ranks, FSDP units, RNG states.

Launched with ``torchrun --nproc_per_node N``, each process (rank) trains on its slice of the
global batch; DDP averages the gradients, or FSDP shards parameters, gradients and optimizer state
(gloo on CPU, NCCL on GPU). Rank 0 alone writes logs and checkpoints.

The rule that keeps a multi-process run from hanging: every decision (stop, save, fail) is taken
from values all ranks share, so every rank takes it at the same step. When one rank's work fails,
the others learn of it before the next collective (:meth:`Ranks.rank0_then_all`,
:meth:`Ranks.every_rank_then_agree`) instead of waiting forever for a peer that gave up.

Under FSDP even a short sample is collective work (:func:`sample_in_lockstep`).

Each rank draws its own random streams (dropout, the data loader's order); a checkpoint keeps
every rank's, so a resumed run continues each stream where it stopped.
"""

from __future__ import annotations

import base64
import os

import torch

from scratchlm.device import pick_device


def init_distributed(device_preference: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under ``torchrun`` (WORLD_SIZE > 1) this joins the process group:
    NCCL with one GPU per process when CUDA is there, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, pick_device(device_preference)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


class Ranks:
    """This process's place among the ranks, and the small messages by which they agree.

    Control messages (stop flags, error reports, RNG states) go over gloo on the CPU, so they never
    make the host wait for the GPU; on a CPU run the default group is gloo already.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.control_group = None
        if world_size > 1:
            import torch.distributed as dist

            self.control_group = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD

    def shared(self, values: list[float], op: str = "max") -> list[float]:
        """Values every rank agrees on: the max over ranks, or rank 0's (``op="rank0"``)."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if op == "rank0":
            dist.broadcast(t, src=0, group=self.control_group)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.control_group)
        return out

    def rank0_then_all(self, work, what: str) -> None:
        """Run ``work`` on rank 0 only; if it fails (whatever the exception, Ctrl-C included), every
        rank raises (none is left waiting in a collective for a rank that gave up), rank 0 with the
        original error."""
        problem = None
        if self.is_main:
            try:
                work()
            except BaseException as e:  # noqa: B036 - told to every rank, then raised again
                problem = e
        if self.world_size > 1:
            message = [None if problem is None else f"{type(problem).__name__}: {problem}"]
            torch.distributed.broadcast_object_list(message, src=0, group=self.control_group)
            if message[0] is not None and problem is None:
                raise RuntimeError(f"rank 0 stopped the run, {what}: {message[0]}")
        if problem is not None:
            raise problem

    def every_rank_then_agree(self, work, what: str):
        """Run ``work`` on every rank; if it fails on any, every rank raises before the next
        collective (the failing ranks with their own error). Returns ``work()``'s result."""
        problem, result = None, None
        try:
            result = work()
        except BaseException as e:  # noqa: B036 - told to every rank, then raised again
            problem = e
        if self.world_size > 1:
            reports = self.gather(None if problem is None else f"{type(problem).__name__}: {problem}")
            failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
            if failed and problem is None:
                raise RuntimeError(f"rank {failed[0][0]} stopped the run, {what}: {failed[0][1]}")
        if problem is not None:
            raise problem
        return result


def block_units(model) -> list:
    """The modules FSDP shards as units of their own, before the root: every block of the model
    and of its multi-token-prediction modules (one all-gather per block in the forward)."""
    blocks = list(model.blocks)
    if getattr(model, "mtp", None) is not None:
        blocks += [m for m in model.mtp.modules() if isinstance(m, type(model.blocks[0]))]
    return blocks


@torch.no_grad()
def sample_in_lockstep(
    model, tokenizer, start: list[int], block_size: int, max_tokens: int, device: torch.device
) -> str:
    """A short sample from an FSDP-sharded model, which every rank must run together (each forward
    gathers the shards). Rank 0's choice of token is broadcast, so all ranks take the same number
    of steps even if their logits ever differed (a rank that stopped early would leave the others
    waiting for its shards forever). No KV cache: a short sample, rarely."""
    from scratchlm.generate.sampling import SamplingConfig, choose

    tok = tokenizer
    ids = list(start)
    generator = torch.Generator(device=device).manual_seed(0)
    config = SamplingConfig(temperature=0.8, top_k=50)
    T, out = block_size, []
    model.eval()
    try:
        for _ in range(max_tokens):
            logits, _ = model(torch.tensor([ids[-T:]], device=device), last_only=True)
            token = choose(logits[:, -1], config, generator=generator)  # (1, 1)
            torch.distributed.broadcast(token, src=0)
            if int(token) == tok.eot_token:
                break
            ids.append(int(token))
            out.append(int(token))
    finally:
        model.train()
    return tok.decode(out)


# --- random streams, per rank ------------------------------------------------------------------
def rng_to_json(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def rng_from_json(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state(device: torch.device, loader_generator: torch.Generator) -> dict:
    """This rank's random streams: CPU (dropout on CPU), its own GPU's, and the loader's."""
    return {
        "torch": rng_to_json(torch.get_rng_state()),
        "loader": rng_to_json(loader_generator.get_state()),
        "cuda": rng_to_json(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None,
    }


def set_rng_state(saved: dict, device: torch.device, loader_generator: torch.Generator) -> None:
    """Continue this rank's streams from ``saved`` (one entry of :func:`rng_states_by_rank`)."""
    torch.set_rng_state(rng_from_json(saved["torch"]))
    loader_generator.set_state(rng_from_json(saved["loader"]))
    if saved.get("cuda") and device.type == "cuda":
        torch.cuda.set_rng_state(rng_from_json(saved["cuda"]), device)


def rng_states_by_rank(rng: dict, device: torch.device) -> list[dict]:
    """Each saved rank's {torch, loader, cuda} states. Version 1 saved rank 0's CPU and loader states
    and *every* GPU's state (``get_rng_state_all``): the one for this process's device is kept."""
    if "ranks" in rng:
        return rng["ranks"]
    cuda_states = rng.get("cuda") or []
    index = device.index or 0 if device.type == "cuda" else None
    cuda = cuda_states[index] if index is not None and index < len(cuda_states) else None
    return [{"torch": rng["torch"], "loader": rng["loader"], "cuda": cuda}]
