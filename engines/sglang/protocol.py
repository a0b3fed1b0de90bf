"""What each supported SGLang release speaks, read from its own source (never imported), and how to pick it.

Contract:
- `PROTOCOLS` maps each release this project is contract-tested against (tests/test_sglang_contract.py reads the
  wheels' source) to a `Protocol`; `protocol_for(version)` returns the one whose release matches the leading
  `X.Y.Z` of a server's reported version, else raises `UnsupportedVersion` naming the supported releases.
- Facts, per release:
  0.5.5: no weight-update session; /update_weights_from_distributed has no `load_format` (an unknown field is
  dropped silently, so a flattened bucket would be read as per-tensor broadcasts: only per-tensor is spoken);
  /flush_cache takes no timeout; info routes /get_model_info and /get_server_info; no --admin-api-key;
  /update_weights_from_disk has no `flush_cache` field (always flushes).
  0.5.23: /update_weights_from_distributed and /update_weights_from_tensor answer 400 ("... must run between
  begin_weight_update() and end_weight_update()") outside a session opened by POST /begin_weight_update
  {selector} and closed by POST /end_weight_update {}; begin while one is open is refused, end without one too
  (`managers/scheduler_components/weight_updater.py`); /update_weights_from_disk needs no session;
  /flush_cache?timeout=S waits up to S seconds for the scheduler to become idle; /model_info and /server_info
  (the /get_* forms still answer but log a deprecation warning per call); --admin-api-key guards the control
  routes (then the plain API key is refused there, `utils/auth.py`).
- `stop_token_ids(...)`: the token ids at which SGLang 0.5.23 ends a request besides `sampling_params.stop_token_ids`
  (`Req._check_token_based_finish`): the model config's `eos_token_id` and the generation config's
  (`ModelConfig._get_hf_eos_token_id`), the tokenizer's `eos_token_id`, and the tokenizer's added tokens among
  `ADDITIONAL_STOP_TOKEN_TEXTS` (`attach_additional_stop_token_ids`).
- Messages the 0.5.23 scheduler answers (the CPU engine answers the same text; tests hold both to these).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class UnsupportedVersion(RuntimeError):
    """A server reports an SGLang version this project does not speak."""


@dataclass(frozen=True)
class Protocol:
    release: str  # the contract-tested release whose source this was read from
    session: bool  # /begin_weight_update ... /end_weight_update around distributed/tensor updates
    flat_buckets: bool  # load_format="flattened_bucket" on /update_weights_from_distributed
    flush_timeout: bool  # /flush_cache?timeout=<seconds>
    disk_flush_field: bool  # /update_weights_from_disk takes flush_cache
    admin_api_key: bool  # --admin-api-key exists
    model_info_path: str
    server_info_path: str


PROTOCOLS: dict[str, Protocol] = {
    "0.5.5": Protocol("0.5.5", False, False, False, False, False, "/get_model_info", "/get_server_info"),
    "0.5.23": Protocol("0.5.23", True, True, True, True, True, "/model_info", "/server_info"),
}
SUPPORTED_RELEASES = tuple(PROTOCOLS)
LATEST = PROTOCOLS[SUPPORTED_RELEASES[-1]]

# 0.5.23 scheduler_components/weight_updater.py and http_server.py answers (HTTP 400 with {"success", "message"})
MSG_NEEDS_SESSION = "{route} must run between begin_weight_update() and end_weight_update()"
MSG_SESSION_OPEN = "a weight-update session is already open; call end_weight_update() first"
MSG_NO_SESSION = "no weight-update session is open; call begin_weight_update() first"
MSG_FLUSH_TIMEOUT = "Timed out waiting for idle state."
MSG_FLUSH_FAILED = "Flush cache failed.\n"
MSG_FLUSH_OK = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)
ADDITIONAL_STOP_TOKEN_TEXTS = ("<|eom_id|>", "<|content_model_end_sampling|>", "<|ifm|im_end|>")


def protocol_for(version: str, where: str = "") -> Protocol:
    """The protocol of a server reporting `version` (e.g. "0.5.23" or "0.5.23.post1")."""
    m = re.match(r"\s*v?(\d+\.\d+\.\d+)", str(version or ""))
    proto = PROTOCOLS.get(m.group(1)) if m else None
    if proto is None:
        at = f"{where}: " if where else ""
        raise UnsupportedVersion(
            f"{at}SGLang {version!r} is not supported; this client speaks the releases it was tested against: "
            f"{', '.join(SUPPORTED_RELEASES)}"
        )
    return proto


def _ids(value: Any) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list | tuple | set):
        return {int(v) for v in value}
    return set()


def stop_token_ids(config: Any = None, generation_config: Any = None, tokenizer: Any = None) -> set[int]:
    """Token ids that end a request in SGLang besides sampling_params.stop_token_ids (unless ignore_eos)."""
    ids = _ids(getattr(config, "eos_token_id", None))
    ids |= _ids(getattr(generation_config, "eos_token_id", None))
    if tokenizer is not None:
        ids |= _ids(getattr(tokenizer, "eos_token_id", None))
        added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
        ids |= {int(added[t]) for t in ADDITIONAL_STOP_TOKEN_TEXTS if t in added}
    return ids
