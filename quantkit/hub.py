"""Push a finished quantkit output folder to the Hugging Face Hub, and prove it arrived.

`push_folder` refuses a folder that is not a complete output (`check_complete_output`) before it
sends anything, then talks to the Hub only through `huggingface_hub`:

1. ``whoami`` checks the token and that the endpoint is a Hub at all;
2. ``create_repo(exist_ok=True)`` (and ``create_branch(exist_ok=True)`` for another revision);
3. ``upload_folder``: one commit; large files go through the client's own large-file path
   (Xet when ``hf_xet`` is installed and ``HF_HUB_DISABLE_XET`` is unset, else LFS). The model
   card is the README.md already in the folder. Remote ``*.safetensors`` and
   ``*.safetensors.index.json`` that the folder no longer has are deleted in the same commit, so
   an old single-file ``model.safetensors`` cannot shadow a new sharded checkpoint;
4. ``list_repo_tree(expand=True)`` at the new commit: every local file must be there with the same
   size, and the same sha256 (LFS) or git blob id (regular files), else `HubError` names the file.

There is no size threshold choosing another uploader: huggingface_hub 2.x dropped
``upload_large_folder``; its ``upload_folder`` streams big folders itself and resumes when re-run.
A quantkit output (config, tokenizer, card, at most a few hundred shards) is committed at once.

Failures: connection errors, timeouts, 408/429/5xx are retried with exponential backoff
(`RetryPolicy`: attempts, delays and the sleep function are injectable). Re-running a step is safe:
the client skips files whose remote oid already matches. Anything else (401, 403, 404, an endpoint
that does not answer like a Hub) becomes one `HubError` line saying what to do. The token is never
logged and is scrubbed from every message this module raises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx2  # the HTTP library huggingface_hub 2.x is built on; its errors reach us unwrapped
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id

from quantkit.errors import ExportError, HubError
from quantkit.shard_check import check_complete_safetensors, shard_entries

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_SKIPPED_DIRS = (".git", ".cache")  # upload_folder's default ignore patterns skip these too
_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: ``base_delay * 2**n`` seconds, capped, ``max_attempts`` tries."""

    max_attempts: int = 5
    base_delay: float = 2.0
    max_delay: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1))


@dataclass(frozen=True)
class PushResult:
    """What a push left on the Hub, after verification."""

    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    files: tuple[str, ...]
    changed: bool  # False: the branch already held exactly these files, no commit was made


def check_complete_output(folder: str | Path) -> None:
    """Raise `ExportError` unless ``folder`` is a finished quantkit output.

    Complete means: ``config.json`` with a ``quantization_config``; ``model.safetensors`` or
    ``model.safetensors.index.json`` whose ``weight_map`` shards all exist; ``tokenizer.json`` or
    ``tokenizer_config.json``; and ``README.md`` (the model card).

    Example:
        >>> check_complete_output("out/llama8b-awq")  # doctest: +SKIP
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder", field="folder", value=str(folder), file=folder,
                          hint="give the output_dir of a finished quantization")
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("quantization_config"), dict):
        raise _incomplete(folder / "config.json", "has no quantization_config: it is not a quantized output")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise _incomplete(index, "has no weight_map")
        missing = sorted({s for s in weight_map.values() if not (folder / s).is_file()})
        if missing:
            raise _incomplete(index, f"names shards that are not in {folder}: {', '.join(missing)}")
    elif not (folder / "model.safetensors").is_file():
        raise _incomplete(folder, "has neither model.safetensors nor model.safetensors.index.json")
    for shard in sorted(folder.glob("*.safetensors")):
        check_complete_safetensors(shard)
    if index.is_file():
        for name, shard in sorted(weight_map.items()):
            if name not in shard_entries(folder / shard)[0]:
                raise _incomplete(index, f"lists tensor {name} in {shard}, which does not hold it")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise _incomplete(folder, f"has no tokenizer file ({' or '.join(TOKENIZER_FILES)})")
    if not (folder / "README.md").is_file():
        raise _incomplete(folder, "has no README.md model card")


def _incomplete(path: Path, what: str) -> ExportError:
    return ExportError(f"{path} {what}", file=path, hint="re-run the quantization into a fresh output_dir")


def check_repo_id(repo_id: str) -> None:
    """Raise `HubError` unless ``repo_id`` is a valid Hub model id (``namespace/name`` or ``name``)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"'{repo_id}' is not a valid Hub repo id ({' '.join(str(e).split())})", field="repo_id",
                       value=repo_id, hint="use namespace/name: letters, digits, '-', '_' and '.'") from None


def _read_json(path: Path):
    if not path.is_file():
        raise _incomplete(path, "is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _incomplete(path, f"is not valid JSON ({e})") from None


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    retry: RetryPolicy | None = None,
) -> PushResult:
    """Upload a complete quantkit output folder to ``repo_id`` in one commit and verify it.

    Args:
        folder: the output_dir of a finished quantization (checked before anything is sent).
        repo_id: ``"namespace/name"``; created if missing.
        private: create the repo private; a push to an existing public repo is then refused.
        revision: branch to commit to (created from ``main`` if missing); default ``main``.
        commit_message: default ``"Upload <folder name> with quantkit"``.
        token: default ``HF_TOKEN``, then the login stored by ``hf auth login``.
        endpoint: default ``HF_ENDPOINT``, then https://huggingface.co.
        retry: how transient failures are retried; default `RetryPolicy()`.

    Example:
        >>> push_folder("out/llama8b-awq", "me/llama8b-awq", private=True)  # doctest: +SKIP
        PushResult(repo_id='me/llama8b-awq', revision='main', commit_oid='3f2a…', ...)
    """
    folder = Path(folder).expanduser()
    check_repo_id(repo_id)
    check_complete_output(folder)
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token", field="HF_TOKEN",
                       hint="set HF_TOKEN or run `hf auth login`, then push again")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    branch = revision or constants.DEFAULT_REVISION
    policy = retry or RetryPolicy()
    api = HfApi(endpoint=endpoint, token=token, library_name="quantkit")

    def call(step: str, fn: Callable[[], _T], *, retry_connect: bool = True) -> _T:
        return _with_retries(
            step, fn, policy, endpoint=endpoint, repo_id=repo_id, token=token, retry_connect=retry_connect
        )

    # A refused connection on the first request is a wrong endpoint far more often than a blip.
    user = call("check the token", api.whoami, retry_connect=False)
    if not isinstance(user, dict):
        raise _endpoint_error(endpoint, "GET /api/whoami-v2 did not answer a JSON object")
    log.info("pushing %s to %s@%s on %s as %s", folder, repo_id, branch, endpoint, user.get("name", "?"))
    call(
        "create the repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    )
    if branch != constants.DEFAULT_REVISION:
        call("create the branch", lambda: api.create_branch(repo_id, branch=branch, exist_ok=True))
    before = call("read the repo", lambda: api.repo_info(repo_id, revision=branch))
    if private and not before.private:
        raise HubError(f"{repo_id} already exists and is public, but the push asked for private",
                       field="push.private", value=True,
                       hint=f"make it private on {endpoint}/{repo_id}/settings or push to another repo_id")
    message = commit_message or f"Upload {folder.name} with quantkit"
    info = call(
        "upload",
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=branch,
            commit_message=message,
            delete_patterns=STALE_WEIGHT_PATTERNS,
        ),
    )
    remote = call(
        "list the uploaded files",
        lambda: list(api.list_repo_tree(repo_id, revision=info.oid, recursive=True, expand=True)),
    )
    files = _verify(folder, remote, f"{repo_id}@{branch}")
    changed = info.oid != before.sha
    log.info(
        "%s %s@%s: %d files verified, commit %s",
        "pushed to" if changed else "nothing new for",
        repo_id,
        branch,
        len(files),
        info.oid,
    )
    return PushResult(repo_id, branch, info.oid, info.commit_url, files, changed)


# ---------------------------------------------------------------------------- verification


def _local_files(folder: Path) -> dict[str, Path]:
    return {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part in _SKIPPED_DIRS for part in p.relative_to(folder).parts)
    }


def _hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, read once in chunks."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


def _verify(folder: Path, remote_entries: list, where: str) -> tuple[str, ...]:
    remote = {e.path: e for e in remote_entries if isinstance(e, RepoFile)}
    local = _local_files(folder)
    for rel, path in local.items():
        entry = remote.get(rel)
        if entry is None:
            raise HubError(f"{rel} is missing from {where} after the upload", file=rel, hint="push again")
        size = path.stat().st_size
        if entry.size != size:
            raise HubError(f"{rel} on {where} has {entry.size} bytes, the local file {size}", file=rel,
                           value=entry.size, hint="push again")
        sha256, sha1 = _hashes(path)
        if entry.lfs is not None and entry.lfs.sha256 != sha256:
            raise HubError(f"{rel} on {where} has sha256 {entry.lfs.sha256}, the local file {sha256}", file=rel,
                           value=entry.lfs.sha256, hint="push again")
        if entry.lfs is None and entry.blob_id != sha1:
            raise HubError(f"{rel} on {where} differs from the local file (git blob {entry.blob_id} vs {sha1})",
                           file=rel, value=entry.blob_id, hint="push again")
    extra = sorted(set(remote) - set(local) - {".gitattributes"})
    if extra:
        log.info("%s also holds files this folder does not have: %s", where, ", ".join(extra))
    log.debug("verified %d files on %s", len(local), where)
    return tuple(local)


# ---------------------------------------------------------------------------- failures


def _with_retries(
    step: str,
    fn: Callable[[], _T],
    policy: RetryPolicy,
    *,
    endpoint: str,
    repo_id: str,
    token: str,
    retry_connect: bool,
) -> _T:
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return fn()
        except HubError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted below; anything unknown is re-raised as is
            cause = _root_cause(exc)
            if cause is None:
                raise
            transient = _is_transient(cause) and (retry_connect or not isinstance(cause, httpx2.ConnectError))
            if transient and attempt < policy.max_attempts:
                delay = policy.delay(attempt)
                log.warning(
                    "%s: %s; retry %d of %d in %.0f s",
                    step,
                    _redact(_describe(cause), token),
                    attempt,
                    policy.max_attempts - 1,
                    delay,
                )
                policy.sleep(delay)
                continue
            error = _hub_error(step, cause, transient, attempt, endpoint=endpoint, repo_id=repo_id)
            raise _redacted(error, token) from exc
    raise AssertionError("unreachable")  # the loop returns or raises


def _root_cause(exc: BaseException) -> BaseException | None:
    """The first error in the chain that says what went wrong on the wire, if any."""
    seen = exc
    while seen is not None:
        # hf_xet (Rust) reports its HTTP failures as the builtin ConnectionError, status in the text
        if isinstance(seen, (HfHubHTTPError, httpx2.TransportError, json.JSONDecodeError, ConnectionError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, HfHubHTTPError):
        return _status(exc) in RETRY_STATUS
    if isinstance(exc, ConnectionError):
        return "client error" not in str(exc).lower()
    return isinstance(exc, httpx2.TransportError)


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    return f"HTTP {status}" if status is not None else f"{type(exc).__name__}: {exc}".rstrip(": ")


def _endpoint_error(endpoint: str, what: str) -> HubError:
    return HubError(f"{endpoint} does not answer like a Hugging Face Hub ({what})", field="HF_ENDPOINT",
                    value=endpoint, hint="check HF_ENDPOINT or the endpoint setting")


def _hub_error(
    step: str, exc: BaseException, transient: bool, attempts: int, *, endpoint: str, repo_id: str
) -> HubError:
    status = _status(exc)
    url = str(getattr(getattr(getattr(exc, "response", None), "request", None), "url", ""))
    if transient:
        return HubError(f"{step}: the Hub at {endpoint} kept failing ({_describe(exc)}) after {attempts} attempts",
                        value=_status(exc), hint="try again later; re-running the push resumes where it stopped")
    if "xet" in url.lower() or "xet" in str(exc).lower():
        return HubError(f"{step}: the Hub at {endpoint} refused the Xet upload protocol", field="HF_HUB_DISABLE_XET",
                        hint="set HF_HUB_DISABLE_XET=1 to upload through plain LFS")
    if isinstance(exc, httpx2.ConnectError):
        return HubError(f"cannot connect to {endpoint} ({exc})", field="HF_ENDPOINT", value=endpoint,
                        hint="check HF_ENDPOINT and the network")
    if isinstance(exc, json.JSONDecodeError):
        return _endpoint_error(endpoint, f"{step}: the answer is not JSON")
    if status == 401:
        return HubError(f"{step}: {endpoint} rejected the token (401)", field="HF_TOKEN", value=401,
                        hint="set HF_TOKEN to a valid token with write access or run `hf auth login`")
    if status == 403:
        return HubError(f"{step}: the token may not write to {repo_id} (403)", field="push.repo_id", value=repo_id,
                        hint="use a token with write access to its namespace, or push to a repo_id under your own name")
    if status == 404 and step == "check the token":
        return _endpoint_error(endpoint, "GET /api/whoami-v2 answered 404")
    if status == 404:
        return HubError(f"{step}: {repo_id} or its revision was not found on {endpoint} (404)", field="push.repo_id",
                        value=repo_id, hint="check repo_id and revision")
    server = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
    return HubError(f"{step}: the Hub at {endpoint} answered {_describe(exc)}: {server}", value=status)


def _redacted(error: HubError, token: str) -> HubError:
    """``error`` with the token scrubbed from every part."""
    parts = {k: _redact(v, token) if isinstance(v, str) else v
             for k, v in (("field", error.field), ("value", error.value), ("hint", error.hint), ("file", error.file))}
    return HubError(_redact(error.message, token), **parts)


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text
