"""A minimal Hugging Face Hub served on 127.0.0.1, for testing `push_to_hub` and loading by repo id offline.

It implements only what `huggingface_hub` 2.4 calls for `create_repo`, `upload_folder`/`create_commit` (YAML check,
preupload, an NDJSON commit of regular base64 files — LFS/Xet uploads are refused) and for `snapshot_download` /
`hf_hub_download` (repo info with siblings, HEAD/GET on `/{repo}/resolve/{revision}/{path}`). Repos live in memory;
every commit is a full snapshot with its own 40-hex sha. Point a *child* process at it with `HF_ENDPOINT=hub.endpoint`
(set before `huggingface_hub` is imported). Every request is recorded in `hub.requests` as (method, path).

    with FakeHub() as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "fake-token"}
        ...  # run children with env
        hub.files("org/name")  # {path: bytes} at the latest commit
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

MAX_REQUESTS = 2000  # a runaway client gets 429s instead of looping forever
MAX_BODY_BYTES = 256 * 1024 * 1024


def git_blob_sha(content: bytes) -> str:
    """The oid git (and the Hub) gives a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """In-memory Hub; `endpoint` is the URL to use as HF_ENDPOINT."""

    def __init__(self, host: str = "127.0.0.1"):
        self.repos: dict[str, list[tuple[str, dict[str, bytes]]]] = {}  # repo id -> [(commit sha, files)]
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, 0), self._handler_class())
        self.server.daemon_threads = True
        self.endpoint = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self._snapshot(repo_id, revision)[1])

    def _snapshot(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]]:
        history = self.repos[repo_id]
        if revision == "main":
            return history[-1]
        for sha, files in history:
            if sha == revision:
                return sha, files
        raise KeyError(revision)

    def _commit(self, repo_id: str, files: dict[str, bytes], summary: str) -> str:
        parent = self.repos[repo_id][-1][0] if self.repos[repo_id] else ""
        sha = hashlib.sha1(f"{parent}{summary}{len(self.repos[repo_id])}".encode() + repr(sorted(files)).encode())
        self.repos[repo_id].append((sha.hexdigest(), files))
        return sha.hexdigest()

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_HEAD(self) -> None:
                self._dispatch("HEAD")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def _dispatch(self, method: str) -> None:
                path = urlsplit(self.path).path
                with hub.lock:
                    hub.requests.append((method, path))
                    too_many = len(hub.requests) > MAX_REQUESTS
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    return self._json(413, {"error": "body too large"})
                body = self.rfile.read(length) if length else b""
                if too_many:
                    return self._json(429, {"error": "fake hub request limit reached"})
                with hub.lock:
                    routes = [
                        ("POST", r"/api/repos/create", self._create_repo),
                        ("POST", r"/api/validate-yaml", self._validate_yaml),
                        ("GET", r"/api/whoami-v2", self._whoami),
                        ("GET", r"/api/agent-harnesses", self._agent_harnesses),
                        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<folder>.+))?", self._tree),
                        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
                        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._create_commit),
                        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
                        ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
                        ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
                    ]
                    for route_method, pattern, handler in routes:
                        match = re.fullmatch(pattern, path)
                        if route_method == method and match:
                            args = {key: unquote(value) for key, value in match.groupdict().items() if value}
                            return handler(body=body, head=method == "HEAD", **args)
                return self._json(404, {"error": f"fake hub does not implement {method} {path}"})

            # ---- responses ----
            def _send(self, status: int, payload: bytes, headers: dict[str, str], head: bool = False) -> None:
                self.send_response(status)
                for key, value in {"Content-Length": str(len(payload)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(payload)

            def _json(self, status: int, data, headers: dict[str, str] | None = None, head: bool = False) -> None:
                self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

            def _missing_repo(self, repo: str, head: bool = False) -> None:
                self._json(404, {"error": f"Repository {repo} not found"}, {"X-Error-Code": "RepoNotFound"}, head)

            # ---- API ----
            def _create_repo(self, body: bytes, **_) -> None:
                payload = json.loads(body)
                repo = f"{payload.get('organization') or 'user'}/{payload['name']}"
                if repo in hub.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo}"})
                hub.repos[repo] = []
                hub._commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "init")
                self._json(200, {"url": f"{hub.endpoint}/{repo}", "name": repo})

            def _validate_yaml(self, body: bytes, **_) -> None:
                content = json.loads(body)["content"]
                match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
                if match is None:
                    return self._json(200, {"warnings": [{"message": "empty or missing yaml metadata"}]})
                try:
                    metadata = yaml.safe_load(match.group(1))
                except yaml.YAMLError as error:
                    return self._json(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
                if not isinstance(metadata, dict):
                    return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
                errors = _model_index_errors(metadata.get("model-index"))
                if errors:
                    return self._json(400, {"errors": [{"message": message} for message in errors]})
                self._json(200, {"warnings": []})

            def _whoami(self, **_) -> None:
                self._json(200, {"type": "user", "name": "user", "orgs": [], "auth": {"type": "access_token"}})

            def _agent_harnesses(self, **_) -> None:
                self._json(200, {"standardEnvVars": [], "harnesses": {}})

            def _tree(self, repo: str, rev: str, folder: str = "", **_) -> None:
                if repo not in hub.repos:
                    return self._missing_repo(repo)
                prefix = folder.rstrip("/") + "/" if folder else ""
                entries = [
                    {"type": "file", "path": name, "size": len(content), "oid": git_blob_sha(content)}
                    for name, content in sorted(hub._snapshot(repo, rev)[1].items())
                    if name.startswith(prefix)
                ]
                self._json(200, entries)

            def _preupload(self, repo: str, rev: str, body: bytes, **_) -> None:
                if repo not in hub.repos:
                    return self._missing_repo(repo)
                current = hub._snapshot(repo, rev)[1]
                files = [
                    {
                        "path": entry["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha(current[entry["path"]]) if entry["path"] in current else None,
                    }
                    for entry in json.loads(body)["files"]
                ]
                self._json(200, {"files": files, "commitOid": hub._snapshot(repo, rev)[0]})

            def _create_commit(self, repo: str, rev: str, body: bytes, **_) -> None:
                if repo not in hub.repos:
                    return self._missing_repo(repo)
                files = dict(hub._snapshot(repo, rev)[1])
                summary = ""
                for line in body.splitlines():
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "header":
                        summary = value["summary"]
                    elif key == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                    else:
                        return self._json(400, {"error": f"fake hub does not support commit operation {key!r}"})
                sha = hub._commit(repo, files, summary)
                self._json(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha})

            def _repo_info(self, repo: str, rev: str = "main", **_) -> None:
                if repo not in hub.repos:
                    return self._missing_repo(repo)
                sha, files = hub._snapshot(repo, rev)
                siblings = [{"rfilename": name, "size": len(content)} for name, content in sorted(files.items())]
                self._json(200, {"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings})

            def _resolve(self, repo: str, rev: str, file: str, head: bool, **_) -> None:
                if repo not in hub.repos:
                    return self._missing_repo(repo, head)
                try:
                    sha, files = hub._snapshot(repo, rev)
                except KeyError:
                    return self._json(404, {"error": "revision not found"}, {"X-Error-Code": "RevisionNotFound"}, head)
                if file not in files:
                    headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
                    return self._json(404, {"error": f"{file} not found"}, headers, head)
                content = files[file]
                headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(content)}"'}
                self._send(200, content, {"Content-Type": "application/octet-stream", **headers}, head)

        return Handler


def _model_index_errors(model_index) -> list[str]:
    """The structural checks the Hub applies to `model-index` (name + results with task, dataset, metrics)."""
    if model_index is None:
        return []
    if not isinstance(model_index, list):
        return ["model-index must be a list"]
    errors = []
    for entry in model_index:
        if not isinstance(entry, dict) or "name" not in entry:
            errors.append("each model-index entry needs a name")
            continue
        for result in entry.get("results", []):
            if not isinstance(result.get("task"), dict) or "type" not in result["task"]:
                errors.append("each result needs task.type")
            if not isinstance(result.get("dataset"), dict) or not {"type", "name"} <= result["dataset"].keys():
                errors.append("each result needs dataset.type and dataset.name")
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not all(isinstance(m, dict) and {"type", "value"} <= m.keys() for m in metrics):
                errors.append("each result needs metrics with type and value")
    return errors
