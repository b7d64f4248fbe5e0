"""Test stand-in for the Hugging Face Hub: the endpoints ``huggingface_hub`` 2.4.0 calls to push and pull.

Not a Hub. It exists so the tests drive the real client over real HTTP on 127.0.0.1, with no
patching of the client. Each endpoint was read off the client's source (``hf_api.py``,
``_commit_api.py``, ``lfs.py``, ``file_download.py``, ``_snapshot_download.py``):

=====  =================================================  ======================================
verb   path                                               client call
=====  =================================================  ======================================
GET    /api/whoami-v2                                     HfApi.whoami
POST   /api/repos/create                                  HfApi.create_repo
GET    /api/models/{repo}[/revision/{rev}]                HfApi.repo_info / model_info
POST   /api/validate-yaml                                 create_commit, when README.md is added
POST   /api/models/{repo}/branch/{branch}                 HfApi.create_branch
POST   /api/models/{repo}/preupload/{rev}                 _fetch_upload_modes
POST   /{repo}.git/info/lfs/objects/batch                 lfs.post_lfs_batch_info
PUT    /_lfs/upload/{oid}?sig=...                         lfs._upload_single_part (the "S3" PUT)
POST   /_lfs/verify/{oid}                                 lfs.lfs_upload, verify action
POST   /api/models/{repo}/commit/{rev}                    _commit_api._send_commit (NDJSON)
GET    /api/models/{repo}/tree/{rev}[/{path}]             HfApi.list_repo_tree / list_repo_files
POST   /api/models/{repo}/paths-info/{rev}                HfApi.get_paths_info
GET    /api/models/{repo}/commits/{rev}                   HfApi.list_repo_commits
HEAD   /{repo}/resolve/{rev}/{path}                       file_download.get_hf_file_metadata
GET    /{repo}/resolve/{rev}/{path}                       file_download, the content
=====  =================================================  ======================================

Xet is not spoken: ``huggingface_hub`` decides on Xet client-side (``HF_HUB_DISABLE_XET``, read when
the client is imported), not from the server, so a client that tries it gets a 400 here naming
that switch; downloads never see an ``X-Xet-Hash`` header and so take plain HTTP.

Strict by design: a request whose method, path, query keys, headers or body shape this module does
not know is answered 400 with a message, so a test fails when the client's requests change shape.
Every API call needs ``Authorization: Bearer <token>``; an unknown token is 401, a read token or a
foreign namespace is 403. State (refs, commits, blobs, LFS objects) lives under a temporary folder.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SIZE_THRESHOLD = 5 * 1024 * 1024  # the client sends anything this big through LFS anyway
LFS_PATTERNS = (".safetensors", ".bin", ".pt", ".gguf")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra  # more keys of the JSON error body


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Entry:
    size: int
    blob_id: str  # git sha1 of the content (regular) or of the LFS pointer (LFS)
    lfs_oid: str | None = None
    pointer_size: int | None = None
    last_commit: str = ""


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)


class HubState:
    """Repos, objects and a log of the requests seen, shared by the handler threads."""

    def __init__(self, root: Path, tokens: dict[str, tuple[str, str]]):
        self.root = root
        self.tokens = tokens  # token -> (user name, "read" | "write")
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.ranged: list[tuple[str, str]] = []  # (file path, Range header) of partial reads
        self.failures: list[list] = []  # [method, path regex, status, remaining]
        self.corrupt: set[str] = set()  # paths a commit stores wrongly (to test the client-side check)
        self.secret = hashlib.sha256(str(time.time_ns()).encode()).hexdigest()
        (root / "lfs").mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    # -- objects on disk
    def lfs_path(self, oid: str) -> Path:
        return self.root / "lfs" / oid

    def blob_path(self, sha1: str) -> Path:
        return self.root / "blobs" / sha1

    def sign(self, oid: str) -> str:
        return hmac.new(self.secret.encode(), oid.encode(), hashlib.sha256).hexdigest()

    def commit_count(self, repo_id: str, branch: str = "main") -> int:
        with self.lock:
            repo = self.repos[repo_id]
            n, oid = 0, repo.refs.get(branch)
            while oid is not None:
                n += 1
                oid = repo.commits[oid].parent
            return n


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - keep the test output quiet
        pass

    # ---------------------------------------------------------------- plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head=False):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header(
            "Content-Length", str(len(body)) if "Content-Length" not in headers else headers["Content-Length"]
        )
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        with self.state.lock:
            self.state.requests.append((method, url.path))
            for rule in self.state.failures:
                if rule[3] > 0 and rule[0] == method and re.search(rule[1], url.path):
                    rule[3] -= 1
                    self._body()
                    return self._json(rule[2], {"error": f"injected failure {rule[2]}"})
        try:
            self._route(method, url.path, query)
        except BadRequest as e:
            headers = {"X-Error-Message": e.message}
            if e.error_code:
                headers["X-Error-Code"] = e.error_code
            self._json(e.status, {"error": e.message, **e.extra}, headers)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ---------------------------------------------------------------- checks
    def _user(self, *, required: bool = True, write: bool = False) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            if required:
                raise BadRequest(401, "Authorization: Bearer <token> header required")
            return None
        if not auth.startswith("Bearer "):
            raise BadRequest(400, "Authorization header must be 'Bearer <token>'")
        entry = self.state.tokens.get(auth[len("Bearer ") :])
        if entry is None:
            raise BadRequest(401, "Invalid credentials in Authorization header")
        if write and entry[1] != "write":
            raise BadRequest(403, "This token has no write permission")
        return entry[0]

    def _can_write(self, user: str, repo_id: str):
        if repo_id.split("/")[0] != user:
            raise BadRequest(403, f"You don't have the rights to write to {repo_id}")

    @staticmethod
    def _only(query: dict, allowed: set[str]):
        unknown = set(query) - allowed
        if unknown:
            raise BadRequest(400, f"unknown query parameter(s) {sorted(unknown)}")

    @staticmethod
    def _keys(obj, required: set[str], optional: set[str] = frozenset(), what="body"):
        if not isinstance(obj, dict):
            raise BadRequest(400, f"{what} must be a JSON object")
        missing, extra = required - set(obj), set(obj) - required - set(optional)
        if missing or extra:
            raise BadRequest(400, f"{what}: missing {sorted(missing)}, unknown {sorted(extra)}")

    def _json_body(self, content_type: str = "application/json"):
        if not self.headers.get("Content-Type", "").startswith(content_type):
            raise BadRequest(400, f"Content-Type must be {content_type}")
        try:
            return json.loads(self._body())
        except json.JSONDecodeError as e:
            raise BadRequest(400, f"body is not JSON: {e}") from None

    def _repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or repo_id.split("/")[0] != user)):
            raise BadRequest(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _head(self, repo: Repo, revision: str) -> Commit:
        oid = repo.refs.get(revision, revision if revision in repo.commits else None)
        if oid is None:
            raise BadRequest(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    # ---------------------------------------------------------------- routing
    def _route(self, method: str, path: str, query: dict):
        parts = [unquote(p) for p in path.split("/")[1:]]
        if method == "GET" and parts == ["api", "whoami-v2"]:
            self._only(query, set())
            user = self._user()
            return self._json(200, {"type": "user", "name": user, "auth": {"type": "access_token"}})
        if method == "POST" and parts == ["api", "repos", "create"]:
            self._only(query, set())
            return self._create_repo()
        if method == "POST" and parts == ["api", "validate-yaml"]:
            self._only(query, set())
            self._user()
            self._keys(self._json_body(), {"content", "repoType"})
            return self._json(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                return self._repo_info(repo_id, rest[1] if rest else "main", query)
            if len(rest) >= 2:
                op, revision, sub = rest[0], rest[1], "/".join(rest[2:])
                handler = {
                    ("POST", "branch"): self._create_branch,
                    ("POST", "preupload"): self._preupload,
                    ("POST", "commit"): self._commit,
                    ("GET", "tree"): self._tree,
                    ("POST", "paths-info"): self._paths_info,
                    ("GET", "commits"): self._commits,
                    ("GET", "xet-write-token"): self._xet,
                }.get((method, op))
                if handler is not None and (sub == "" or op == "tree"):
                    return handler(repo_id, revision, sub, query)
        if (
            method == "POST"
            and len(parts) == 6
            and parts[1].endswith(".git")
            and parts[2:] == ["info", "lfs", "objects", "batch"]
        ):
            self._only(query, set())
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        if method == "PUT" and len(parts) == 3 and parts[:2] == ["_lfs", "upload"]:
            return self._lfs_put(parts[2], query)
        if method == "POST" and len(parts) == 3 and parts[:2] == ["_lfs", "verify"]:
            self._only(query, set())
            return self._lfs_verify(parts[2])
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            self._only(query, set())
            return self._resolve(
                f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head=method == "HEAD"
            )
        raise BadRequest(400, f"hub stand-in does not know {method} {path}")

    # ---------------------------------------------------------------- repos
    def _create_repo(self):
        user = self._user(write=True)
        body = self._json_body()
        self._keys(body, {"name", "organization"}, {"visibility", "type"})
        if body.get("type", "model") != "model":
            raise BadRequest(400, "hub stand-in only hosts model repos")
        if body.get("visibility", "public") not in ("public", "private"):
            raise BadRequest(400, f"unknown visibility {body['visibility']!r}")
        if not _NAME.match(body["name"]):
            raise BadRequest(400, f"invalid repo name {body['name']!r}")
        repo_id = f"{body['organization'] or user}/{body['name']}"
        self._can_write(user, repo_id)
        url = f"http://{self.headers['Host']}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                # create_repo(exist_ok=True) reads the url from this 409 body
                raise BadRequest(409, "You already created this model repo", url=url)
            repo = Repo(repo_id, private=body.get("visibility") == "private")
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            self._store_blob(gitattributes)
            first = Commit(
                oid=self._commit_oid(repo_id, None, "initial commit"),
                parent=None,
                title="initial commit",
                message="",
                date=_now(),
                files={".gitattributes": Entry(len(gitattributes), git_blob_sha1(gitattributes))},
            )
            first.files[".gitattributes"].last_commit = first.oid
            repo.commits[first.oid] = first
            repo.refs["main"] = first.oid
            self.state.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _repo_info(self, repo_id: str, revision: str, query: dict):
        self._only(query, set())
        user = self._user(required=False)
        with self.state.lock:
            repo = self._repo(repo_id, user)
            head = self._head(repo, revision)
            self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": head.oid,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(head.files)],
                },
            )

    def _create_branch(self, repo_id, branch, _sub, query):
        self._only(query, set())
        user = self._user(write=True)
        self._can_write(user, repo_id)
        body = self._json_body()
        self._keys(body, set(), {"startingPoint"})
        with self.state.lock:
            repo = self._repo(repo_id, user)
            if branch in repo.refs:
                raise BadRequest(409, f"Reference already exists: {branch}")
            repo.refs[branch] = self._head(repo, body.get("startingPoint", "main")).oid
        self._json(200, {})

    # ---------------------------------------------------------------- upload
    def _preupload(self, repo_id, revision, _sub, query):
        self._only(query, set())
        user = self._user(write=True)
        self._can_write(user, repo_id)
        body = self._json_body()
        self._keys(body, {"files"}, {"gitIgnore"})
        out = []
        with self.state.lock:
            head = self._head(self._repo(repo_id, user), revision)
            for f in body["files"]:
                self._keys(f, {"path", "sample", "size"}, what="preupload file")
                base64.b64decode(f["sample"], validate=True)
                lfs = f["size"] >= LFS_SIZE_THRESHOLD or f["path"].endswith(LFS_PATTERNS)
                entry = head.files.get(f["path"])
                remote = None if entry is None else (entry.lfs_oid or entry.blob_id)
                out.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": remote,
                    }
                )
        self._json(200, {"files": out, "commitOid": head.oid})

    def _xet(self, repo_id, revision, _sub, query):
        raise BadRequest(400, "this hub stand-in speaks LFS only, not Xet: set HF_HUB_DISABLE_XET=1")

    def _lfs_batch(self, repo_id: str):
        user = self._user(write=True)
        self._can_write(user, repo_id)
        if self.headers.get("Accept") != "application/vnd.git-lfs+json":
            raise BadRequest(400, "LFS batch needs Accept: application/vnd.git-lfs+json")
        body = self._json_body("application/vnd.git-lfs+json")
        self._keys(body, {"operation", "transfers", "objects", "hash_algo"}, {"ref"})
        if body["operation"] != "upload" or body["hash_algo"] != "sha256" or "basic" not in body["transfers"]:
            raise BadRequest(400, "LFS batch: only operation=upload, hash_algo=sha256, transfer basic")
        self._repo(repo_id, user)
        base = f"http://{self.headers['Host']}"
        objects = []
        for obj in body["objects"]:
            self._keys(obj, {"oid", "size"}, what="LFS object")
            oid, size = obj["oid"], obj["size"]
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                raise BadRequest(400, f"bad LFS oid {oid!r}")
            item = {"oid": oid, "size": size, "authenticated": True}
            if not self.state.lfs_path(oid).exists():
                item["actions"] = {
                    "upload": {"href": f"{base}/_lfs/upload/{oid}?sig={self.state.sign(oid)}&size={size}"},
                    "verify": {"href": f"{base}/_lfs/verify/{oid}", "header": {}},
                }
            objects.append(item)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_put(self, oid: str, query: dict):
        self._only(query, {"sig", "size"})
        if "Authorization" in self.headers:
            raise BadRequest(400, "the pre-signed LFS upload URL takes no Authorization header")
        if not hmac.compare_digest(query.get("sig", [""])[0], self.state.sign(oid)):
            raise BadRequest(403, "bad signature on LFS upload URL")
        data = self._body()
        if len(data) != int(query["size"][0]) or hashlib.sha256(data).hexdigest() != oid:
            raise BadRequest(400, f"LFS object {oid} arrived with the wrong size or sha256")
        tmp = self.state.lfs_path(oid).with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(self.state.lfs_path(oid))
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, oid: str):
        self._user(write=True)
        body = self._json_body()
        self._keys(body, {"oid", "size"})
        path = self.state.lfs_path(oid)
        if body["oid"] != oid or not path.exists() or path.stat().st_size != body["size"]:
            raise BadRequest(404, f"LFS object {oid} not uploaded")
        self._json(200, {})

    def _store_blob(self, data: bytes) -> str:
        sha1 = git_blob_sha1(data)
        self.state.blob_path(sha1).write_bytes(data)
        return sha1

    def _commit_oid(self, repo_id: str, parent: str | None, salt: str) -> str:
        return hashlib.sha1(f"{repo_id}|{parent}|{salt}|{time.time_ns()}".encode()).hexdigest()

    def _commit(self, repo_id, revision, _sub, query):
        self._only(query, set())
        user = self._user(write=True)
        self._can_write(user, repo_id)
        if self.headers.get("Content-Type") != "application/x-ndjson":
            raise BadRequest(400, "commit body must be application/x-ndjson")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise BadRequest(400, "commit: first NDJSON line must be the header")
        self._keys(lines[0], {"key", "value"}, what="commit line")
        header = lines[0]["value"]
        self._keys(header, {"summary", "description"}, {"parentCommit"}, what="commit header")
        with self.state.lock:
            repo = self._repo(repo_id, user)
            if revision not in repo.refs:
                raise BadRequest(404, f"Invalid rev id: {revision} is not a branch", "RevisionNotFound")
            parent = self._head(repo, revision)
            if header.get("parentCommit") not in (None, parent.oid):
                raise BadRequest(412, "parentCommit is not the head of the branch")
            files = {p: Entry(**vars(e)) for p, e in parent.files.items()}
            oid = self._commit_oid(repo_id, parent.oid, header["summary"])
            for line in lines[1:]:
                self._keys(line, {"key", "value"}, what="commit line")
                key, value = line["key"], line["value"]
                if key == "file":
                    self._keys(value, {"content", "path", "encoding"}, what="file op")
                    if value["encoding"] != "base64":
                        raise BadRequest(400, "file op: encoding must be base64")
                    data = base64.b64decode(value["content"], validate=True)
                    if value["path"] in self.state.corrupt:
                        data = data[:-1] + bytes([data[-1] ^ 1])
                    files[value["path"]] = Entry(len(data), self._store_blob(data), last_commit=oid)
                elif key == "lfsFile":
                    self._keys(value, {"path", "algo", "oid", "size"}, what="lfsFile op")
                    obj = self.state.lfs_path(value["oid"])
                    if value["algo"] != "sha256" or not obj.exists() or obj.stat().st_size != value["size"]:
                        raise BadRequest(422, f"LFS object for {value['path']} was never uploaded")
                    lfs_oid = value["oid"]
                    if value["path"] in self.state.corrupt:
                        lfs_oid = hashlib.sha256(lfs_oid.encode()).hexdigest()
                    pointer = lfs_pointer(lfs_oid, value["size"])
                    files[value["path"]] = Entry(
                        value["size"], git_blob_sha1(pointer), lfs_oid, len(pointer), last_commit=oid
                    )
                elif key == "deletedFile":
                    self._keys(value, {"path"}, what="deletedFile op")
                    if files.pop(value["path"], None) is None:
                        raise BadRequest(404, "A file with this name doesn't exist", "EntryNotFound")
                else:
                    raise BadRequest(400, f"commit: unknown operation {key!r}")
            repo.commits[oid] = Commit(
                oid, parent.oid, header["summary"], header["description"], _now(), files
            )
            repo.refs[revision] = oid
        self._json(
            200,
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{oid}",
                "hookOutput": "",
            },
        )

    # ---------------------------------------------------------------- read
    def _file_json(self, repo: Repo, path: str, e: Entry, expand: bool) -> dict:
        out = {"type": "file", "oid": e.blob_id, "size": e.size, "path": path}
        if e.lfs_oid is not None:
            out["lfs"] = {"oid": e.lfs_oid, "size": e.size, "pointerSize": e.pointer_size}
        if expand:
            c = repo.commits[e.last_commit]
            out["lastCommit"] = {"id": c.oid, "title": c.title, "date": c.date}
        return out

    @staticmethod
    def _bool(query: dict, key: str) -> bool:
        value = query.get(key, ["false"])[0].lower()
        if value not in ("true", "false", "1", "0"):
            raise BadRequest(400, f"{key} must be a boolean, got {value!r}")
        return value in ("true", "1")

    def _tree(self, repo_id, revision, sub, query):
        self._only(query, {"recursive", "expand"})
        recursive, expand = self._bool(query, "recursive"), self._bool(query, "expand")
        user = self._user(required=False)
        prefix = sub.strip("/") + "/" if sub else ""
        with self.state.lock:
            repo = self._repo(repo_id, user)
            head = self._head(repo, revision)
            out, dirs = [], set()
            for path in sorted(head.files):
                if not path.startswith(prefix):
                    continue
                rel = path[len(prefix) :]
                if "/" in rel and not recursive:
                    dirs.add(prefix + rel.split("/")[0])
                    continue
                out.append(self._file_json(repo, path, head.files[path], expand))
            if prefix and not out and not dirs:
                raise BadRequest(404, f"{sub} does not exist", "EntryNotFound")
            out += [
                {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(dirs)
            ]
        self._json(200, out)

    def _paths_info(self, repo_id, revision, _sub, query):
        self._only(query, set())
        user = self._user(required=False)
        if not self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            raise BadRequest(400, "paths-info takes a form-encoded body")
        form = parse_qs(self._body().decode(), keep_blank_values=True)
        self._only(form, {"paths", "expand"})
        expand = self._bool(form, "expand")
        with self.state.lock:
            repo = self._repo(repo_id, user)
            head = self._head(repo, revision)
            out = [
                self._file_json(repo, p, head.files[p], expand)
                for p in form.get("paths", [])
                if p in head.files
            ]
        self._json(200, out)

    def _commits(self, repo_id, revision, _sub, query):
        self._only(query, set())
        user = self._user(required=False)
        with self.state.lock:
            repo = self._repo(repo_id, user)
            commit, out = self._head(repo, revision), []
            while commit is not None:
                out.append(
                    {
                        "id": commit.oid,
                        "title": commit.title,
                        "message": commit.message,
                        "date": commit.date,
                        "authors": [{"user": repo_id.split("/")[0]}],
                    }
                )
                commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(200, out)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool):
        user = self._user(required=False)
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if self.headers.get("Range") and not ranged:
            raise BadRequest(400, "hub stand-in serves one byte range bytes=a-[b] at most")
        with self.state.lock:
            commit = self._head(self._repo(repo_id, user), revision)
            entry = commit.files.get(path)
            if entry is None:
                raise BadRequest(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "Content-Length": str(entry.size),
        }
        if entry.lfs_oid is not None:
            source = self.state.lfs_path(entry.lfs_oid)
            headers.update(
                {
                    "ETag": f'"{entry.lfs_oid}"',
                    "X-Linked-Etag": f'"{entry.lfs_oid}"',
                    "X-Linked-Size": str(entry.size),
                }
            )
        else:
            source = self.state.blob_path(entry.blob_id)
            headers["ETag"] = f'"{entry.blob_id}"'
        if ranged:  # what get_safetensors_metadata asks for: a shard's header, not its data
            self.state.ranged.append((path, self.headers["Range"]))
            first = int(ranged.group(1))
            last = min(int(ranged.group(2) or entry.size - 1), entry.size - 1)
            with open(source, "rb") as f:
                f.seek(first)
                body = f.read(max(0, last - first + 1))
            headers.update({"Content-Length": str(len(body)), "Content-Range": f"bytes {first}-{last}/{entry.size}"})
            return self._send(206, b"" if head else body, headers, head=head)
        self._send(200, b"" if head else source.read_bytes(), headers, head=head)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class HubStandIn:
    """Start with :meth:`start`; ``endpoint`` is ``http://127.0.0.1:<random free port>``."""

    def __init__(self, root: Path, tokens: dict[str, tuple[str, str]]):
        self.state = HubState(root, tokens)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="hub-stand-in",
            daemon=True,
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "HubStandIn":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def fail(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` matching requests with ``status`` (transient-failure injection)."""
        with self.state.lock:
            self.state.failures.append([method, path_regex, status, times])
