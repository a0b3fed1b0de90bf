"""The records that flow through the pipeline, as msgspec Structs (they cross ZMQ as msgpack, never pickle).

Contract (docs/DESIGN.md, Contracts): every sample carries its prompt id, group id, response token ids, behaviour
logprobs, per-token policy versions, reward, `acc`, finish reason and lengths. A `Group` is the G responses to
one prompt; it is the unit the buffer admits, filters and hands to the trainer.
The four per-token fields (`prompt_ids`, `response_ids`, `logprobs`, `versions`) are lists on the rollout side and
read-only numpy arrays (int32, int32, float64, int32: zero-copy views of the received frame) in the groups
`RolloutBuffer.get_batch` hands out, so no per-token Python object is made between the socket and the trainer's
collate; `as_lists(group)` gives the list form. Code reading samples uses `len()` and the properties below, which
hold for both.
`SCHEMA_VERSION` is bumped whenever a field or its wire encoding changes; receivers reject frames of another version.
"""

from __future__ import annotations

import msgspec
import numpy as np

SCHEMA_VERSION = 3  # 2: the per-token fields travel as packed arrays (pipeline/flow/transport.py); 3: routed experts


ROUTE_DTYPE = np.dtype("<i2")  # expert ids of the routed-experts records (-1: no record)


class Sample(msgspec.Struct, kw_only=True):
    prompt_id: str
    """Stable id of the dataset row (survives re-queueing and resume)."""
    group_id: str
    """Unique id of this generation attempt of the prompt."""
    index: int
    """Position within the group, 0..G-1."""
    prompt_ids: list[int]
    """Prompt token ids."""
    response_ids: list[int]
    """Generated token ids (without the prompt)."""
    logprobs: list[float]
    """Behaviour logprob of each response token under the policy that sampled it."""
    versions: list[int]
    """Policy version that produced each response token (differs within a sample after a resumed rollout)."""
    finish_reason: str = "stop"
    """stop | length | abort."""
    reward: float = 0.0
    """Shaped reward used for advantages (task reward plus overlong shaping)."""
    task_reward: float = 0.0
    """The reward function's value before shaping."""
    acc: bool = False
    """Whether the answer is correct (dynamic sampling and accuracy metrics use this)."""
    reward_failed: str = ""
    """Empty, or why the reward function failed (timeout, exception name); the sample then got the wrong-answer reward."""
    max_new_tokens: int = 0
    """L_max the sample was generated with (overlong shaping needs it)."""
    routed_experts: bytes = b""
    """MoE rollout routing replay (algorithm.routing_replay): the engine's top-k experts of every fed token (the
    prompt and the response but its last token), int16 little-endian, (prompt_len + response_len - 1, routed_layers,
    routed_topk) in C order; each token's own record, also across a resumed partial rollout. Empty: none."""
    routed_layers: int = 0
    """Layer axis of `routed_experts` (the model's num_hidden_layers); 0 without records."""
    routed_topk: int = 0
    """Top-k axis of `routed_experts`."""

    def routing(self) -> np.ndarray | None:
        """`routed_experts` as a read-only (tokens, layers, k) int16 array (a view), or None."""
        if not self.routed_layers or not len(self.routed_experts):
            return None
        return np.frombuffer(self.routed_experts, ROUTE_DTYPE).reshape(-1, self.routed_layers, self.routed_topk)

    @property
    def response_len(self) -> int:
        return len(self.response_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def min_version(self) -> int:
        v = self.versions
        if isinstance(v, np.ndarray):
            return int(v.min()) if v.size else -1
        return min(v) if v else -1


class Group(msgspec.Struct, kw_only=True):
    schema: int = SCHEMA_VERSION
    """Frame schema version."""
    prompt_id: str
    """Dataset row id."""
    group_id: str
    """Unique id of this attempt."""
    samples: list[Sample]
    """The G responses."""
    answer: str = ""
    """Reference answer (kept for logging and evaluation)."""
    attempt: int = 0
    """How many times this prompt was generated before in this epoch (dynamic-sampling rounds)."""
    epoch: int = 0
    """Dataset epoch the prompt was drawn in."""

    @property
    def min_version(self) -> int:
        return min(s.min_version for s in self.samples)

    @property
    def accs(self) -> list[bool]:
        return [s.acc for s in self.samples]


def as_lists(group: Group) -> Group:
    """The group with its per-token fields as Python lists (a copy when they are arrays)."""

    def listed(x: list | np.ndarray) -> list:
        return x.tolist() if isinstance(x, np.ndarray) else x

    samples = [
        msgspec.structs.replace(
            s, prompt_ids=listed(s.prompt_ids), response_ids=listed(s.response_ids), logprobs=listed(s.logprobs),
            versions=listed(s.versions), routed_experts=bytes(s.routed_experts),
        )
        for s in group.samples
    ]  # fmt: skip
    return msgspec.structs.replace(group, samples=samples)


class Prompt(msgspec.Struct, kw_only=True):
    """One row of the training set, tokenised."""

    prompt_id: str
    prompt_ids: list[int]
    answer: str
    text: str = ""
    attempt: int = 0
    epoch: int = 0
